"""Where things live inside a cache directory (README: "Cache layout")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "index.sqlite"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
SHARD_FORMAT = "mmprep.shard"
SHARD_FORMAT_VERSION = "1"
GRID_SUFFIX = ".image_grid_thw"  # second tensor of a Qwen2-VL entry: "<key>.image_grid_thw"


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
