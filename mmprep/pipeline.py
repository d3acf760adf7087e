"""One `mmprep encode` run: manifest → fetch → decode → encode → shards + index, all overlapping.

Stages and the threads they run on:
  event loop (main thread)   reads the manifest in chunks, looks keys up in the index in batches,
                             fetches rows concurrently (at most `concurrency` in flight);
  decode pool (N threads)    decode_image + the model's image processor, then hands the row to
                             the model queue (blocking when the model is behind: backpressure);
  model thread (1)           batches rows and runs the encoder;
  writer thread (1)          owns the index connection: shards, entry rows, failures, errors.jsonl.
Every queue is bounded, and finished rows leave no per-row state behind, so memory stays flat
however long the manifest is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmprep.decode import decode_image
from mmprep.errors import ErrorKind, RowError
from mmprep.faults import fault_point
from mmprep.fetch import Fetcher
from mmprep.keys import cache_key, stored_url
from mmprep.manifest import BadLine, Record, read_manifests
from mmprep.models import Encoder
from mmprep.settings import Settings
from mmprep.store.index import CacheIndex, FailureRecord, KeyState
from mmprep.store.layout import CacheLayout
from mmprep.store.lock import WriterLock
from mmprep.store.rebuild import adopt_orphans
from mmprep.store.shards import ShardEntry, ShardWriter

MANIFEST_CHUNK = 512  # records read and looked up in the index at a time
FAILURE_FLUSH_ROWS = 256
WRITER_TICK = 0.5  # seconds between writer housekeeping (failure commits, time-based shard flush)

EXIT_OK, EXIT_ROWS_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 130, 143


@dataclass
class RunCounters:
    """Live counts of one run, shared by all stages (ints updated under the GIL)."""

    rows: int = 0  # records read from the manifests (bad lines included)
    encoded: int = 0  # newly encoded and committed
    cached: int = 0  # already in the cache before this run
    duplicates: int = 0  # same URL again within this run
    failed: int = 0
    skipped_failed: int = 0  # failed permanently in an earlier run; not retried
    skipped_other: int = 0  # not attempted because --retry-failed limits the run to earlier failures
    bytes_fetched: int = 0
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return (
            self.encoded + self.cached + self.duplicates + self.failed + self.skipped_failed + self.skipped_other
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def images_per_s(self) -> float:
        elapsed = self.elapsed()
        return self.encoded / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class RunSummary:
    """What one run did; printed as JSON with `--json` and stored in the index's runs table."""

    run_id: str
    model: str
    fingerprint: str
    status: str  # completed | interrupted
    exit_code: int
    rows: int
    encoded: int
    cached: int
    duplicates: int
    failed: int
    skipped_failed: int
    skipped_other: int
    failures_by_kind: dict[str, int]
    bytes_fetched: int
    duration_s: float
    images_per_s: float
    cache_dir: str
    errors_file: str

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


@dataclass
class _Failed:
    failure: FailureRecord


_STOP = object()


class EncodeRun:
    """Runs one manifest through the pipeline into a cache directory."""

    def __init__(self, manifests: list[str], settings: Settings, encoder: Encoder, reporter: Any = None) -> None:
        self.manifests = manifests
        self.settings = settings
        self.encoder = encoder
        self.reporter = reporter
        self.layout = CacheLayout(settings.out)
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.counters = RunCounters()
        self.fingerprint = encoder.fingerprint
        self._inflight: set[str] = set()  # keys between "started" and "committed to the index"
        self._inflight_lock = threading.Lock()
        batch = settings.model.batch_size
        self._model_q: queue.Queue[Any] = queue.Queue(maxsize=2 * batch)
        self._writer_q: queue.Queue[Any] = queue.Queue(maxsize=4 * batch + settings.load.concurrency)
        self._stop_signal: int | None = None
        self._writer_error: BaseException | None = None
        self.adopted: list[str] = []

    # -- public ------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Run to completion (or until SIGINT/SIGTERM), flush everything, return the summary."""
        with WriterLock(self.layout.root, wait=self.settings.wait_lock):
            return self._run_locked()

    def _run_locked(self) -> RunSummary:
        self.layout.errors.mkdir(parents=True, exist_ok=True)
        index = CacheIndex(self.layout.index)
        try:
            self.adopted = adopt_orphans(index, self.layout)  # a crashed run's written-but-unindexed shards
            index.register_model(self.fingerprint, self.encoder.name, self.encoder.family, self.encoder.describe())
            index.start_run(self.run_id, self.fingerprint, self.encoder.name)
        finally:
            index.close()

        writer = threading.Thread(target=self._writer_loop, name="mmprep-writer", daemon=True)
        model = threading.Thread(target=self._model_loop, name="mmprep-model", daemon=True)
        writer.start()
        model.start()
        if self.reporter is not None:
            self.reporter.start(self.counters)
        try:
            asyncio.run(self._produce())
        finally:
            self._model_q.put(_STOP)
            model.join()
            self._writer_q.put(_STOP)
            writer.join()
            if self.reporter is not None:
                self.reporter.stop(self.counters)
        if self._writer_error is not None:
            raise self._writer_error
        return self._finish()

    # -- event loop: manifest, lookups, fetch --------------------------------------------------

    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        load = self.settings.load
        slots = asyncio.Semaphore(load.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        chunks = _chunks(read_manifests(self.manifests), MANIFEST_CHUNK)
        decode_pool = ThreadPoolExecutor(max_workers=load.decode_workers, thread_name_prefix="mmprep-decode")
        lookup = CacheIndex(self.layout.index, readonly=True)
        try:
            async with Fetcher(load) as fetcher:
                while self._stop_signal is None:
                    chunk = await asyncio.to_thread(next, chunks, None)
                    if chunk is None:
                        break
                    states = await asyncio.to_thread(self._key_states, lookup, chunk)
                    for item, state in zip(chunk, states):
                        self.counters.rows += 1
                        if isinstance(item, BadLine):
                            await self._fail_line(item)
                            continue
                        key = cache_key(item.url)
                        if not self._should_fetch(key, state):
                            continue
                        await slots.acquire()
                        if self._stop_signal is not None:
                            slots.release()
                            self._release(key)
                            break
                        task = asyncio.create_task(self._load_row(item, key, fetcher, decode_pool, slots))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                if self._stop_signal is not None:
                    for task in tasks:
                        task.cancel()  # rows still fetching are simply not done; a rerun picks them up
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            lookup.close()
            decode_pool.shutdown(wait=True)

    def _key_states(self, lookup: CacheIndex, chunk: list[Record | BadLine]) -> list[KeyState | str | None]:
        """Classify a chunk of rows in one batched query; holds the in-flight lock so no row
        can finish between the query and the check (it would otherwise be fetched twice)."""
        keys = [cache_key(r.url) for r in chunk if isinstance(r, Record)]
        with self._inflight_lock:
            known = lookup.key_states(self.fingerprint, keys)
            out: list[KeyState | str | None] = []
            for r in chunk:
                if isinstance(r, BadLine):
                    out.append(None)
                    continue
                key = cache_key(r.url)
                out.append("inflight" if key in self._inflight else known.get(key))
            return out

    def _should_fetch(self, key: str, state: KeyState | str | None) -> bool:
        """Decide what to do with a row from its index state; claims the key when it is to be fetched."""
        c = self.counters
        if state == "inflight" or (isinstance(state, KeyState) and state.run_id == self.run_id):
            c.duplicates += 1
            return False
        if isinstance(state, KeyState) and state.cached:
            c.cached += 1
            return False
        failed_before = isinstance(state, KeyState) and state.failed_kind is not None
        if failed_before and not state.failed_retryable:  # type: ignore[union-attr]
            c.skipped_failed += 1
            return False
        if self.settings.retry_failed and not failed_before:
            c.skipped_other += 1
            return False
        with self._inflight_lock:
            if key in self._inflight:  # same URL twice within one chunk
                c.duplicates += 1
                return False
            self._inflight.add(key)
        return True

    def _release(self, key: str) -> None:
        with self._inflight_lock:
            self._inflight.discard(key)

    async def _load_row(
        self, record: Record, key: str, fetcher: Fetcher, pool: ThreadPoolExecutor, slots: asyncio.Semaphore
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                fetched = await fetcher.fetch(record.url)
                assert fetched is not None  # no conditional request was made
                fault_point("after_fetch")
                self.counters.bytes_fetched += len(fetched.data)
                await loop.run_in_executor(pool, self._prepare, record, key, fetched)
            except RowError as exc:
                await self._fail_row(record, key, exc)
            except asyncio.CancelledError:
                self._release(key)
                raise
            except Exception as exc:  # a bug: record it, keep the run going
                await self._fail_row(record, key, RowError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            slots.release()

    def _prepare(self, record: Record, key: str, fetched: Any) -> None:
        """Decode thread: bytes → RGB image → model inputs, then queue for the model (may block)."""
        image = decode_image(fetched.data, self.settings.load)
        try:
            inputs = self.encoder.preprocess(image)
        except RowError:
            raise
        except Exception as exc:
            raise RowError(ErrorKind.PREPROCESS_ERROR, f"{type(exc).__name__}: {exc}") from exc
        row = _Prepared(
            record=record,
            key=key,
            inputs=inputs,
            content_sha256=hashlib.sha256(fetched.data).hexdigest(),
            etag=fetched.etag,
            last_modified=fetched.last_modified,
        )
        self._model_q.put(row)

    async def _fail_row(self, record: Record, key: str, exc: RowError) -> None:
        failure = FailureRecord(
            key=key,
            url=stored_url(record.url),
            caller_id=record.id,
            source=record.source,
            line=record.line,
            kind=exc.kind.value,
            message=exc.message,
            retryable=exc.retryable,
            attempts=exc.attempts,
            status=exc.status,
        )
        await self._to_writer(_Failed(failure))

    async def _fail_line(self, bad: BadLine) -> None:
        key = "line:" + hashlib.sha256(f"{bad.source}:{bad.line}".encode()).hexdigest()
        failure = FailureRecord(
            key=key, url=None, caller_id=None, source=bad.source, line=bad.line,
            kind=ErrorKind.BAD_MANIFEST_LINE.value, message=bad.message, retryable=False, attempts=1,
        )
        await self._to_writer(_Failed(failure))

    async def _to_writer(self, item: Any) -> None:
        try:
            self._writer_q.put_nowait(item)
        except queue.Full:
            await asyncio.to_thread(self._writer_q.put, item)

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass

    def _on_signal(self, signum: int) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
            if self.reporter is not None:
                self.reporter.note("stopping: finishing the in-flight batch, flushing the shard…")

    # -- model thread ----------------------------------------------------------------------------

    def _model_loop(self) -> None:
        batch_size = self.settings.model.batch_size
        stopping = False
        while not stopping:
            first = self._model_q.get()
            if first is _STOP:
                break
            batch: list[_Prepared] = [first]
            while len(batch) < batch_size:
                try:
                    item = self._model_q.get(timeout=0.005)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            for item in self._encode(batch):
                self._writer_q.put(item)

    def _encode(self, batch: list[_Prepared]) -> list[_Encoded | _Failed]:
        """Encode a batch; if the batch fails, encode row by row so one bad row fails alone."""
        try:
            fault_point("in_encode")
            outputs = self.encoder.encode([row.inputs for row in batch])
            return [_Encoded(row, out) for row, out in zip(batch, outputs)]
        except Exception as exc:
            if len(batch) == 1:
                row = batch[0]
                return [_Failed(self._failure_of(row, ErrorKind.ENCODE_ERROR, f"{type(exc).__name__}: {exc}"))]
        results: list[_Encoded | _Failed] = []
        for row in batch:
            results.extend(self._encode([row]))
        return results

    def _failure_of(self, row: _Prepared, kind: ErrorKind, message: str) -> FailureRecord:
        r = row.record
        url = stored_url(r.url)
        return FailureRecord(row.key, url, r.id, r.source, r.line, kind.value, message, False, 1)

    # -- writer thread ---------------------------------------------------------------------------

    def _writer_loop(self) -> None:
        index = CacheIndex(self.layout.index)
        shards = ShardWriter(self.layout, self.fingerprint, self.encoder.name, self.run_id)
        failures: list[FailureRecord] = []
        errors_file = open(self.layout.run_errors(self.run_id), "w", encoding="utf-8")
        try:
            while True:
                try:
                    item = self._writer_q.get(timeout=WRITER_TICK)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if isinstance(item, _Encoded):
                    shards.add(self._entry_of(item))
                elif isinstance(item, _Failed):
                    failures.append(item.failure)
                    errors_file.write(json.dumps(item.failure.as_json()) + "\n")
                if shards.pending_bytes >= self.settings.shard_bytes or (
                    shards.pending_count and shards.pending_age() >= self.settings.flush_seconds
                ):
                    self._flush_shard(index, shards)
                if len(failures) >= FAILURE_FLUSH_ROWS or (failures and item is None):
                    self._flush_failures(index, failures, errors_file)
            self._flush_shard(index, shards)
            self._flush_failures(index, failures, errors_file)
        except BaseException as exc:  # the cache cannot be written: stop the run loudly
            self._writer_error = exc
            self._stop_signal = self._stop_signal or signal.SIGTERM
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
            embeddings=item.outputs["embeddings"],
            image_grid_thw=item.outputs.get("image_grid_thw"),
            content_sha256=item.row.content_sha256,
            created=time.time(),
            etag=item.row.etag,
            last_modified=item.row.last_modified,
        )

    def _flush_shard(self, index: CacheIndex, shards: ShardWriter) -> None:
        written = shards.flush()
        if written is None:
            return
        fault_point("after_shard_write")
        index.commit_shard(written, self.fingerprint, self.run_id)
        with self._inflight_lock:
            for e in written.entries:
                self._inflight.discard(e.key)
        self.counters.encoded += len(written.entries)

    def _flush_failures(self, index: CacheIndex, failures: list[FailureRecord], errors_file: Any) -> None:
        if not failures:
            return
        errors_file.flush()
        index.record_failures(self.fingerprint, self.run_id, failures)
        with self._inflight_lock:
            for f in failures:
                self._inflight.discard(f.key)
        self.counters.failed += len(failures)
        self.counters.failures_by_kind.update(f.kind for f in failures)
        failures.clear()

    # -- end ---------------------------------------------------------------------------------------

    def _finish(self) -> RunSummary:
        c = self.counters
        if self._stop_signal == signal.SIGINT:
            status, code = "interrupted", EXIT_SIGINT
        elif self._stop_signal == signal.SIGTERM:
            status, code = "interrupted", EXIT_SIGTERM
        else:
            status, code = "completed", (EXIT_ROWS_FAILED if c.failed or c.skipped_failed else EXIT_OK)
        errors_path = self.layout.run_errors(self.run_id)
        _publish_latest(errors_path, self.layout.latest_errors)
        summary = RunSummary(
            run_id=self.run_id,
            model=self.encoder.name,
            fingerprint=self.fingerprint,
            status=status,
            exit_code=code,
            rows=c.rows,
            encoded=c.encoded,
            cached=c.cached,
            duplicates=c.duplicates,
            failed=c.failed,
            skipped_failed=c.skipped_failed,
            skipped_other=c.skipped_other,
            failures_by_kind=dict(sorted(c.failures_by_kind.items())),
            bytes_fetched=c.bytes_fetched,
            duration_s=round(c.elapsed(), 3),
            images_per_s=round(c.images_per_s(), 2),
            cache_dir=str(self.layout.root),
            errors_file=str(errors_path),
        )
        index = CacheIndex(self.layout.index)
        try:
            index.finish_run(self.run_id, status, code, summary.as_json())
        finally:
            index.close()
        return summary


def _chunks(items: Iterator[Record | BadLine], size: int) -> Iterator[list[Record | BadLine]]:
    chunk: list[Record | BadLine] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
