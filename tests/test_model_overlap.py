"""`encode` reads, fetches, decodes and preprocesses rows while the model's weights load, within its bounded queues.

The weights are a real tiny CLIP checkpoint; its family's `load` is held by a gate the test opens (so
"while loading" does not depend on timing), and the images come from a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from _model_helpers import save_clip
from conftest import ImageServer, image_bytes
from mmprep.errors import ModelLoadError
from mmprep.models import EncoderHandle, load_encoder
from mmprep.models.source import load_config, load_image_processor, resolve_source
from mmprep.models.pooled import PooledEncoder
from mmprep.pipeline import EncodeRun
from mmprep.settings import LoadSettings, ModelSettings, Settings
from mmprep.store.reader import EmbeddingCache

ROWS, BATCH, CONCURRENCY, DECODE_WORKERS = 40, 4, 4, 2
# Rows that can be fetched before the model takes one: the model queue (2 x batch), one row blocked in
# each decode thread's put, and every fetch slot holding a fetched row that waits for a decode thread.
BOUND = 2 * BATCH + DECODE_WORKERS + CONCURRENCY


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_clip(tmp_path_factory.mktemp("clip"), seed=3)


class Gate:
    """A family whose `load` waits for the test: `opened` once the test lets the weights load."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()

    def family(self) -> type[PooledEncoder]:
        gate = self

        class GatedPooled(PooledEncoder):
            @classmethod
            def load(cls, *args: Any) -> PooledEncoder:
                gate.entered.set()
                if not gate.opened.wait(60):
                    raise TimeoutError("the test never let the weights load")
                return super().load(*args)

        return GatedPooled


def gated_handle(model_dir: Path, gate: Gate) -> EncoderHandle:
    """What `open_encoder` builds for this checkpoint, with the gated family."""
    source = resolve_source(str(model_dir))
    config = load_config(source)
    return EncoderHandle(gate.family(), source, config, load_image_processor(source), "CLIPModel",
                         torch.device("cpu"), torch.float32, {})  # fmt: skip


def settings_for(out: Path, model_dir: Path) -> Settings:
    load = LoadSettings(allow_http=True, allow_hosts=("127.0.0.1",), concurrency=CONCURRENCY, per_host=CONCURRENCY,
                        decode_workers=DECODE_WORKERS)  # fmt: skip
    return Settings(out=out, model=ModelSettings(name=str(model_dir), batch_size=BATCH), load=load)


def manifest_of(tmp_path: Path, server: ImageServer, rows: int = ROWS, missing: int = 0) -> tuple[str, list[str]]:
    """`missing` rows that 404, then `rows` distinct PNGs."""
    urls = [server.url(f"/missing/{i}.png") for i in range(missing)]
    urls += [server.add(f"/{i}.png", image_bytes("RGB", (40 + i % 7, 36), "PNG", seed=i)) for i in range(rows)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f'{{"url": "{url}"}}\n' for url in urls))
    return str(path), urls


def when(condition: Callable[[], bool], then: Callable[[], None]) -> threading.Thread:
    """Run `then` on a thread once `condition` holds (checked every 10 ms, for up to 60 s)."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def settled_hits(server: ImageServer, quiet: float = 1.0) -> int:
    """The server's request count once it has not moved for `quiet` seconds (the loader is blocked)."""
    last, since = server.total_hits, time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        if server.total_hits != last:
            last, since = server.total_hits, time.monotonic()
    return last


def test_rows_load_while_the_weights_load_and_stop_at_the_queue_bound(tmp_path, image_server, clip_dir):
    manifest, urls = manifest_of(tmp_path, image_server)
    gate = Gate()
    seen: dict[str, int] = {}

    def open_gate() -> None:
        seen["before_weights"] = settled_hits(image_server)
        gate.opened.set()

    watcher = when(lambda: gate.entered.is_set() and image_server.total_hits > 0, open_gate)
    out = tmp_path / "cache"
    summary = EncodeRun([manifest], settings_for(out, clip_dir), _started(gated_handle(clip_dir, gate))).run()
    watcher.join()

    # Fetched while the weights were held back, and no more than the queues hold: memory stays flat.
    assert 0 < seen["before_weights"] <= BOUND < ROWS
    assert summary.status == "completed" and summary.encoded == ROWS and summary.failed == 0
    assert summary.model_load_s is not None and summary.first_batch_s is not None
    # The same tensors as an encoder loaded before the run (the usual path).
    loaded = load_encoder(ModelSettings(name=str(clip_dir)))
    assert summary.fingerprint == loaded.fingerprint
    cache = EmbeddingCache(out, model=summary.fingerprint)
    try:
        from mmprep.imaging.decode import decode_image

        for i in (0, 17, ROWS - 1):
            image = decode_image(image_server.routes[f"/{i}.png"].body, LoadSettings())
            expected = loaded.encode([loaded.preprocess(image)])[0]["embeddings"]
            stored = cache.get(urls[i]).tensors["embeddings"]
            torch.testing.assert_close(stored, expected, rtol=0, atol=1e-5)  # batched vs alone: float rounding
            other = cache.get(urls[i + 1 if i < ROWS - 1 else 0]).tensors["embeddings"]
            assert (other - expected).abs().max() > 1e-2  # a neighbour's entry would fail the check above
    finally:
        cache.close()
    assert set(_column(out, "entries", "fingerprint")) == {(summary.fingerprint,)}
    assert _column(out, "models", "fingerprint") == [(summary.fingerprint,)]  # registered once the weights loaded


def test_weights_that_fail_to_load_fail_the_run_and_keep_only_real_failures(tmp_path, image_server, clip_dir):
    manifest, _ = manifest_of(tmp_path, image_server, rows=12, missing=2)  # the 404s come first
    model_dir = tmp_path / "model"
    save_clip(model_dir, seed=3)
    settings = settings_for(tmp_path / "cache", model_dir)
    gate = Gate()
    handle = gated_handle(model_dir, gate)  # config, processor and fingerprint read from good files
    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:8] + b"\x00" * 64)  # then the weights break before they load
    watcher = when(lambda: image_server.total_hits >= 2, lambda: (settled_hits(image_server), gate.opened.set()))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        EncodeRun([manifest], settings, _started(handle)).run()
    watcher.join()

    out = settings.out
    runs = _column(out, "runs", "status, exit_code")
    assert runs == [("failed", 2)]  # the CLI exits 2, as for a model failing before the run
    assert _column(out, "entries", "key") == []
    # The 404s are real failures of their own; the rows waiting for the model are not failures at all.
    failed = sorted(url for (url,) in _column(out, "failures", "url"))
    assert failed == sorted(image_server.url(f"/missing/{i}.png") for i in range(2))

    weights.write_bytes(good)
    rerun = EncodeRun([manifest], settings, load_encoder(settings.model)).run()
    assert rerun.encoded == 12 and rerun.skipped_failed == 2 and rerun.exit_code == 0


def test_a_signal_while_the_weights_load_stops_without_waiting_for_them(tmp_path, image_server, clip_dir):
    manifest, _ = manifest_of(tmp_path, image_server)
    gate = Gate()
    settings = settings_for(tmp_path / "cache", clip_dir)
    handle = _started(gated_handle(clip_dir, gate))
    run = EncodeRun([manifest], settings, handle)
    watcher = when(lambda: image_server.total_hits >= BATCH, lambda: run.on_signal(signal.SIGINT))
    summary = run.run()
    watcher.join()

    assert handle.wait(timeout=0) is None  # the run ended while the weights were still held back
    gate.opened.set()
    assert summary.status == "interrupted" and summary.exit_code == 130
    assert summary.encoded == 0 and summary.failed == 0
    assert _column(settings.out, "failures", "url") == []  # the fetched rows are left for the rerun
    rerun = EncodeRun([manifest], settings, load_encoder(settings.model)).run()
    assert rerun.encoded == ROWS and rerun.exit_code == 0


def _started(handle: EncoderHandle) -> EncoderHandle:
    handle.start()
    return handle


def _column(out: Path, table: str, columns: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(out / "index.sqlite")
    try:
        return list(db.execute(f"SELECT {columns} FROM {table}"))
    finally:
        db.close()
