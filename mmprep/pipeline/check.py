"""`mmprep check`: the loading half alone — fetch, decode and (with a model) its image processor.

A preflight before a nightly GPU job, and our way to measure the loader by itself. It writes
nothing to a cache; error records go to one JSONL file in the same format as encode's.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmprep.imaging.decode import decode_image
from mmprep.errors import UsageError
from mmprep.fetch import Fetched
from mmprep.manifest import Record
from mmprep.pipeline.core import LoadingRun, Plan
from mmprep.settings import LoadSettings
from mmprep.store.index import FailureRecord


@dataclass(frozen=True)
class CheckSummary:
    """What a check found; `ok` rows would have been encodable."""

    run_id: str
    status: str
    exit_code: int
    rows: int
    ok: int
    failed: int
    duplicates: int
    other_shard: int
    failures_by_kind: dict[str, int]
    bytes_fetched: int
    duration_s: float
    images_per_s: float
    bytes_per_s: float
    errors_file: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CheckRun(LoadingRun):
    """Loads every row like encode would, then drops the result."""

    def __init__(
        self,
        manifests: list[str],
        load: LoadSettings,
        errors_file: Path,
        prepare: Callable[[Image.Image], Any] | None = None,
        reporter: Any = None,
    ) -> None:
        super().__init__(manifests, load, reporter)
        self.errors_file = errors_file
        self.prepare = prepare  # the model's image processor, or a resize, or None (decode only)
        self._errors_lock = threading.Lock()
        self._errors: Any = None

    def run(self) -> CheckSummary:
        try:
            self.errors_file.parent.mkdir(parents=True, exist_ok=True)
            self._errors = open(self.errors_file, "w", encoding="utf-8")
        except OSError as exc:  # a directory, no permission, a read-only file system, ...
            raise UsageError(f"cannot write the error records to {self.errors_file}: {exc.strerror or exc}") from exc
        with self._errors:
            if self.reporter is not None:
                self.reporter.start(self.counters, self.manifests)
            try:
                asyncio.run(self.produce())
            finally:
                if self.reporter is not None:
                    self.reporter.stop(self.counters)
        c = self.counters
        status, code = self.exit_status(bool(c.failed))
        elapsed = max(c.elapsed(), 1e-9)
        return CheckSummary(
            run_id=self.run_id,
            status=status,
            exit_code=code,
            rows=c.rows,
            ok=c.encoded,
            failed=c.failed,
            duplicates=c.duplicates,
            other_shard=c.other_shard,
            failures_by_kind=dict(sorted(c.failures_by_kind.items())),
            bytes_fetched=c.bytes_fetched,
            duration_s=round(elapsed, 3),
            images_per_s=round(c.encoded / elapsed, 2),
            bytes_per_s=round(c.bytes_fetched / elapsed, 1),
            errors_file=str(self.errors_file),
        )

    def handle(self, record: Record, key: str, fetched: Fetched, plan: Plan) -> None:
        try:
            image = decode_image(fetched.data, self.load)
            if self.prepare is not None:
                self.prepare(image)
            with self._errors_lock:  # decode threads count concurrently
                self.counters.encoded += 1
        finally:
            self.release([key])

    async def record_failure(self, failure: FailureRecord) -> None:
        with self._errors_lock:
            self._errors.write(json.dumps(failure.as_json()) + "\n")
            self.counters.failed += 1
            self.counters.failures_by_kind[failure.kind] += 1
        self.release([failure.key])
