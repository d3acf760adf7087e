"""`--format vllm-ec`: vLLM's ECExampleConnector store, so that a stock vLLM (`ec_role: ec_consumer`) skips
its vision encoder for every exported image.

The store (vllm/distributed/ec_transfer/ec_connector/example_connector.py) keeps one directory per
multimodal item: `<STORE>/<identifier>/encoder_cache.safetensors`, one tensor `ec_cache` = that
image's element of the model's `embed_multimodal()`. The connector checks `os.path.exists` of the
file and loads it without any validation, so one bad file kills the engine; hence:

- each new entry is written under `<STORE>/.mmprep-staging/` (same file system), fsynced, and its
  directory renamed into place (over the empty directory a vLLM miss leaves, if any); a changed
  entry is replaced by renaming a new file over the old one;
- the row count is checked against the image's grid before anything is written;
- entries already in the store are skipped after reading only their header (their metadata names
  the cache entry's content sha256 and model fingerprint), so a rerun writes nothing;
- `mmprep-ec-store.json` at the root records the model fingerprint; another model is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mmprep.version import __version__
from mmprep.errors import ExportFormatError, UsageError
from mmprep.export.progress import ExportCounters, ProgressReporter
from mmprep.export.source import CacheSource, ExportRow, ListedRow
from mmprep.faults import fault_point
from mmprep.serving.formats import EcLayout, ServingFormatError, vllm_ec_layout
from mmprep.settings import ExportSettings
from mmprep.store.lock import WriterLock
from mmprep.store.shards import fsync_dir, write_atomic

STORE_MANIFEST = "mmprep-ec-store.json"
STORE_FORMAT = "mmprep.vllm-ec"
ENTRY_FILE = "encoder_cache.safetensors"  # ECExampleConnector._generate_filename_debug
TENSOR = "ec_cache"
STAGING = ".mmprep-staging"
REPLACING = ".encoder_cache.safetensors.mmprep.tmp"  # a replacement being written inside an entry directory
_MAX_HEADER = 1 << 20


@dataclass
class EcReport:
    """What one vllm-ec export did."""

    store: str
    model: str
    fingerprint: str
    key: str  # url | vllm
    entries: int  # entries of the model considered
    written: int  # new entries
    replaced: int  # entries whose stored tensor differed
    skipped: int  # already in the store, unchanged
    refused: list[str]  # entries not written: their tensor does not fit their grid
    missing_identifier: int  # --key vllm: entries without a recorded vLLM identifier
    pruned: int  # empty directories removed (--prune-empty)
    bytes: int  # bytes written
    vanished: int  # entries removed (by a concurrent gc) between listing and reading
    duration_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.refused or self.missing_identifier else 0

    def summary_line(self) -> str:
        line = (
            f"vllm-ec store {self.store} (--key {self.key}): {self.written} written, {self.replaced} replaced, "
            f"{self.skipped} skipped (already there), {self.bytes} bytes, {self.duration_s:.1f}s"
        )
        if self.pruned:
            line += f"; {self.pruned} empty directories pruned"
        if self.refused:
            line += f"; {len(self.refused)} refused (row count does not match the grid)"
        if self.missing_identifier:
            line += f"; {self.missing_identifier} without a vLLM identifier (run encode with --vllm-model-id)"
        return line


def export_vllm_ec(settings: ExportSettings, reporter: ProgressReporter | None = None) -> EcReport:
    """Bring the store up to date with the cache: write what is missing or changed, skip the rest."""
    store = settings.out.absolute()
    with CacheSource(settings.cache_dir, settings.model, settings.batch_rows) as source:
        try:
            layout = vllm_ec_layout(source.family, source.info)
        except ServingFormatError as exc:
            raise ExportFormatError(str(exc)) from None
        if store.exists() and not store.is_dir():
            raise UsageError(f"--out {store} is a file; give the store's directory")
        with WriterLock(store, wait=0):
            _claim_store(store, source)
            shutil.rmtree(store / STAGING, ignore_errors=True)  # what a killed export left (never visible)
            report = EcReport(
                store=str(store), model=source.model_name, fingerprint=source.fingerprint, key=settings.key,
                entries=source.count(), written=0, replaced=0, skipped=0, refused=[], missing_identifier=0,
                pruned=prune_empty(store) if settings.prune_empty else 0, bytes=0, vanished=0,
            )  # fmt: skip
            model_id = settings.vllm_model_id if settings.key == "vllm" else None
            if model_id is not None:
                report.missing_identifier = source.without_vllm_identifier(model_id)
            counters = ExportCounters(report.entries - report.missing_identifier, unit="entries")
            if reporter is not None:
                reporter.start(counters)
            try:
                for listed in source.listing(vllm_model_id=model_id):
                    _export_batch(source, layout, store, listed, report, counters)
            finally:
                shutil.rmtree(store / STAGING, ignore_errors=True)
                if reporter is not None:
                    reporter.stop(counters)
        report.vanished = source.vanished
        report.duration_s = round(counters.elapsed(), 3)
        return report


def _export_batch(
    source: CacheSource,
    layout: EcLayout,
    store: Path,
    listed: list[ListedRow],
    report: EcReport,
    counters: ExportCounters,
) -> None:
    """Skip the listed entries the store holds unchanged (header read only); read and write the others."""
    todo: list[ListedRow] = []
    identifiers: dict[str, str] = {}  # entry key -> directory name
    taken: set[str] = set()
    for row in listed:
        identifier = row.vllm_identifier or row.key
        meta = _stored_meta(store / identifier / ENTRY_FILE)
        same = (meta.get("content_sha256"), meta.get("fingerprint")) == (row.content_sha256, source.fingerprint)
        if same or identifier in taken:  # --key vllm: the same bytes under two URLs make one entry
            report.skipped += 1
        else:
            todo.append(row)
            identifiers[row.key] = identifier
            taken.add(identifier)
    staged: list[tuple[str, int]] = []
    for row in source.load(todo) if todo else []:
        blob = _entry_blob(store, identifiers[row.key], row, layout, source.fingerprint, report)
        if blob is None:
            continue
        target = store / identifiers[row.key] / ENTRY_FILE
        if target.exists():
            _replace_file(target, blob)
            report.replaced += 1
            report.bytes += len(blob)
        else:
            _stage(store, identifiers[row.key], blob)
            staged.append((identifiers[row.key], len(blob)))
    _publish(store, staged, report)
    counters.done = report.skipped + report.written + report.replaced + len(report.refused)
    counters.written, counters.replaced, counters.skipped = report.written, report.replaced, report.skipped
    counters.bytes = report.bytes


def _entry_blob(
    store: Path, identifier: str, row: ExportRow, layout: EcLayout, fingerprint: str, report: EcReport
) -> bytes | None:
    """The entry's file content, or None when it is refused (row count) or the store already has its tensor."""
    try:
        tensor = layout.checked(row.entry).contiguous()
    except ServingFormatError as exc:
        report.refused.append(f"{row.url}: {exc}")
        return None
    target = store / identifier / ENTRY_FILE
    if target.exists() and _same_tensor(target, tensor):
        report.skipped += 1  # e.g. written by a vLLM producer, or by mmprep before a re-encode with equal output
        return None
    meta = {"format": STORE_FORMAT, "key": row.key, "content_sha256": row.content_sha256,
            "fingerprint": fingerprint, "mmprep_version": __version__}  # fmt: skip
    return save({TENSOR: tensor}, metadata=meta)


def _stage(store: Path, identifier: str, blob: bytes) -> None:
    """Write a new entry whole under the staging area (made durable, for a batch at once, by `_publish`)."""
    staged = store / STAGING / identifier
    staged.mkdir(parents=True, exist_ok=True)
    (staged / ENTRY_FILE).write_bytes(blob)


def _publish(store: Path, staged: list[tuple[str, int]], report: EcReport) -> None:
    """Make a batch of staged entries durable (files, then their directories), then rename each directory
    into place (over the empty directory a vLLM miss leaves behind, if any); one fsync of the store at the end."""
    if not staged:
        return
    for identifier, _size in staged:
        fd = os.open(store / STAGING / identifier / ENTRY_FILE, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(store / STAGING / identifier)
    for identifier, size in staged:
        fault_point("ec_before_rename")
        staged_dir, final = store / STAGING / identifier, store / identifier
        try:
            os.rename(staged_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            _replace_file(final / ENTRY_FILE, (staged_dir / ENTRY_FILE).read_bytes())  # the directory holds other files
            shutil.rmtree(staged_dir, ignore_errors=True)
        report.written += 1
        report.bytes += size
    fsync_dir(store)


def _replace_file(target: Path, blob: bytes) -> None:
    """Swap the entry's file for a new one in one rename (a reader holds the old file or the new one)."""
    tmp = target.with_name(REPLACING)
    write_atomic(tmp, blob)  # fsynced under its temporary name first
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _stored_meta(path: Path) -> dict[str, str]:
    """The safetensors metadata of an entry file ({} when absent or unreadable): the header only."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _same_tensor(path: Path, tensor: torch.Tensor) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            stored = f.get_tensor(TENSOR) if TENSOR in f.keys() else None
    except (OSError, SafetensorError):
        return False
    return stored is not None and stored.dtype == tensor.dtype and torch.equal(stored, tensor)


def _claim_store(store: Path, source: CacheSource) -> None:
    """Record the model in the store's manifest, or refuse a store that holds another model."""
    path = store / STORE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError) as exc:
        raise UsageError(f"unreadable store manifest {path}: {exc}") from None
    if manifest is not None:
        if manifest.get("fingerprint") != source.fingerprint:
            raise ExportFormatError(
                f"the store {store} holds entries of model {manifest.get('model')} "
                f"({str(manifest.get('fingerprint'))[:16]}), not {source.model_name} ({source.fingerprint[:16]}): "
                "a vLLM store serves one model; give this one its own --out"
            )
        return
    manifest = {"format": STORE_FORMAT, "version": 1, "fingerprint": source.fingerprint, "model": source.model_name,
                "family": source.family, "created": time.time(), "mmprep_version": __version__}  # fmt: skip
    write_atomic(path, json.dumps(manifest, indent=2).encode())


def prune_empty(store: Path) -> int:
    """Remove the empty entry directories vLLM's lookups create on misses; returns how many."""
    pruned = 0
    with os.scandir(store) as it:
        for item in it:
            if item.name.startswith(".") or not item.is_dir(follow_symlinks=False):
                continue
            try:
                os.rmdir(item.path)  # fails, and is left alone, unless empty
            except OSError:
                continue
            pruned += 1
    return pruned


def read_entry(store: Path, identifier: str) -> Any:
    """The `ec_cache` tensor of one entry, as vLLM loads it (for tests and `mmprep show`-like checks)."""
    from safetensors.torch import load_file

    return load_file(str(store / identifier / ENTRY_FILE))[TENSOR]
