"""mmprep: precompute vision-model embeddings for image manifests into a safetensors cache.

Public API: `cache_key(url)` (the entry key of a URL) and `EmbeddingCache` (the serving-side reader).
"""

from __future__ import annotations

from typing import Any

from mmprep.keys import cache_key
from mmprep.version import __version__

__all__ = ["EmbeddingCache", "CachedEmbedding", "__version__", "cache_key"]


def __getattr__(name: str) -> Any:
    if name in ("EmbeddingCache", "CachedEmbedding"):  # lazy: importing mmprep must not import torch
        from mmprep.store import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'mmprep' has no attribute {name!r}")
