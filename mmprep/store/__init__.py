"""The cache directory: safetensors shards, the SQLite index, and the operations on both.

Names are imported lazily so that light modules (the writer lock, stats) do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheIndex": "mmprep.store.index",
    "FailureRecord": "mmprep.store.index",
    "ReadOnlyIndex": "mmprep.store.index",
    "open_readonly": "mmprep.store.index",
    "CacheLayout": "mmprep.store.layout",
    "ShardEntry": "mmprep.store.shards",
    "ShardWriter": "mmprep.store.shards",
    "WriterLock": "mmprep.store.lock",
    "cache_stats": "mmprep.store.stats",
    "verify_cache": "mmprep.store.verify",
    "rebuild_index": "mmprep.store.rebuild",
    "collect_garbage": "mmprep.store.gc",
    "EmbeddingCache": "mmprep.store.reader",
    "CachedEmbedding": "mmprep.store.reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmprep.store' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
