"""`mmprep encode`: the loading half (core.py), then one model thread and one writer thread.

  decode threads  → model queue (bounded) → model thread: batches, one forward per batch (batches.py)
                  → writer queue (bounded) → writer thread: shards, then the CacheWriter (writer.py):
                    index rows, failures, errors.jsonl
What to do with each row is the EncodePlanner's call (planner.py); the Ray engine composes the same
planner, model stage and writer. The writer thread is the only index writer; an entry row is committed
only after its shard is durable, and a key leaves the in-flight set only once committed, so no row is
ever fetched twice in a run.
Given an EncoderHandle whose weights are still loading, everything but the model thread starts at
once: the manifest is read and classified, rows are fetched, decoded and preprocessed until the
bounded model queue is full, and the model thread waits for the weights before its first batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from mmprep.imaging.decode import decode_image
from mmprep.errors import EXIT_USAGE, CacheWriteError, ModelLoadError
from mmprep.faults import fault_point
from mmprep.fetch import Fetched
from mmprep.manifest import Record
from mmprep.models import Encoder, EncoderHandle
from mmprep.pipeline.batches import Encoded, Failed, Prepared, encode_batch, entry_of
from mmprep.pipeline.core import LoadingRun, Plan
from mmprep.pipeline.planner import EncodePlanner
from mmprep.pipeline.writer import CacheWriter, RunSummary, cache_write_message, other_decode_message, summarize
from mmprep.settings import Settings
from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.layout import CacheLayout
from mmprep.store.lock import WriterLock
from mmprep.store.reader import EmbeddingCache
from mmprep.store.shards import ShardWriter
from mmprep.serving.vllm_hash import vllm_image_identifier

__all__ = ["EncodeRun", "RunSummary"]

FAILURE_FLUSH_ROWS = 256
WRITER_TICK = 0.5  # seconds between writer housekeeping (failure commits, time-based shard flush)
BATCH_LINGER = 0.005  # seconds the model thread waits for more rows before running a short batch


@dataclass
class _Registered:
    """The loaded model's facts, for the index's models table (before its first entry is committed)."""

    description: dict[str, Any]


@dataclass
class _Checked:
    """A cached entry whose source was re-validated unchanged (304 or same bytes)."""

    key: str
    etag: str | None
    last_modified: str | None


_STOP = object()


class EncodeRun(LoadingRun):
    """Runs manifests through the whole pipeline into a cache directory."""

    def __init__(
        self, manifests: list[str], settings: Settings, encoder: Encoder | EncoderHandle, reporter: Any = None,
        lock: WriterLock | None = None, started: float | None = None,
    ) -> None:  # fmt: skip
        """`encoder`: loaded, or a handle whose weights load while the run starts (`EncoderHandle.start`);
        `lock`: the cache's writer lock when the caller took it already (before loading the model);
        `started`: time.monotonic() when the command started (default: now), for `first_batch_s`."""
        self._started = time.monotonic() if started is None else started
        self._first_batch_at: float | None = None
        self.model_error: ModelLoadError | None = None
        super().__init__(manifests, settings.load, reporter)
        self.settings = settings
        self.lock = lock
        self.encoder = encoder  # .name, .family, .fingerprint and .preprocess work before the weights are loaded
        self.layout = CacheLayout(settings.out)
        self.fingerprint = encoder.fingerprint
        self.planner: EncodePlanner = EncodePlanner(
            settings, self.layout, self.fingerprint, self.run_id, self.counters, self.claims
        )
        self.writer = CacheWriter(
            self.layout, self.fingerprint, encoder.name, self.run_id, self.counters, self.planner.failures.depends,
            release=self.release,
        )  # fmt: skip
        batch = settings.model.batch_size
        self._model_q: queue.Queue[Any] = queue.Queue(maxsize=2 * batch)
        self._writer_q: queue.Queue[Any] = queue.Queue(maxsize=4 * batch + settings.load.concurrency)
        self._writer_error: BaseException | None = None
        self._local = threading.local()  # per decode thread: read-only index and reader for content dedup
        self._readers: list[Any] = []
        self.other_decodes: list[dict[str, Any]] = []
        self._pending_dedup = 0  # content-dedup rows in the shard being filled (writer thread)

    def run(self) -> RunSummary:
        """Run to completion (or until SIGINT/SIGTERM), flush everything, return the summary; ModelLoadError
        (after recording the run as failed) when the weights of an EncoderHandle fail to load."""
        held = self.lock is not None and self.lock.held
        with contextlib.nullcontext() if held else WriterLock(self.layout.root, wait=self.settings.wait_lock):
            try:
                summary = self._run_locked()
            except (
                OSError,
                sqlite3.Error,
            ) as exc:  # a full disk at start-up (later, the writer ends the run as failed)
                raise CacheWriteError(cache_write_message(exc)) from exc
        if self.model_error is not None:
            raise self.model_error
        return summary

    def _run_locked(self) -> RunSummary:
        writer = self.writer.begin()  # adopts a crashed run's written-but-unindexed shards
        try:
            self.other_decodes = writer.other_decodes(self.encoder.base_fingerprint)
            self.planner.open()
        except BaseException:
            writer.close()
            raise
        if self.reporter is not None:
            for other in self.other_decodes:
                self.reporter.note(other_decode_message(other, self.settings.load))
        writer_thread = threading.Thread(target=self._writer_loop, name="mmprep-writer", daemon=True)
        model = threading.Thread(target=self._model_loop, name="mmprep-model", daemon=True)
        writer_thread.start()
        model.start()
        if self.reporter is not None:
            self.reporter.start(self.counters, self.manifests)
        try:
            asyncio.run(self.produce())
        finally:
            self._model_q.put(_STOP)
            model.join()
            self._writer_q.put(_STOP)
            writer_thread.join()
            self.planner.close()
            for reader in self._readers:
                reader.close()
            if self.reporter is not None:
                self.reporter.stop(self.counters)
        if isinstance(self._writer_error, (OSError, sqlite3.Error)):  # disk full, file too large, I/O error, ...
            self.run_error = cache_write_message(self._writer_error)
        elif self._writer_error is not None:
            raise self._writer_error
        elif self.model_error is not None:
            self.run_error = str(self.model_error)
        return self._finish()

    # -- loading-half hook ----------------------------------------------------------------------

    def handle(self, record: Record, key: str, fetched: Fetched, plan: Plan) -> None:
        """Decode thread: unchanged refresh → touch; known bytes → copy; else decode + preprocess → model."""
        sha = hashlib.sha256(fetched.data).hexdigest()
        if plan.refresh and sha == plan.content_sha256:
            self._identify(sha, fetched.data)
            self._writer_q.put(_Checked(key, fetched.etag, fetched.last_modified))
            return
        row = Prepared(record, key, {}, sha, fetched.etag, fetched.last_modified)
        twin = self._stored_twin(sha, key)
        if twin is not None:
            self._identify(sha, fetched.data)
            self.counters.content_dedup += 1
            self._writer_q.put(Encoded(row, twin, dedup=True))
            return
        image = decode_image(fetched.data, self.load)
        self._identify(sha, fetched.data)  # after the decode: only bytes known to be an allowed image are opened
        row.inputs = self.encoder.preprocess(image)
        self._model_q.put(row)

    def _identify(self, sha: str, data: bytes) -> None:
        """--vllm-model-id: vLLM's identifier of these image bytes, queued for the writer."""
        model_id = self.settings.vllm_model_id
        if model_id is not None:
            self.writer.identified(sha, model_id, vllm_image_identifier(data, model_id))

    async def not_modified(self, record: Record, key: str, plan: Plan) -> None:
        await self._to_writer(_Checked(key, None, None))

    async def record_failure(self, failure: FailureRecord) -> None:
        await self._to_writer(Failed(failure))

    async def _to_writer(self, item: Any) -> None:
        """Queue for the writer without blocking the event loop when the queue is full."""
        try:
            self._writer_q.put_nowait(item)
        except queue.Full:
            await asyncio.to_thread(self._writer_q.put, item)

    def _stored_twin(self, sha: str, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors of a cached entry with the same image bytes (same model), copied; None if none."""
        local = self._local
        if not hasattr(local, "index"):
            local.index = CacheIndex(self.layout.index, readonly=True)
            self._readers.append(local.index)
        other = local.index.key_with_content(self.fingerprint, sha)
        if other is None or other == key:
            return None
        if not hasattr(local, "reader"):  # opened once this model has an entry (and so a models row)
            local.reader = EmbeddingCache(self.layout.root, model=self.fingerprint, memory_bytes=0)
            self._readers.append(local.reader)
        entry = local.reader.get_key(other)
        if entry is None:  # vanished (gc) between the two reads: just encode
            return None
        return {name: tensor.clone() for name, tensor in entry.tensors.items()}

    # -- model thread ---------------------------------------------------------------------------

    def _model_loop(self) -> None:
        encoder = self._loaded_encoder()
        if encoder is None:  # the weights failed to load, or the run stopped first: the queued rows stay undone
            self._discard_model_queue()
            return
        self._writer_q.put(_Registered(encoder.describe()))  # ahead of this model's first entry
        batch_size = self.settings.model.batch_size
        stopping = False
        while not stopping:
            first = self._model_q.get()
            if first is _STOP:
                break
            batch: list[Prepared] = [first]
            while len(batch) < batch_size:
                try:
                    item = self._model_q.get(timeout=BATCH_LINGER)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            results = encode_batch(encoder, batch)
            encoded = sum(isinstance(r, Encoded) for r in results)
            self.counters.encoded += encoded  # progress moves every batch
            if encoded and self._first_batch_at is None:
                self._first_batch_at = time.monotonic()
            for result in results:
                self._writer_q.put(result)

    def _loaded_encoder(self) -> Encoder | None:
        """The encoder once its weights are loaded; None when they fail to load (the run stops, failed) or
        the run is stopped first (a signal, the writer): rows then wait in no queue for minutes."""
        handle = self.encoder
        if not isinstance(handle, EncoderHandle):
            return handle
        while True:
            try:
                encoder = handle.wait(timeout=0.1)
            except ModelLoadError as exc:
                self.model_error = exc
                self.halt()
                return None
            if encoder is not None:
                return encoder
            if self.stop_signal is not None:
                return None

    def _discard_model_queue(self) -> None:
        """Take rows off the model queue (so decode threads never block) until _STOP; they were not encoded
        and are not failures: released, a rerun loads them."""
        while (item := self._model_q.get()) is not _STOP:
            self.release([item.key])

    # -- writer thread --------------------------------------------------------------------------

    def _writer_loop(self) -> None:
        """Shards fill here and are committed, with failures and re-validations, through the CacheWriter."""
        writer = self.writer
        shards = ShardWriter(self.layout, self.fingerprint, self.encoder.name, self.run_id, self.encoder.family)
        stopped = False  # _STOP taken off the queue: nothing more will come, so there is nothing to drain
        try:
            while True:
                try:
                    item = self._writer_q.get(timeout=WRITER_TICK)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    stopped = True
                    break
                if isinstance(item, _Registered):
                    writer.register_model(self.encoder.family, item.description)
                elif isinstance(item, Encoded):
                    shards.add(entry_of(item))
                    self._pending_dedup += item.dedup
                elif isinstance(item, Failed):
                    writer.failed(item.failure)
                elif isinstance(item, _Checked):
                    writer.checked(item.key, item.etag, item.last_modified)
                if shards.pending_bytes >= self.settings.shard_bytes or (
                    shards.pending_count and shards.pending_age() >= self.settings.flush_seconds
                ):
                    self._flush_shard(shards)
                if writer.pending >= FAILURE_FLUSH_ROWS or (writer.pending and item is None):
                    writer.flush()
            self._flush_shard(shards)
            writer.flush()
        except BaseException as exc:  # the cache cannot be written: stop the run loudly
            self._writer_error = exc
            self.stop_signal = self.stop_signal or signal.SIGTERM
            if not stopped:  # the last flush can fail after _STOP: waiting for another would hang the run
                _drain(self._writer_q)
        finally:
            writer.close()

    def _flush_shard(self, shards: ShardWriter) -> None:
        written = shards.flush()
        self.writer.flush_identifiers()
        if written is None:
            return
        fault_point("after_shard_write")
        self.writer.commit_shard(written, dedup=self._pending_dedup)
        self._pending_dedup = 0

    # -- end ------------------------------------------------------------------------------------

    def _load_seconds(self) -> float | None:
        """How long the weights of an EncoderHandle took to load during this run (None: loaded before, or not loaded)."""
        seconds = self.encoder.load_seconds if isinstance(self.encoder, EncoderHandle) else None
        return None if seconds is None else round(seconds, 3)

    def _finish(self) -> RunSummary:
        status, code = self.exit_status(self.counters.new_failures > 0)
        if self.model_error is not None:
            code = EXIT_USAGE  # as when the model fails to load before the run: the same error, the same exit
        summary = summarize(
            self.counters, run_id=self.run_id, model=self.encoder.name, fingerprint=self.fingerprint, status=status,
            exit_code=code, layout=self.layout, error=self.run_error, other_decodes=self.other_decodes,
            first_batch_s=None if self._first_batch_at is None else round(self._first_batch_at - self._started, 3),
            model_load_s=self._load_seconds(),
        )  # fmt: skip
        self.writer.finish(summary)
        return summary


def _drain(q: queue.Queue[Any]) -> None:
    """Keep emptying `q` until _STOP so producers blocked on put() can finish."""
    while q.get() is not _STOP:
        pass
