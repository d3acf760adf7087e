"""Safetensors shards: entries accumulate in memory and land on disk atomically, one file at a time."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmprep.version import __version__
from mmprep.faults import fault_point
from mmprep.store.layout import (
    SHARD_FORMAT,
    SHARD_FORMAT_VERSION,
    SHARD_SUFFIX,
    TMP_SUFFIX,
    CacheLayout,
    shard_tensor_name,
)

if TYPE_CHECKING:  # torch is imported by the writer only: verify/gc reuse this module's file helpers
    import torch


@dataclass(frozen=True)
class ShardEntry:
    """One encoded image waiting for (or written to) a shard: its named tensors ("embeddings" and the
    family's others, e.g. "image_grid_thw") and where the image came from."""

    key: str
    url: str  # as stored: data URLs are replaced by "data:sha256=<hex>"
    caller_id: str | None
    tensors: dict[str, torch.Tensor]  # name -> tensor; "embeddings" always present
    content_sha256: str
    created: float
    etag: str | None = None
    last_modified: str | None = None

    def __post_init__(self) -> None:
        if "embeddings" not in self.tensors:
            raise ValueError(f"entry {self.key[:16]} has no 'embeddings' tensor (has {sorted(self.tensors)})")
        for name in self.tensors:
            shard_tensor_name(self.key, name)  # rejects names that cannot be stored

    @property
    def embeddings(self) -> torch.Tensor:
        return self.tensors["embeddings"]

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        return self.tensors.get("image_grid_thw")

    @property
    def tensor_names(self) -> list[str]:
        """The names in the shard: "<key>" for the embeddings first, then "<key>.<name>" for the others."""
        return [shard_tensor_name(self.key, name) for name in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under their shard names, contiguous (what safetensors stores)."""
        return {shard_tensor_name(self.key, name): t.contiguous() for name, t in self.tensors.items()}

    def describe(self) -> dict[str, object]:
        """The entry's self-description stored in the shard metadata (enough to rebuild the index)."""
        return {
            "key": self.key,
            "url": self.url,
            "id": self.caller_id,
            "content_sha256": self.content_sha256,
            "created": self.created,
            "tensors": self.tensor_names,
            "etag": self.etag,
            "last_modified": self.last_modified,
        }


@dataclass(frozen=True)
class WrittenShard:
    """A shard that is durable on disk, ready to be committed to the index."""

    name: str  # relative to shards/
    entries: list[ShardEntry]
    nbytes: int
    sha256: str


@dataclass
class ShardWriter:
    """Collects entries of one model and writes them as `shards/<fp16>/<run>-<seq>.safetensors`.

    Each shard is serialised in memory, written to a temporary name, fsynced and renamed into
    place, so a reader never sees a partial shard and a crash leaves at most a `.tmp` file.
    """

    layout: CacheLayout
    fingerprint: str
    model_name: str
    run_id: str
    family: str | None = None  # recorded in each shard, so `index rebuild` restores it without the index
    _pending: list[ShardEntry] = field(default_factory=list)
    _pending_bytes: int = 0
    _oldest: float | None = None
    _seq: int = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def pending_age(self) -> float:
        """Seconds since the oldest pending entry was added (0 when empty)."""
        return 0.0 if self._oldest is None else time.monotonic() - self._oldest

    def add(self, entry: ShardEntry) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._pending.append(entry)
        self._pending_bytes += entry.nbytes

    def flush(self) -> WrittenShard | None:
        """Write the pending entries as one durable shard; None when nothing is pending."""
        if not self._pending:
            return None
        entries, self._pending, self._pending_bytes, self._oldest = self._pending, [], 0, None
        tensors: dict[str, torch.Tensor] = {}
        for e in entries:
            tensors.update(e.shard_tensors())
        metadata = {
            "format": SHARD_FORMAT,
            "format_version": SHARD_FORMAT_VERSION,
            "mmprep_version": __version__,
            "model_fingerprint": self.fingerprint,
            "model": self.model_name,
            "run_id": self.run_id,
            **({"model_family": self.family} if self.family else {}),
            "entries": json.dumps([e.describe() for e in entries], separators=(",", ":")),
        }
        from safetensors.torch import save

        blob = save(tensors, metadata=metadata)
        self._seq += 1
        directory = self.layout.shard_dir(self.fingerprint)
        name = f"{directory.name}/{self.run_id}-{self._seq:05d}{SHARD_SUFFIX}"
        write_atomic(self.layout.shard_path(name), blob)
        return WrittenShard(name=name, entries=entries, nbytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that it appears whole or not at all, and survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("before_shard_rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written shard
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
