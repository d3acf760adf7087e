"""The cache writer of an encode run, used by both engines: the run's row in the index (started, then
finished with its summary), shard commits, failure records (errors/<run_id>.jsonl and the index),
re-validated entries and vLLM identifiers.

It is the only writer of the index during a run: the local engine's writer thread or the Ray driver
calls it, one thread at a time. An entry row is committed only after its shard is durable (the caller
hands over written shards), and a key is released (`release`) only once its row is committed or its
failure recorded, so no row is fetched twice in a run.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprep.imaging.decode import decode_flags, pixel_options
from mmprep.pipeline.core import RunCounters
from mmprep.settings import LoadSettings
from mmprep.store.index import CacheIndex, FailureRecord, entry_rows
from mmprep.store.layout import CacheLayout
from mmprep.store.rebuild import adopt_orphans
from mmprep.store.shards import WrittenShard

logger = logging.getLogger("mmprep.pipeline")


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


class CacheWriter:
    """Writes one run's rows into the cache index; `begin()` opens it (and adopts a crashed run's shards)."""

    def __init__(
        self, layout: CacheLayout, fingerprint: str, model: str, run_id: str, counters: RunCounters,
        depends: Mapping[str, str], release: Callable[[Iterable[str]], None] | None = None,
    ) -> None:  # fmt: skip
        """`depends`: the settings each failure kind depended on in this run (stored with its failures);
        `release`: called with the keys whose rows are finished (committed, re-validated or failed)."""
        self.layout = layout
        self.fingerprint = fingerprint
        self.model = model
        self.run_id = run_id
        self.counters = counters
        self.depends = depends
        self.release = release
        self.adopted: list[str] = []
        self.errors_path = layout.run_errors(run_id)
        self._index: CacheIndex | None = None
        self._errors: Any = None
        self._failures: list[FailureRecord] = []
        self._checked: list[tuple[str, str | None, str | None]] = []
        self._identifiers: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()

    def begin(self) -> CacheWriter:
        """Open the index (creating it), adopt a crashed run's written-but-unindexed shards, record the run
        as running and open its errors file. Raises OSError / sqlite3.Error when the cache cannot be written."""
        self.layout.errors.mkdir(parents=True, exist_ok=True)
        self._index = CacheIndex(self.layout.index)
        try:
            self.adopted = adopt_orphans(self._index, self.layout)
            self._index.start_run(self.run_id, self.fingerprint, self.model)
            self._errors = open(self.errors_path, "w", encoding="utf-8")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._errors is not None:
            self._errors.close()
            self._errors = None
        if self._index is not None:
            self._index.close()
            self._index = None

    @property
    def index(self) -> CacheIndex:
        assert self._index is not None, "CacheWriter.begin() first"
        return self._index

    # -- what the cache holds -------------------------------------------------------------------

    def other_decodes(self, base_fingerprint: str) -> list[dict[str, Any]]:
        """Entries of this model (`base_fingerprint`: its fingerprint without decode options) cached under
        other decode options, which this run does not reuse: [{decode, flags, entries}]."""
        return [
            {"decode": options, "flags": " ".join(decode_flags(options, profile=True)), "entries": count}
            for options, count in self.index.decode_variants(self.fingerprint, base_fingerprint)
        ]

    def adopt_orphans(self) -> list[str]:
        """Index shards written under the cache but never committed (a Ray actor that died before reporting)."""
        return adopt_orphans(self.index, self.layout)

    # -- rows -----------------------------------------------------------------------------------

    def register_model(self, family: str, description: dict[str, Any]) -> None:
        """The model's row in the models table; before its first entry is committed."""
        self.index.register_model(self.fingerprint, self.model, family, description)

    def commit_shard(self, written: WrittenShard, dedup: int = 0) -> None:
        """Index a durable shard written by this process; `dedup`: how many of its entries are content copies."""
        rows = entry_rows(written, self.fingerprint, self.run_id)
        self.commit_rows(written.name, written.nbytes, written.sha256, rows)
        self.counters.committed_dedup += dedup

    def commit_rows(self, name: str, nbytes: int, sha256: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Index a durable shard from its description (`entry_rows`; a shard another process wrote)."""
        self.flush_identifiers()  # an entry's identifier is known before the entry is
        self.index.commit_rows(name, self.fingerprint, self.run_id, nbytes, sha256, rows)
        self._release(row[1] for row in rows)  # entry_rows: (fingerprint, key, ...)
        self.counters.committed += len(rows)

    def failed(self, failure: FailureRecord) -> None:
        """A row failed: written to the run's errors file now, to the index at the next `flush()`."""
        self._errors.write(json.dumps(failure.as_json()) + "\n")
        self._failures.append(failure)
        self.counters.failed += 1
        self.counters.failures_by_kind[failure.kind] += 1

    def checked(self, key: str, etag: str | None, last_modified: str | None) -> None:
        """A cached entry's source was re-validated unchanged (304 or the same bytes); indexed at `flush()`."""
        self._checked.append((key, etag, last_modified))

    def identified(self, content_sha256: str, model_id: str, identifier: str) -> None:
        """vLLM's identifier of some image bytes (--vllm-model-id); any thread may call this."""
        self._identifiers.put((content_sha256, model_id, identifier))

    @property
    def pending(self) -> int:
        """Failures and re-validations waiting for `flush()`."""
        return len(self._failures) + len(self._checked)

    def flush(self) -> None:
        """Index what is pending: identifiers, re-validated entries, failures (after the errors file)."""
        self.flush_identifiers()
        if self._checked:
            self.index.mark_checked(self.fingerprint, self._checked)
            self._release(key for key, _, _ in self._checked)
            self.counters.refreshed += len(self._checked)
            self._checked.clear()
        if self._failures:
            self._errors.flush()
            self.counters.new_failures += self.index.record_failures(
                self.fingerprint, self.run_id, self._failures, self.depends
            )
            self._release(f.key for f in self._failures)
            self._failures.clear()

    def flush_identifiers(self) -> None:
        rows = []
        while not self._identifiers.empty():
            rows.append(self._identifiers.get())
        if rows:
            self.index.record_vllm_identifiers(rows)

    def _release(self, keys: Iterable[str]) -> None:
        if self.release is not None:
            self.release(keys)

    # -- end ------------------------------------------------------------------------------------

    def finish(self, summary: RunSummary) -> None:
        """Publish the run's errors file as errors.jsonl and record the run as finished, on a connection of
        its own (the writer's may be the one that failed). A run that failed to write the cache still
        returns its summary: the failure to record it is only logged."""
        try:
            _publish_latest(self.errors_path, self.layout.latest_errors)
            index = CacheIndex(self.layout.index)
            try:
                index.finish_run(self.run_id, summary.status, summary.exit_code, summary.as_json())
            finally:
                index.close()
        except (OSError, sqlite3.Error) as exc:
            if summary.error is None:
                raise
            logger.warning("could not record the failed run in the index: %s", exc)  # the summary still goes out


def summarize(
    counters: RunCounters, *, run_id: str, model: str, fingerprint: str, status: str, exit_code: int,
    layout: CacheLayout, error: str | None, other_decodes: list[dict[str, Any]],
    first_batch_s: float | None = None, model_load_s: float | None = None,
) -> RunSummary:  # fmt: skip
    """The summary of a run from its counters (encoded rows counted once committed)."""
    c = counters
    return RunSummary(
        run_id=run_id,
        model=model,
        fingerprint=fingerprint,
        status=status,
        exit_code=exit_code,
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
        cache_dir=str(layout.root),
        errors_file=str(layout.run_errors(run_id)),
        error=error,
        other_decodes=other_decodes,
        first_batch_s=first_batch_s,
        model_load_s=model_load_s,
        rows_left=None if status != "interrupted" or c.total is None else max(c.total - c.done, 0),
    )


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


def _publish_latest(run_errors: Path, latest: Path) -> None:
    """Make errors.jsonl a copy of this run's error records (atomically replaced)."""
    tmp = latest.with_name(latest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(run_errors, tmp)
    except OSError:
        shutil.copyfile(run_errors, tmp)
    os.replace(tmp, latest)
