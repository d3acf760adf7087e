"""Ctrl-C / SIGTERM while rows are still downloading from a server that drips one byte at a time:
the fetches in flight are cancelled at once (not recorded as failures, left for a rerun), the rows
already fetched are still encoded and committed, and the run exits 130/143 within seconds."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _http import Handler, LocalServer, serve
from conftest import image_bytes

pytestmark = pytest.mark.slow  # a subprocess run, signalled mid-fetch
REPO = Path(__file__).resolve().parent.parent
N_FAST, N_DRIP, CONCURRENCY = 4, 6, 4  # more drip rows than slots: the producer also waits for a slot


def drip(h: Handler) -> None:
    """Promises 10,000 bytes, then sends one every 0.5 s: only a cancel ends the fetch in time."""
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "10000")
    h.end_headers()
    try:
        for _ in range(10_000):
            h.wfile.write(b"\x89")
            h.wfile.flush()
            time.sleep(0.5)
    except OSError:  # the client hung up
        pass


@pytest.fixture()
def drip_server() -> Iterator[LocalServer]:
    with serve() as server:
        for i in range(N_DRIP):
            server.routes[f"/drip/{i}.png"] = drip
        yield server


def model_registered(out: Path) -> bool:
    """Whether the run has written its models row (it does once the weights have loaded)."""
    if not (out / "index.sqlite").exists():
        return False
    db = sqlite3.connect(f"file:{out / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM models").fetchone()[0] > 0
    except sqlite3.OperationalError:  # not created yet
        return False
    finally:
        db.close()


def column(out: Path, table: str) -> list[str]:
    """The url column of an index table."""
    db = sqlite3.connect(out / "index.sqlite")
    try:
        return [r[0] for r in db.execute(f"SELECT url FROM {table}")]
    finally:
        db.close()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_cancels_dripping_fetches_and_commits_the_fetched_rows(
    signum, code, drip_server, tmp_path, mmprep_home
):  # fmt: skip
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for i in range(N_FAST):  # first in the manifest: fetched and handed to the model before any drip row starts
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGB", (24 + i, 24), "PNG", i))
        rows.append(str(path))
    rows += [f"http://127.0.0.1:{drip_server.server_address[1]}/drip/{i}.png" for i in range(N_DRIP)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "mmprep", "encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out),
        "--allow-http", "--allow-host", "127.0.0.1", "--allow-local-dir", str(images),
        "--concurrency", str(CONCURRENCY), "--progress", "none", "--json",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMPREP_HOME": mmprep_home}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # every slot holds a dripping fetch, and the weights have loaded (the models row is written once
        # they have): a signal during the load stops without encoding, which is another test's case
        while len(drip_server.seen) < CONCURRENCY or not model_registered(out):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        time.sleep(1.0)  # a couple of bytes in: the fetches are reading bodies, not connecting
        signalled = time.monotonic()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert took < 10, f"exit took {took:.1f}s after the signal"
    summary = json.loads(stdout)
    assert summary["status"] == "interrupted" and summary["exit_code"] == code
    assert summary["encoded"] == N_FAST and summary["failed"] == 0
    urls = column(out, "entries")
    assert len(urls) == N_FAST and not any("/drip/" in u for u in urls)  # the fetched rows were committed
    assert column(out, "failures") == []  # a cancelled fetch is not a failure: a rerun fetches it
    assert Path(summary["errors_file"]).read_text() == ""
    assert len(drip_server.seen) == CONCURRENCY  # no drip row started after the signal
