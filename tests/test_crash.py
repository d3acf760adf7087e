"""kill -9 at the dangerous moments of `mmprep encode`, Ctrl-C and SIGTERM: the cache stays
consistent, nothing is lost, and the rerun encodes exactly what is missing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _http import delayed, image, serve
from conftest import image_bytes
from mmprep.store.verify import verify_cache

pytestmark = pytest.mark.slow  # each test runs mmprep in subprocesses, kills or signals them, and reruns
REPO = Path(__file__).resolve().parent.parent
N_ROWS = 24


@pytest.fixture()
def slow_server():
    """Serves /<i>.png after a short delay, so a run lasts long enough to be interrupted."""
    with serve() as server:
        for i in range(N_ROWS):
            server.routes[f"/{i}.png"] = delayed(image(image_bytes("RGB", (20 + i % 5, 24), "PNG", i)), 0.15)
        yield [server.url(f"/{i}.png") for i in range(N_ROWS)]


def encode_cmd(manifest: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmprep",
        "encode",
        str(manifest),
        "--model",
        "builtin:tiny-clip",
        "--out",
        str(out),
        "--allow-http",
        "--allow-host",
        "127.0.0.1",
        "--batch-size",
        "4",
        "--concurrency",
        "4",
        "--shard-size",
        "200",
        "--progress",
        "log",
        "--json",
    ]


def keys_in_index(out: Path) -> list[str]:
    db = sqlite3.connect(out / "index.sqlite")
    keys = [r[0] for r in db.execute("SELECT key FROM entries")]
    db.close()
    return keys


def check_complete(out: Path, manifest: Path) -> dict:
    rerun = subprocess.run(encode_cmd(manifest, out), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    keys = keys_in_index(out)
    assert len(keys) == len(set(keys)) == N_ROWS  # every row exactly once
    report = verify_cache(out, deep=True)
    assert report.ok, report.problems
    return json.loads(rerun.stdout)


@pytest.mark.parametrize("fault", ["after_fetch:6", "in_encode:3", "after_shard_write:2", "in_index_commit:2"])
def test_kill_9_then_rerun_gives_every_row_once(fault, slow_server, tmp_path, mmprep_home):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(u) + "\n" for u in slow_server))
    out = tmp_path / "cache"
    env = {**os.environ, "MMPREP_FAULT": fault}
    crashed = subprocess.run(encode_cmd(manifest, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    before = set(keys_in_index(out))
    summary = check_complete(out, manifest)
    assert summary["cached"] + summary["encoded"] == N_ROWS
    if fault.startswith("after_shard_write"):
        # the shard written just before the kill was adopted, not encoded again
        assert summary["encoded"] < N_ROWS - len(before)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_batch_flushes_and_exits(signum, code, slow_server, tmp_path, mmprep_home):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(u) + "\n" for u in slow_server))
    out = tmp_path / "cache"
    proc = subprocess.Popen(
        encode_cmd(manifest, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the first shard is committed
        try:
            if (out / "index.sqlite").exists() and keys_in_index(out):
                break
        except sqlite3.OperationalError:  # the index exists but its schema is not committed yet
            pass
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "interrupted" and summary["exit_code"] == code
    assert 0 < len(keys_in_index(out)) < N_ROWS
    assert summary["encoded"] == len(keys_in_index(out))  # what it says it did is what is on disk
    assert verify_cache(out).ok
    rest = check_complete(out, manifest)
    assert rest["cached"] == summary["encoded"]


# Runs `mmprep` with every file it writes capped at argv[1] bytes: the kernel then refuses a larger
# write with EFBIG, as a full disk refuses one with ENOSPC (SIGXFSZ ignored so write() just fails).
LIMITED_FILE_SIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mmprep.cli import main
sys.argv[0] = "mmprep"
main()
"""


def test_a_refused_shard_write_ends_the_run_failed_with_exit_70_and_loses_nothing(tmp_path, mmprep_home):
    """The writer cannot store a shard (file too large here; disk full in life): the run stops as
    `failed`, exit 70, with the OS error in the summary; no half-written shard is left; the entries
    committed before stay; a rerun with room encodes exactly the missing rows."""
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for i in range(N_ROWS):
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGB", (20 + i % 5, 24), "PNG", i))
        # the second half carries 64 KB caller ids, which the shard header stores: their shard is ~800 KB
        rows.append({"url": str(path), "id": f"{i}-" + "x" * (65_536 if i >= N_ROWS // 2 else 8)})
    first, whole = tmp_path / "first.jsonl", tmp_path / "whole.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[: N_ROWS // 2]))
    whole.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"

    def encode(manifest: Path, *limit: str) -> subprocess.CompletedProcess:
        launcher = ["-c", LIMITED_FILE_SIZE, *limit] if limit else ["-m", "mmprep"]
        return subprocess.run(
            [sys.executable, *launcher, "encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out),
             "--allow-local-dir", str(images), "--progress", "none", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    assert encode(first).returncode == 0
    refused = encode(whole, str(512 * 1024))
    assert refused.returncode == 70, refused.stderr
    summary = json.loads(refused.stdout)
    assert summary["status"] == "failed" and summary["exit_code"] == 70
    assert summary["error"].startswith("cannot write the cache: OSError: [Errno 27] File too large")
    assert (summary["cached"], summary["encoded"]) == (N_ROWS // 2, 0)
    assert "Traceback" not in refused.stderr
    assert not list(out.rglob("*.tmp"))  # the refused shard left nothing behind
    assert len(keys_in_index(out)) == N_ROWS // 2
    assert verify_cache(out, deep=True).ok

    rerun = encode(whole)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["encoded"] == N_ROWS // 2
    keys = keys_in_index(out)
    assert len(keys) == len(set(keys)) == N_ROWS
    assert verify_cache(out, deep=True).ok


def test_a_cache_that_cannot_be_written_at_start_up_exits_70_without_a_traceback(tmp_path, mmprep_home):
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.png").write_bytes(image_bytes("RGB", (20, 24), "PNG", 1))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(str(images / "a.png")) + "\n")
    out = tmp_path / "cache"
    cmd = ["encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), "--allow-local-dir", str(images),
           "--progress", "none"]  # fmt: skip
    full = subprocess.run([sys.executable, "-c", LIMITED_FILE_SIZE, "100", *cmd], cwd=REPO, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert full.returncode == 70, full.stderr
    assert "error: cannot write the cache:" in full.stderr and "Traceback" not in full.stderr
    room = subprocess.run([sys.executable, "-m", "mmprep", *cmd], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert room.returncode == 0, room.stderr
    assert verify_cache(out, deep=True).ok
