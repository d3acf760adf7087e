"""The loading half shared by `encode` and `check`: manifest → skip or claim → fetch → decode.

Threads: a helper thread reads the manifest a chunk at a time, hashes each row's key once, classifies
the chunk with one batched lookup and plans every row (skip and count, or claim and load), so rows
that need no fetch (a cached rerun) never touch the event loop. (A separate reader thread running
ahead measured slower: two threads of Python work on the GIL cost more than the overlap with SQLite
won.) The event loop (main thread) then fetches the rows to load concurrently (at most `concurrency`
in flight); a pool of decode threads turns bytes into model inputs and hands each row on (blocking
when the next stage is behind: backpressure). Subclasses decide what to do with a row's bytes.
Nothing is kept per finished row, so memory stays flat for any manifest length.

What to do with each row (skip and count why, or load it with which Plan) is a `ChunkPlanner`'s call:
this module's knows only --shard and this run's claims (`check`); encode's (planner.py) also asks the
index. Both engines of `encode` use that one planner.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmprep.errors import (
    EXIT_OK,
    EXIT_ROWS_FAILED,
    EXIT_RUN_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ErrorKind,
    RowError,
)
from mmprep.faults import fault_point
from mmprep.fetch import Fetched, Fetcher
from mmprep.keys import cache_key, stored_url
from mmprep.manifest import BadLine, Record, read_manifests
from mmprep.settings import LoadSettings
from mmprep.store.index import FailureRecord

MANIFEST_CHUNK = 2048  # records read, hashed, looked up and planned at a time
INFLIGHT = "inflight"  # state of a key another row of this run is already loading


@dataclass
class RunCounters:
    """Live counts of one run, shared by all stages (ints updated under the GIL)."""

    rows: int = 0  # records read from the manifests so far (bad lines included)
    rows_expected: int | None = None  # estimate of all the manifests' rows (None: unknown, e.g. stdin or gzip)
    manifests_read: bool = False  # every manifest read to its end: `rows` is the total
    encoded: int = 0  # rows out of the model (for `check`: loaded fine); moves every batch
    committed: int = 0  # rows whose entries are committed to the index (encoded and content_dedup)
    committed_dedup: int = 0  # ... of which content_dedup
    cached: int = 0  # already in the cache before this run
    refreshed: int = 0  # cached rows re-validated unchanged (--refresh-older-than)
    content_dedup: int = 0  # new URL, same bytes as a cached entry: stored without encoding
    duplicates: int = 0  # same URL again within this run
    failed: int = 0  # rows that failed in this run
    new_failures: int = 0  # ... that had not failed before, or failed in another way (recorded so far)
    retried: int = 0  # earlier failures tried again (retryable, settings changed, or expired)
    skipped_failed: int = 0  # failed permanently in an earlier run; not retried
    skipped_other: int = 0  # not attempted because --retry-failed limits the run to earlier failures
    other_shard: int = 0  # rows that belong to another --shard part
    bytes_fetched: int = 0
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        """Rows finished one way or another (encoded rows count once out of the model, before their commit)."""
        return (
            self.encoded + self.content_dedup + self.cached + self.refreshed + self.duplicates + self.failed
            + self.skipped_failed + self.skipped_other + self.other_shard
        )  # fmt: skip

    @property
    def total(self) -> int | None:
        """All rows of the manifests: exact once they are read, else the estimate (never below what was read)."""
        if self.manifests_read:
            return self.rows
        return None if self.rows_expected is None else max(self.rows_expected, self.rows)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def images_per_s(self) -> float:
        """Images through the model per second (content dedup and cached rows excluded)."""
        elapsed = self.elapsed()
        return self.encoded / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    """How to fetch a claimed row: plain, or as a conditional re-validation of a cached entry."""

    etag: str | None = None
    last_modified: str | None = None
    content_sha256: str | None = None  # refresh: the cached entry's content hash
    refresh: bool = False


PLAIN = Plan()  # a plain fetch (shared: a Plan is immutable)


@dataclass
class ChunkWork:
    """What one manifest chunk leaves for the event loop: rows to load (already claimed) and bad lines."""

    loads: list[tuple[Record, str, Plan]]
    bad_lines: list[FailureRecord]


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def failure_of(record: Record, key: str, exc: RowError) -> FailureRecord:
    """The error record of a row (data URLs by hash, never verbatim)."""
    return FailureRecord(
        key=key, url=stored_url(record.url), caller_id=record.id, source=record.source, line=record.line,
        kind=exc.kind.value, message=exc.message, retryable=exc.retryable, attempts=exc.attempts, status=exc.status,
    )  # fmt: skip


def bad_line_failure(bad: BadLine) -> FailureRecord:
    key = "line:" + hashlib.sha256(f"{bad.source}:{bad.line}".encode()).hexdigest()
    return FailureRecord(
        key=key, url=None, caller_id=bad.id, source=bad.source, line=bad.line,
        kind=ErrorKind.BAD_MANIFEST_LINE.value, message=bad.message, retryable=False, attempts=1,
    )  # fmt: skip


class Claims(Protocol):
    """The keys a run has claimed (is loading, or has planned): each key is loaded once per run."""

    lock: Any  # held while a planner reads the claims and the index together (a context manager)

    def claim(self, key: str) -> bool:
        """Claim `key`; False when it was claimed already."""
        ...

    def held(self, keys: list[str | None]) -> list[bool]:
        """Whether each key is claimed now (None: a bad line, never)."""
        ...


class InflightKeys:
    """The keys a local run has claimed and not yet finished (a set in memory: it holds rows in flight only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._keys: set[str] = set()

    def claim(self, key: str) -> bool:
        with self.lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release(self, keys: Iterable[str]) -> None:
        """The rows of these keys are finished (committed, failed, or never started): no longer in flight."""
        with self.lock:
            self._keys.difference_update(keys)

    def held(self, keys: list[str | None]) -> list[bool]:
        """Call under `lock` when the answer must agree with another read (the index) made meanwhile."""
        return [key is not None and key in self._keys for key in keys]


class ChunkPlanner:
    """Decides what a run does with each row of a manifest chunk; this one knows only --shard and the
    run's claims (a row seen twice is a duplicate). Encode's planner also asks the index (planner.py)."""

    def __init__(self, load: LoadSettings, counters: RunCounters, claims: Claims) -> None:
        self.load = load
        self.counters = counters
        self.claims = claims

    def plan_chunk(self, chunk: list[Record | BadLine]) -> ChunkWork:
        """Key each row once, classify the chunk in one go, and plan every row this --shard part owns."""
        keys = keys_of(chunk)
        self.counters.rows += len(chunk)
        work = ChunkWork([], [])
        for item, key, state in zip(chunk, keys, self.classify(keys)):
            if key is None:
                failure = bad_line_failure(item)  # type: ignore[arg-type]  # no key: item is a BadLine
                if self.owns(failure.key):
                    work.bad_lines.append(failure)
            elif self.owns(key):
                plan = self.plan(key, state)
                if plan is not None:
                    work.loads.append((item, key, plan))  # type: ignore[arg-type]  # a key: item is a Record
        return work

    def classify(self, keys: list[str | None]) -> list[Any]:
        """One state per key (None for a bad line); here only INFLIGHT (claimed already) or None."""
        with self.claims.lock:
            return [INFLIGHT if held else None for held in self.claims.held(keys)]

    def plan(self, key: str, state: Any) -> Plan | None:
        """Whether to load a row (a Plan) or not (None, after counting why)."""
        if state is INFLIGHT or not self.claims.claim(key):
            self.counters.duplicates += 1
            return None
        return PLAIN

    def owns(self, key: str) -> bool:
        """Whether this process's --shard part holds `key` (always, without --shard)."""
        if self.load.shard is None or self.load.shard.owns(key):
            return True
        self.counters.other_shard += 1
        return False


class LoadingRun:
    """Reads manifests and loads rows concurrently; `planner` says which, subclasses supply the sink."""

    def __init__(self, manifests: list[str], load: LoadSettings, reporter: Any = None) -> None:
        self.manifests = manifests
        self.load = load
        self.reporter = reporter
        self.run_id = new_run_id()
        self.counters = RunCounters()
        self.stop_signal: int | None = None
        self.run_error: str | None = None  # set when the run gives up before its end (exit 70)
        self.claims = InflightKeys()  # keys claimed by this run and not yet finished
        self.planner = ChunkPlanner(load, self.counters, self.claims)  # encode puts its own in
        self._count_lock = threading.Lock()  # counters updated from several decode threads
        self._loop: asyncio.AbstractEventLoop | None = None  # produce()'s, while it runs
        self._fetching: set[asyncio.Task[Any]] = set()  # row tasks awaiting their fetch (event loop only)

    # -- hooks -------------------------------------------------------------------------------------

    def handle(self, record: Record, key: str, fetched: Fetched, plan: Plan) -> None:
        """Decode thread: do the work for one row's bytes; raise RowError for a bad row."""
        raise NotImplementedError

    async def not_modified(self, record: Record, key: str, plan: Plan) -> None:
        """The server answered 304 to a conditional refresh."""
        raise NotImplementedError

    async def record_failure(self, failure: FailureRecord) -> None:
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------

    def release(self, keys: Iterable[str]) -> None:
        """These rows are finished (or were never started): another row of the same key may load again."""
        self.claims.release(keys)

    async def produce(self) -> None:
        """Run the loading half until the manifests are exhausted or a signal arrives."""
        self._loop = asyncio.get_running_loop()
        self._install_signal_handlers(self._loop)
        slots = asyncio.Semaphore(self.load.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        records = read_manifests(self.manifests, self.load.manifest)
        chunks = chunked(records, MANIFEST_CHUNK)
        pool = ThreadPoolExecutor(max_workers=self.load.decode_workers, thread_name_prefix="mmprep-decode")
        try:
            async with Fetcher(self.load) as fetcher:
                while self.stop_signal is None:
                    work = await asyncio.to_thread(self._next_chunk, chunks)
                    if work is None:
                        break
                    for failure in work.bad_lines:
                        await self.record_failure(failure)
                    for i, (record, key, plan) in enumerate(work.loads):
                        await slots.acquire()
                        if self.stop_signal is not None:
                            slots.release()
                            self.release(k for _, k, _ in work.loads[i:])  # claimed, never started
                            break
                        task = asyncio.create_task(self._load_row(record, key, plan, fetcher, pool, slots))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                if self.stop_signal is not None:
                    self._cancel_fetches()  # also when the writer (not a signal) stopped the run
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._loop = None
            chunks.close()
            records.close()  # closes the open manifest
            pool.shutdown(wait=True)

    def _next_chunk(self, chunks: Iterator[list[Record | BadLine]]) -> ChunkWork | None:
        """Helper thread: read the next chunk and plan it (the planner keys and classifies it in one lookup)."""
        chunk = next(chunks, None)
        if chunk is None:
            self.counters.manifests_read = True
            return None
        return self.planner.plan_chunk(chunk)

    async def _load_row(
        self, record: Record, key: str, plan: Plan, fetcher: Fetcher, pool: ThreadPoolExecutor,
        slots: asyncio.Semaphore,
    ) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            try:
                if fetcher.policy.is_local(record.url):  # read on the decode thread: one trip there, not two
                    if self.stop_signal is not None:
                        raise asyncio.CancelledError  # stopped before it was read: not done, not a failure
                    await loop.run_in_executor(pool, self._read_and_handle, record, key, plan, fetcher)
                    return
                fetched = await self._fetch(record, plan, fetcher)
                fault_point("after_fetch")
                if fetched is None:
                    await self.not_modified(record, key, plan)
                    return
                self.counters.bytes_fetched += len(fetched.data)
                await loop.run_in_executor(pool, self.handle, record, key, fetched, plan)
            except RowError as exc:
                await self.record_failure(failure_of(record, key, exc))
            except asyncio.CancelledError:  # stopped while fetching: not done, not a failure; a rerun fetches it
                self.release([key])
                raise
            except Exception as exc:  # a bug: record it, keep the run going
                error = RowError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
                await self.record_failure(failure_of(record, key, error))
        finally:
            slots.release()

    def _read_and_handle(self, record: Record, key: str, plan: Plan, fetcher: Fetcher) -> None:
        """Decode thread: a local file or data URL read, then handled (the event loop only schedules it)."""
        fetched = fetcher.fetch_local(record.url)
        fault_point("after_fetch")
        with self._count_lock:  # counted from several decode threads
            self.counters.bytes_fetched += len(fetched.data)
        self.handle(record, key, fetched, plan)

    async def _fetch(self, record: Record, plan: Plan, fetcher: Fetcher) -> Fetched | None:
        """The row's fetch, which a stop cancels (_cancel_fetches); a row that gets here after a stop is not fetched."""
        if self.stop_signal is not None:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None  # always: _load_row runs as a task
        self._fetching.add(task)
        try:
            return await fetcher.fetch(record.url, etag=plan.etag, last_modified=plan.last_modified)
        finally:
            self._fetching.discard(task)

    def _cancel_fetches(self) -> None:
        """Event loop: cancel the rows still fetching, so a stop does not wait out their timeouts and retries.
        Rows past their fetch (decoding, queued for the model) are left to finish and be committed."""
        for task in self._fetching:
            task.cancel()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self.on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass

    def on_signal(self, signum: int) -> None:
        """Stop taking new rows and cancel the fetches in flight; rows already fetched finish and are flushed."""
        if self.stop_signal is None:
            self.halt(signum)
            if self.reporter is not None:
                self.reporter.note("stopping: finishing the in-flight rows and flushing…")

    def halt(self, signum: int = signal.SIGTERM) -> None:
        """Stop taking new rows and cancel the fetches in flight (from any thread): a signal, or a run that failed."""
        if self.stop_signal is None:
            self.stop_signal = signum
            loop = self._loop
            if loop is not None:  # call_soon_threadsafe: a handler may run outside the loop (Ray's signal.signal)
                try:
                    loop.call_soon_threadsafe(self._cancel_fetches)
                except RuntimeError:  # the loop closed meanwhile: nothing is fetching any more
                    pass

    def exit_status(self, rows_failed: bool) -> tuple[str, int]:
        return exit_status(self.run_error, self.stop_signal, rows_failed)


def exit_status(run_error: str | None, stop_signal: int | None, rows_failed: bool) -> tuple[str, int]:
    """A run's status and exit code: failed (70) before interrupted (130/143) before rows failed (1)."""
    if run_error is not None:
        return "failed", EXIT_RUN_FAILED
    if stop_signal == signal.SIGINT:
        return "interrupted", EXIT_SIGINT
    if stop_signal == signal.SIGTERM:
        return "interrupted", EXIT_SIGTERM
    return "completed", EXIT_ROWS_FAILED if rows_failed else EXIT_OK


def keys_of(chunk: list[Record | BadLine]) -> list[str | None]:
    """The entry key of every record of a chunk, computed once (None for bad lines)."""
    return [None if isinstance(item, BadLine) else cache_key(item.url) for item in chunk]


def chunked(items: Iterator[Record | BadLine], size: int) -> Generator[list[Record | BadLine], None, None]:
    """`items` in lists of `size` (the last one shorter); closing this closes `items` (and its file)."""
    chunk: list[Record | BadLine] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
