"""`mmprep encode`: the loading half (core.py), then one model thread and one writer thread.

  decode threads  → model queue (bounded) → model thread: batches, one forward per batch
                  → writer queue (bounded) → writer thread: shards, index rows, failures, errors.jsonl
The writer owns the index connection; an entry row is committed only after its shard is durable,
and a key leaves the in-flight set only once committed, so no row is ever fetched twice in a run.
Given an EncoderHandle whose weights are still loading, everything but the model thread starts at
once: the manifest is read and classified, rows are fetched, decoded and preprocessed until the
bounded model queue is full, and the model thread waits for the weights before its first batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmprep.imaging.decode import decode_flags, decode_image, pixel_options
from mmprep.errors import EXIT_USAGE, CacheWriteError, ErrorKind, ModelLoadError, RowError
from mmprep.faults import fault_point
from mmprep.fetch import Fetched
from mmprep.keys import stored_url
from mmprep.manifest import BadLine, Record
from mmprep.models import Encoder, EncoderHandle
from mmprep.pipeline.core import INFLIGHT, PLAIN, LoadingRun, Plan, failure_of, keys_of
from mmprep.pipeline.retry import FailurePolicy
from mmprep.settings import LoadSettings, Settings
from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.lookup import KeyLookup
from mmprep.store.layout import CacheLayout
from mmprep.store.lock import WriterLock
from mmprep.store.reader import EmbeddingCache
from mmprep.store.rebuild import adopt_orphans
from mmprep.store.shards import ShardEntry, ShardWriter
from mmprep.serving.vllm_hash import vllm_image_identifier

logger = logging.getLogger("mmprep.pipeline")

FAILURE_FLUSH_ROWS = 256
WRITER_TICK = 0.5  # seconds between writer housekeeping (failure commits, time-based shard flush)
BATCH_LINGER = 0.005  # seconds the model thread waits for more rows before running a short batch


@dataclass(frozen=True)
class RunSummary:
    """What one run did; printed as JSON with `--json` and stored in the index's runs table."""

    run_id: str
    model: str
    fingerprint: str
    status: str  # completed | interrupted | failed (the cache could not be written, or Ray gave up: see `error`)
    exit_code: int
    rows: int
    encoded: int
    cached: int
    refreshed: int
    content_dedup: int
    duplicates: int
    failed: int
    new_failures: int  # failed rows that had not failed before (or failed another way): these make exit 1
    retried_failures: int  # earlier failures tried again (retryable, settings changed, or --retry-permanent-after)
    skipped_failed: int
    skipped_other: int
    other_shard: int
    failures_by_kind: dict[str, int]
    bytes_fetched: int
    duration_s: float
    images_per_s: float
    cache_dir: str
    errors_file: str
    error: str | None = None  # why a failed run stopped
    # Entries of this model cached under other decode options, not reused by this run: [{decode, flags, entries}]
    other_decodes: list[dict[str, Any]] = field(default_factory=list)
    # Seconds from the command's start (model loading included) to the first encoded batch; None: none encoded
    first_batch_s: float | None = None
    # Seconds the model's weights took to load while the run was already loading rows; None: loaded before
    model_load_s: float | None = None
    rows_left: int | None = None  # interrupted: rows of the manifests not done (None: total unknown)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Prepared:
    """A decoded, preprocessed row on its way to the model."""

    record: Record
    key: str
    inputs: dict[str, torch.Tensor]
    content_sha256: str
    etag: str | None
    last_modified: str | None


@dataclass
class _Encoded:
    row: _Prepared
    outputs: dict[str, torch.Tensor]
    dedup: bool = False  # copied from a cached entry with the same bytes, not encoded


@dataclass
class _Failed:
    failure: FailureRecord


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
        self.failures = FailurePolicy(settings.load, settings.retry_permanent_after)
        self.encoder = encoder  # .name, .family, .fingerprint and .preprocess work before the weights are loaded
        self.layout = CacheLayout(settings.out)
        self.fingerprint = encoder.fingerprint
        batch = settings.model.batch_size
        self._model_q: queue.Queue[Any] = queue.Queue(maxsize=2 * batch)
        self._writer_q: queue.Queue[Any] = queue.Queue(maxsize=4 * batch + settings.load.concurrency)
        self._writer_error: BaseException | None = None
        self._local = threading.local()  # per decode thread: read-only index and reader for content dedup
        self._readers: list[Any] = []
        self.adopted: list[str] = []
        self.other_decodes: list[dict[str, Any]] = []
        self._vllm_ids: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()  # --vllm-model-id, for the writer

    def run(self) -> RunSummary:
        """Run to completion (or until SIGINT/SIGTERM), flush everything, return the summary; ModelLoadError
        (after recording the run as failed) when the weights of an EncoderHandle fail to load."""
        held = self.lock is not None and self.lock.held
        with contextlib.nullcontext() if held else WriterLock(self.layout.root, wait=self.settings.wait_lock):
            try:
                summary = self._run_locked()
            except (OSError, sqlite3.Error) as exc:  # a full disk at start-up (later, the writer ends the run as failed)
                raise CacheWriteError(cache_write_message(exc)) from exc
        if self.model_error is not None:
            raise self.model_error
        return summary

    def _run_locked(self) -> RunSummary:
        self.layout.errors.mkdir(parents=True, exist_ok=True)
        index = CacheIndex(self.layout.index)
        try:
            self.adopted = adopt_orphans(index, self.layout)  # a crashed run's written-but-unindexed shards
            self.find_other_decodes(index, self.encoder.base_fingerprint)
            index.start_run(self.run_id, self.fingerprint, self.encoder.name)
        finally:
            index.close()
        self._open_lookup()
        writer = threading.Thread(target=self._writer_loop, name="mmprep-writer", daemon=True)
        model = threading.Thread(target=self._model_loop, name="mmprep-model", daemon=True)
        writer.start()
        model.start()
        if self.reporter is not None:
            self.reporter.start(self.counters, self.manifests)
        try:
            asyncio.run(self.produce())
        finally:
            self._model_q.put(_STOP)
            model.join()
            self._writer_q.put(_STOP)
            writer.join()
            self._lookup.close()
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

    def find_other_decodes(self, index: CacheIndex, base: str) -> None:
        """Say at start (and in the summary) when the cache holds entries of this model (`base`: its
        fingerprint without decode options) decoded another way: this run does not reuse them (a changed
        --decode-as default would re-encode them all)."""
        self.other_decodes = [
            {"decode": options, "flags": " ".join(decode_flags(options, profile=True)), "entries": count}
            for options, count in index.decode_variants(self.fingerprint, base)
        ]
        if self.reporter is not None:
            for other in self.other_decodes:
                self.reporter.note(other_decode_message(other, self.settings.load))

    def _open_lookup(self) -> None:
        """The read-only index connection and the per-run key lookup that classify() asks."""
        self._lookup = CacheIndex(self.layout.index, readonly=True)
        # refresh needs each entry's validators; --vllm-model-id may re-fetch an entry to hash its bytes
        detail = self.settings.refresh_older_than is not None or self.settings.vllm_model_id is not None
        self._keys = KeyLookup(self._lookup, self.fingerprint, self.run_id, detail=detail)

    # -- loading-half hooks ---------------------------------------------------------------------

    def classify(self, chunk: list[Record | BadLine], keys: list[str | None] | None = None) -> list[Any]:
        """One batched index query per chunk, under the in-flight lock so that no row can finish
        between the query and the check (it would otherwise be fetched twice)."""
        keys = keys_of(chunk) if keys is None else keys
        with self._inflight_lock:
            inflight = self._inflight
            return [INFLIGHT if key in inflight else state for key, state in zip(keys, self._keys.states(keys))]

    def plan(self, key: str, state: Any) -> Plan | None:
        c = self.counters  # state: None (unknown), INFLIGHT or a KeyState
        if state is INFLIGHT or (state is not None and state.run_id == self.run_id):
            c.duplicates += 1
            return None
        plan = PLAIN
        if state is not None and state.cached:
            age = self.settings.refresh_older_than
            if age is not None and (state.checked is None or time.time() - state.checked >= age):
                plan = Plan(state.etag, state.last_modified, state.content_sha256, refresh=True)
            elif self._needs_vllm_identifier(key):  # fetched once more (not re-encoded) to hash its bytes
                plan = Plan(content_sha256=state.content_sha256, refresh=True)
            else:
                c.cached += 1
                return None
        failed_before = state is not None and state.failed_kind is not None
        if failed_before and not self.failures.retries(state):
            c.skipped_failed += 1
            return None
        if self.settings.retry_failed and not failed_before:
            c.skipped_other += 1
            return None
        if not self.claim(key):  # same URL twice within one chunk
            c.duplicates += 1
            return None
        c.retried += failed_before
        return plan

    def handle(self, record: Record, key: str, fetched: Fetched, plan: Plan) -> None:
        """Decode thread: unchanged refresh → touch; known bytes → copy; else decode + preprocess → model."""
        sha = hashlib.sha256(fetched.data).hexdigest()
        if plan.refresh and sha == plan.content_sha256:
            self._identify(sha, fetched.data)
            self._writer_q.put(_Checked(key, fetched.etag, fetched.last_modified))
            return
        row = _Prepared(record, key, {}, sha, fetched.etag, fetched.last_modified)
        twin = self._stored_twin(sha, key)
        if twin is not None:
            self._identify(sha, fetched.data)
            self.counters.content_dedup += 1
            self._writer_q.put(_Encoded(row, twin, dedup=True))
            return
        image = decode_image(fetched.data, self.load)
        self._identify(sha, fetched.data)  # after the decode: only bytes known to be an allowed image are opened
        row.inputs = self.encoder.preprocess(image)
        self._model_q.put(row)

    def _needs_vllm_identifier(self, key: str) -> bool:
        model_id = self.settings.vllm_model_id
        return model_id is not None and not self._lookup.has_vllm_identifier(self.fingerprint, key, model_id)

    def _identify(self, sha: str, data: bytes) -> None:
        """--vllm-model-id: vLLM's identifier of these image bytes, queued for the writer."""
        model_id = self.settings.vllm_model_id
        if model_id is not None:
            self._vllm_ids.put((sha, model_id, vllm_image_identifier(data, model_id)))

    async def not_modified(self, record: Record, key: str, plan: Plan) -> None:
        await self._to_writer(_Checked(key, None, None))

    async def record_failure(self, failure: FailureRecord) -> None:
        await self._to_writer(_Failed(failure))

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
            batch: list[_Prepared] = [first]
            while len(batch) < batch_size:
                try:
                    item = self._model_q.get(timeout=BATCH_LINGER)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            results = self._encode(encoder, batch)
            encoded = sum(isinstance(r, _Encoded) for r in results)
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

    def _encode(self, encoder: Encoder, batch: list[_Prepared]) -> list[_Encoded | _Failed]:
        """Encode a batch; if the batch fails, encode row by row so one bad row fails alone."""
        try:
            fault_point("in_encode")
            outputs = encoder.encode([row.inputs for row in batch])
            return [_Encoded(row, out) for row, out in zip(batch, outputs)]
        except Exception as exc:
            if len(batch) == 1:
                error = RowError(ErrorKind.ENCODE_ERROR, f"{type(exc).__name__}: {exc}")
                return [_Failed(failure_of(batch[0].record, batch[0].key, error))]
        results: list[_Encoded | _Failed] = []
        for row in batch:
            results.extend(self._encode(encoder, [row]))
        return results

    # -- writer thread --------------------------------------------------------------------------

    def _writer_loop(self) -> None:
        index = CacheIndex(self.layout.index)
        shards = ShardWriter(self.layout, self.fingerprint, self.encoder.name, self.run_id, self.encoder.family)
        failures: list[FailureRecord] = []
        checked: list[_Checked] = []
        errors_file = open(self.layout.run_errors(self.run_id), "w", encoding="utf-8")
        self._pending_dedup = 0  # content-dedup rows in the shard being filled
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
                    index.register_model(self.fingerprint, self.encoder.name, self.encoder.family, item.description)
                elif isinstance(item, _Encoded):
                    shards.add(self._entry_of(item))
                    self._pending_dedup += item.dedup
                elif isinstance(item, _Failed):
                    failures.append(item.failure)
                    errors_file.write(json.dumps(item.failure.as_json()) + "\n")
                    self.counters.failed += 1
                    self.counters.failures_by_kind[item.failure.kind] += 1
                elif isinstance(item, _Checked):
                    checked.append(item)
                if shards.pending_bytes >= self.settings.shard_bytes or (
                    shards.pending_count and shards.pending_age() >= self.settings.flush_seconds
                ):
                    self._flush_shard(index, shards)
                if len(failures) + len(checked) >= FAILURE_FLUSH_ROWS or ((failures or checked) and item is None):
                    self._flush_small(index, failures, checked, errors_file)
            self._flush_shard(index, shards)
            self._flush_small(index, failures, checked, errors_file)
        except BaseException as exc:  # the cache cannot be written: stop the run loudly
            self._writer_error = exc
            self.stop_signal = self.stop_signal or signal.SIGTERM
            if not stopped:  # the last flush can fail after _STOP: waiting for another would hang the run
                _drain(self._writer_q)
        finally:
            errors_file.close()
            index.close()

    def _entry_of(self, item: _Encoded) -> ShardEntry:
        r = item.row.record
        return ShardEntry(
            key=item.row.key,
            url=stored_url(r.url),
            caller_id=r.id,
            tensors=dict(item.outputs),
            content_sha256=item.row.content_sha256,
            created=time.time(),
            etag=item.row.etag,
            last_modified=item.row.last_modified,
        )

    def _flush_shard(self, index: CacheIndex, shards: ShardWriter) -> None:
        written = shards.flush()
        self._flush_identifiers(index)
        if written is None:
            return
        fault_point("after_shard_write")
        index.commit_shard(written, self.fingerprint, self.run_id)
        self.release(e.key for e in written.entries)
        self.counters.committed += len(written.entries)
        self.counters.committed_dedup += self._pending_dedup
        self._pending_dedup = 0

    def _flush_identifiers(self, index: CacheIndex) -> None:
        rows = []
        while not self._vllm_ids.empty():
            rows.append(self._vllm_ids.get())
        if rows:
            index.record_vllm_identifiers(rows)

    def _flush_small(
        self, index: CacheIndex, failures: list[FailureRecord], checked: list[_Checked], errors_file: Any
    ) -> None:
        self._flush_identifiers(index)
        if checked:
            index.mark_checked(self.fingerprint, [(c.key, c.etag, c.last_modified) for c in checked])
            self.release(c.key for c in checked)
            self.counters.refreshed += len(checked)
            checked.clear()
        if failures:
            errors_file.flush()
            self.counters.new_failures += index.record_failures(
                self.fingerprint, self.run_id, failures, self.failures.depends
            )
            self.release(f.key for f in failures)
            failures.clear()

    # -- end ------------------------------------------------------------------------------------

    def _load_seconds(self) -> float | None:
        """How long the weights of an EncoderHandle took to load during this run (None: loaded before, or not loaded)."""
        seconds = self.encoder.load_seconds if isinstance(self.encoder, EncoderHandle) else None
        return None if seconds is None else round(seconds, 3)

    def _finish(self) -> RunSummary:
        c = self.counters
        status, code = self.exit_status(c.new_failures > 0)
        if self.model_error is not None:
            code = EXIT_USAGE  # as when the model fails to load before the run: the same error, the same exit
        errors_path = self.layout.run_errors(self.run_id)
        summary = RunSummary(
            run_id=self.run_id,
            model=self.encoder.name,
            fingerprint=self.fingerprint,
            status=status,
            exit_code=code,
            rows=c.rows,
            encoded=c.committed - c.committed_dedup,
            cached=c.cached,
            refreshed=c.refreshed,
            content_dedup=c.committed_dedup,
            duplicates=c.duplicates,
            failed=c.failed,
            new_failures=c.new_failures,
            retried_failures=c.retried,
            skipped_failed=c.skipped_failed,
            skipped_other=c.skipped_other,
            other_shard=c.other_shard,
            failures_by_kind=dict(sorted(c.failures_by_kind.items())),
            bytes_fetched=c.bytes_fetched,
            duration_s=round(c.elapsed(), 3),
            images_per_s=round(c.images_per_s(), 2),
            cache_dir=str(self.layout.root),
            errors_file=str(errors_path),
            error=self.run_error,
            other_decodes=self.other_decodes,
            first_batch_s=None if self._first_batch_at is None else round(self._first_batch_at - self._started, 3),
            model_load_s=self._load_seconds(),
            rows_left=None if status != "interrupted" or c.total is None else max(c.total - c.done, 0),
        )
        try:
            _publish_latest(errors_path, self.layout.latest_errors)
            index = CacheIndex(self.layout.index)
            try:
                index.finish_run(self.run_id, status, code, summary.as_json())
            finally:
                index.close()
        except (OSError, sqlite3.Error) as exc:
            if self.run_error is None:
                raise
            logger.warning("could not record the failed run in the index: %s", exc)  # the summary still goes out
        return summary


def other_decode_message(other: dict[str, Any], load: LoadSettings) -> str:
    """One line telling how to keep using entries cached under other decode options."""
    this = " ".join(decode_flags(pixel_options(load), profile=True))
    return (
        f"note: the cache holds {other['entries']} entries of this model decoded with {other['flags']}, "
        f"which this run ({this}) does not reuse; to keep using them, run with {other['flags']}"
    )


def cache_write_message(exc: BaseException) -> str:
    """How a run reports the OS or SQLite error that stopped it writing the cache."""
    return f"cannot write the cache: {type(exc).__name__}: {exc}"


def _drain(q: queue.Queue[Any]) -> None:
    """Keep emptying `q` until _STOP so producers blocked on put() can finish."""
    while q.get() is not _STOP:
        pass


def _publish_latest(run_errors: Path, latest: Path) -> None:
    """Make errors.jsonl a copy of this run's error records (atomically replaced)."""
    tmp = latest.with_name(latest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(run_errors, tmp)
    except OSError:
        shutil.copyfile(run_errors, tmp)
    os.replace(tmp, latest)
