"""`mmprep encode --engine ray` on a local 2-CPU Ray: the same cache, failures, exit codes and resume
behaviour as the local engine, and a worker killed mid-run costs neither rows nor duplicates. The run is
sized to the cluster (never waits forever), stops on SIGINT/SIGTERM, and `--json` stdout is one document."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")

from _http import LocalServer, image, serve  # noqa: E402
from conftest import image_bytes  # noqa: E402
from mmprep.store.reader import EmbeddingCache  # noqa: E402
from mmprep.store.verify import verify_cache  # noqa: E402
from _cli import NET, cli, encode_json, entry_row, write_manifest  # noqa: E402

pytestmark = pytest.mark.slow  # a local Ray cluster, actors killed and restarted: minutes
REPO = Path(__file__).resolve().parent.parent
N_GOOD = 12
DEADLINE = 300  # seconds: far beyond any run here; a run still going then is one that would never end


@pytest.fixture(scope="module", autouse=True)
def local_ray(mmprep_home):
    """One local Ray for the module; workers get the repository on their path and the test environment."""
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}
    )
    yield
    ray.shutdown()


@pytest.fixture()
def manifest(tmp_path, image_server) -> Path:
    """N_GOOD served images, a duplicate, and one bad row of each kind the loading half can produce."""
    rows: list[object] = []
    for i in range(N_GOOD):
        fmt, ctype = [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")][i % 3]
        rows.append(
            {
                "url": image_server.add(f"/{i}.img", image_bytes("RGB", (30 + i, 26 + i % 4), fmt, i), ctype),
                "id": f"i{i}",
            }
        )
    rows += [
        {"url": image_server.url("/0.img")},  # duplicate
        {"url": image_server.url("/missing.png")},  # http_status 404
        {"url": image_server.add("/page.png", b"<html><body>oops</body></html>", "text/html")},  # not_an_image
        {"url": image_server.add("/broken.png", image_bytes("RGB", (40, 40), "PNG", 99)[:60])},  # decode_error
        {"url": "data:image/png;base64,@@@"},  # bad_data_url
        {"url": "http://10.1.2.3/x.png"},  # blocked_url, never contacted
        "{not json",  # bad_manifest_line
    ]
    return Path(write_manifest(tmp_path / "m.jsonl", rows))


def encode(manifest: Path, out: Path, *extra: str) -> tuple[int, dict]:
    return encode_json(
        str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), *NET, "--batch-size", "4", *extra
    )


def cache_contents(cache: Path) -> dict[str, torch.Tensor]:
    db = sqlite3.connect(cache / "index.sqlite")
    keys = [r[0] for r in db.execute("SELECT key FROM entries")]
    assert len(keys) == len(set(keys))
    db.close()
    with EmbeddingCache(cache, memory_bytes=0) as reader:
        return {key: entry.embeddings for key, entry in zip(keys, reader.get_keys(keys))}


def error_records(summary: dict) -> list[tuple]:
    rows = [json.loads(line) for line in Path(summary["errors_file"]).read_text().splitlines()]
    return sorted((r["key"], r["kind"], r["line"], r["status"], r["retryable"]) for r in rows)


def test_ray_engine_makes_the_local_engines_cache_and_reruns_fetch_nothing(manifest, tmp_path, image_server):
    code, local = encode(manifest, tmp_path / "local")
    image_server.hits.clear()
    ray_code, remote = encode(manifest, tmp_path / "ray", "--engine", "ray", "--workers", "1")

    assert ray_code == code == 1
    same = (
        "rows",
        "encoded",
        "cached",
        "duplicates",
        "failed",
        "skipped_failed",
        "failures_by_kind",
        "exit_code",
        "status",
    )
    assert {k: remote[k] for k in same} == {k: local[k] for k in same}
    assert remote["encoded"] == N_GOOD and remote["bytes_fetched"] == local["bytes_fetched"]
    assert set(remote["failures_by_kind"]) == {
        "http_status", "not_an_image", "decode_error", "bad_data_url", "blocked_url", "bad_manifest_line",
    }  # fmt: skip
    assert error_records(remote) == error_records(local)
    assert (tmp_path / "ray" / "errors.jsonl").read_text() == Path(remote["errors_file"]).read_text()
    assert all(n == 1 for n in image_server.hits.values())  # every URL fetched once, the duplicate too

    mine, theirs = cache_contents(tmp_path / "ray"), cache_contents(tmp_path / "local")
    assert set(mine) == set(theirs) and len(mine) == N_GOOD
    for key in theirs:  # batches form as rows arrive, and CPU GEMMs are not bitwise batch-invariant: ~1e-7 apart
        assert mine[key].shape == theirs[key].shape and torch.allclose(mine[key], theirs[key], rtol=0, atol=1e-5)
    assert verify_cache(tmp_path / "ray", deep=True).ok
    assert not list((tmp_path / "ray").glob(".ray-*"))  # the planned-rows files are gone

    # resume: nothing is fetched again; permanent failures are skipped; the bad line still fails
    hits = image_server.total_hits
    code2, again = encode(manifest, tmp_path / "ray", "--engine", "ray")
    assert image_server.total_hits == hits
    assert (again["encoded"], again["cached"], again["skipped_failed"]) == (0, N_GOOD + 1, 5)
    assert again["failures_by_kind"] == {"bad_manifest_line": 1} and code2 == 0  # the same bad line: not new


def test_ray_engine_reads_a_parquet_manifest_with_custom_columns_like_the_local_engine(tmp_path, image_server):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    urls = [image_server.add(f"/pq{i}.png", image_bytes("RGB", (22 + i, 22), "PNG", 50 + i)) for i in range(4)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"link": urls[:2] + [None] + urls[2:], "sku": list("abcde")}), path, row_group_size=2)
    code, s = encode(
        path, tmp_path / "ray", "--engine", "ray", "--workers", "1", "--url-col", "link", "--id-col", "sku"
    )
    assert code == 1 and (s["rows"], s["encoded"], s["failures_by_kind"]) == (5, 4, {"bad_manifest_line": 1})
    [bad] = [json.loads(line) for line in Path(s["errors_file"]).read_text().splitlines()]
    assert (bad["source"], bad["line"], bad["message"]) == (str(path), 3, "column 'link' is null")
    db = sqlite3.connect(tmp_path / "ray" / "index.sqlite")
    assert sorted(r[0] for r in db.execute("SELECT caller_id FROM entries")) == ["a", "b", "d", "e"]
    db.close()  # (resume reads the manifest the same way: tests/test_encode_manifests.py covers it locally)


def test_ray_engine_files_pixel_changing_decode_options_under_the_local_fingerprint(tmp_path, image_server):
    """The driver and every actor fold decode overrides (--no-exif-transpose against the default vllm
    profile) into the fingerprint exactly as the local engine does."""
    urls = [image_server.add(f"/x{i}.png", image_bytes("RGB", (30 + i, 28), "PNG", i), "image/png") for i in range(2)]
    manifest = Path(write_manifest(tmp_path / "m.jsonl", urls))
    _, local = encode(manifest, tmp_path / "local", "--no-exif-transpose")
    code, remote = encode(manifest, tmp_path / "ray", "--no-exif-transpose", "--engine", "ray", "--workers", "1")
    _, plain = encode(manifest, tmp_path / "local")
    assert code == 0 and remote["encoded"] == local["encoded"] == 2
    assert remote["fingerprint"] == local["fingerprint"] != plain["fingerprint"]


def test_ray_refresh_revalidates_like_the_local_engine(tmp_path, image_server):
    """--refresh-older-than on Ray: a 304 and an unchanged body keep their entries (marked checked),
    a changed body is re-encoded under the new ETag; the counts are the local engine's."""

    photo = image_server.add("/photo.png", image_bytes("RGB", (40, 40), "PNG", 1), etag='"v1"')
    plain = image_server.add("/plain.png", image_bytes("RGB", (40, 40), "PNG", 2))  # no validators
    manifest = Path(write_manifest(tmp_path / "m.jsonl", [photo, plain]))
    cache = tmp_path / "cache"
    assert encode(manifest, cache, "--engine", "ray")[1]["encoded"] == 2
    with EmbeddingCache(cache) as reader:
        before = reader.get(photo).embeddings

    code, kept = encode(manifest, cache, "--engine", "ray", "--refresh-older-than", "0s")
    assert code == 0 and (kept["refreshed"], kept["encoded"], kept["cached"]) == (2, 0, 0)
    assert image_server.not_modified["/photo.png"] == 1 and image_server.hits["/plain.png"] == 2
    assert entry_row(cache, photo)["checked"] is not None and entry_row(cache, plain)["checked"] is not None

    image_server.add("/photo.png", image_bytes("RGB", (40, 40), "PNG", 9), etag='"v2"')
    code, changed = encode(manifest, cache, "--engine", "ray", "--refresh-older-than", "0s")
    assert code == 0 and (changed["encoded"], changed["refreshed"]) == (1, 1)
    assert entry_row(cache, photo)["etag"] == '"v2"'
    with EmbeddingCache(cache) as reader:
        assert not torch.equal(before, reader.get(photo).embeddings)
    assert verify_cache(cache, deep=True).ok


@pytest.mark.parametrize("fault", ["in_encode", "after_shard_write"])
def test_a_killed_encoder_actor_is_retried_without_losing_or_duplicating_rows(
    fault, tmp_path, image_server, monkeypatch
):
    urls = [image_server.add(f"/{i}.png", image_bytes("RGB", (24, 20 + i), "PNG", i)) for i in range(N_GOOD)]
    manifest = write_manifest(tmp_path / "m.jsonl", urls)
    fired = tmp_path / "fault-fired"
    monkeypatch.setenv("MMPREP_FAULT", fault)  # forwarded to the Ray workers by the engine
    monkeypatch.setenv("MMPREP_FAULT_ONCE", str(fired))  # only the first actor dies; its restart goes on
    code, summary = encode(Path(manifest), tmp_path / "cache", "--engine", "ray", "--shard-size", "256")

    assert fired.exists()  # an actor really was killed
    assert code == 0 and summary["encoded"] == N_GOOD and summary["failed"] == 0
    contents = cache_contents(tmp_path / "cache")  # asserts every key is indexed once
    assert len(contents) == N_GOOD
    assert verify_cache(tmp_path / "cache", deep=True).ok


def test_an_actor_that_always_dies_fails_the_run_after_the_restart_budget(tmp_path, image_server, monkeypatch):
    """Ray Data would restart it forever (a hang); mmprep gives up after --worker-restarts, exits 70 and
    says why, and a rerun without the fault encodes every row."""
    urls = [image_server.add(f"/{i}.png", image_bytes("RGB", (24, 20 + i), "PNG", i)) for i in range(4)]
    manifest = Path(write_manifest(tmp_path / "m.jsonl", urls))
    monkeypatch.setenv("MMPREP_FAULT", "in_encode")  # every actor dies on its first batch
    code, summary = encode(manifest, tmp_path / "cache", "--engine", "ray", "--workers", "1", "--worker-restarts", "1")
    assert code == summary["exit_code"] == 70 and summary["status"] == "failed"
    assert (
        "Ray pipeline failed" in summary["error"] and "ActorDiedError" in summary["error"] and summary["encoded"] == 0
    )
    monkeypatch.delenv("MMPREP_FAULT")
    code, again = encode(manifest, tmp_path / "cache", "--engine", "ray")
    assert code == 0 and again["encoded"] == 4 and again["error"] is None
    assert verify_cache(tmp_path / "cache", deep=True).ok


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE) -> Iterator[None]:
    """SIGTERM this process after `seconds`: a Ray run that would wait forever stops (exit 143, the test
    fails on it) instead of hanging the test session."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def when_requested(server: LocalServer, path: str, then: Any) -> threading.Thread:
    """Call `then()` once `server` has seen a request for `path` (or after DEADLINE)."""

    def watch() -> None:
        end = time.monotonic() + DEADLINE
        while path not in server.paths() and time.monotonic() < end:
            time.sleep(0.05)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def stalling_server(n: int) -> Iterator[tuple[LocalServer, list[str], str, threading.Event]]:
    """`n` images, and /stall.png: a response held back until the event is set. The fetcher gives up on it
    (read timeout, retries) as a `timeout` failure well under a minute later: a run that records no
    failure stopped before that."""
    release = threading.Event()

    def stall(h: Any) -> None:
        release.wait(600)
        h.reply(200, image_bytes("RGB", (30, 30), "PNG", 77), {"Content-Type": "image/png"})

    with serve() as server:
        for i in range(n):
            server.routes[f"/{i}.png"] = image(image_bytes("RGB", (24 + i, 20), "PNG", i))
        server.routes["/stall.png"] = stall
        try:
            yield server, [server.url(f"/{i}.png") for i in range(n)], server.url("/stall.png"), release
        finally:
            release.set()


def test_a_run_sized_to_the_cluster_finishes_and_sigterm_stops_one_that_waits_on_a_fetch(tmp_path):
    """Two 1-CPU actors on a 2-CPU Ray used to leave no CPU for the loading tasks: the run never ended.
    The actors are now sized to leave the loading room, and what cannot fit is refused at start. A run
    waiting on a fetch stops on SIGTERM (143) and keeps what was committed."""
    with stalling_server(6) as (server, urls, stalled, release):
        cache = tmp_path / "cache"
        with deadline():
            code, summary = encode(Path(write_manifest(tmp_path / "first.jsonl", urls)), cache, "--engine", "ray",
                                   "--workers", "2")  # fmt: skip
        assert (code, summary["status"], summary["encoded"]) == (0, "completed", 6)

        manifest = Path(write_manifest(tmp_path / "m.jsonl", [*urls, stalled]))
        when_requested(server, "/stall.png", lambda: os.kill(os.getpid(), signal.SIGTERM))
        with deadline():
            code, summary = encode(manifest, cache, "--engine", "ray", "--workers", "2", "--timeout", "900")
        assert (code, summary["exit_code"], summary["status"]) == (143, 143, "interrupted")
        assert (summary["cached"], summary["encoded"], summary["failed"]) == (6, 0, 0)  # it did not wait for the fetch
        assert len(cache_contents(cache)) == 6 and verify_cache(cache, deep=True).ok
        assert not list(cache.glob(".ray-*"))

    refuse = ["encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(tmp_path / "other"), *NET,
              "--engine", "ray", "--progress", "none"]  # fmt: skip
    result = cli(*refuse, "--workers", "9")
    assert result.exit_code == 2
    assert "--workers 9 encoder actors and the loading tasks do not fit in the Ray cluster's 2 CPUs" in result.output
    assert "use --workers 7 or fewer" in result.output and "Traceback" not in result.output
    result = cli(*refuse, "--gpus-per-worker", "1")
    assert result.exit_code == 2 and "--gpus-per-worker 1 needs GPUs, and the Ray cluster has 0" in result.output
    assert not (tmp_path / "other" / "index.sqlite").exists()


def test_the_cli_on_its_own_ray_stops_on_sigint_and_prints_one_json_document(tmp_path, mmprep_home):
    """`python -m mmprep encode --engine ray --json` with mmprep's own local Ray: SIGINT while a fetch is
    held back ends it (130, what was committed kept); a rerun with an encoder actor killed mid-run (Ray
    reports the dead worker) finishes. Each time stdout is exactly one JSON document: Ray writes to stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMPREP_HOME": mmprep_home}
    with stalling_server(4) as (server, urls, stalled, release):
        manifest = write_manifest(tmp_path / "m.jsonl", [*urls, stalled])
        args = [sys.executable, "-m", "mmprep", "encode", manifest, "--model", "builtin:tiny-clip", "--out",
                str(tmp_path / "cache"), *NET, "--engine", "ray", "--timeout", "900", "--json", "--progress", "none"]  # fmt: skip
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        when_requested(server, "/stall.png", lambda: proc.send_signal(signal.SIGINT))
        out, errors = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 130, errors[-3000:]
        summary = json.loads(out)  # the whole of stdout: one document, nothing before or after
        assert (summary["status"], summary["exit_code"]) == ("interrupted", 130)
        assert (summary["encoded"], summary["failed"]) == (0, 0)  # it did not wait for the fetch
        assert "interrupted:" in errors and "Started a local Ray instance" in errors  # Ray's own lines: stderr
        release.set()

        fired = tmp_path / "fault-fired"
        rerun = subprocess.run(
            [*args, "--workers", "2", "--shard-size", "256"], cwd=tmp_path, capture_output=True, text=True,
            timeout=DEADLINE, env={**env, "MMPREP_FAULT": "in_encode", "MMPREP_FAULT_ONCE": str(fired)},
        )  # fmt: skip
        assert fired.exists() and rerun.returncode == 0, rerun.stderr[-3000:]
        again = json.loads(rerun.stdout)
        assert (again["status"], again["encoded"], again["failed"]) == ("completed", 5, 0)
    assert len(cache_contents(tmp_path / "cache")) == 5
