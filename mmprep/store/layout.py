"""Where things live inside a cache directory (docs/cache.md#cache-layout)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "index.sqlite"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
SHARD_FORMAT = "mmprep.shard"
SHARD_FORMAT_VERSION = "1"
GRID_SUFFIX = ".image_grid_thw"  # second tensor of a Qwen2-VL entry: "<key>.image_grid_thw"
EMBEDDINGS = "embeddings"  # the one tensor every entry has, stored under the bare key
_TENSOR_NAME = re.compile(r"[a-z][a-z0-9_]*")


def shard_tensor_name(key: str, name: str) -> str:
    """Where an entry's tensor `name` lives in a shard: "<key>" for the embeddings, "<key>.<name>" for the rest."""
    if name == EMBEDDINGS:
        return key
    if not _TENSOR_NAME.fullmatch(name):
        raise ValueError(f"tensor name {name!r} cannot be stored: expected lowercase letters, digits and '_'")
    return f"{key}.{name}"


def entry_tensor_name(key: str, stored: str) -> str:
    """The inverse of `shard_tensor_name`: an entry's tensor name from its name in the shard."""
    if stored == key:
        return EMBEDDINGS
    if not stored.startswith(key + "."):
        raise ValueError(f"shard tensor {stored!r} does not belong to entry {key}")
    return stored[len(key) + 1 :]


@dataclass(frozen=True)
class CacheLayout:
    """Paths of one cache directory."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / INDEX_NAME

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    @property
    def quarantine(self) -> Path:
        """Damaged shards `verify --repair` took out of the cache, kept for inspection (never read)."""
        return self.root / "quarantine"

    @property
    def latest_errors(self) -> Path:
        return self.root / "errors.jsonl"

    def shard_dir(self, fingerprint: str) -> Path:
        """Shards are grouped by model fingerprint (first 16 hex digits)."""
        return self.shards / fingerprint[:16]

    def shard_path(self, name: str) -> Path:
        """`name` is the shard's path relative to `shards/`, as stored in the index."""
        return self.shards / name

    def run_errors(self, run_id: str) -> Path:
        return self.errors / f"{run_id}.jsonl"
