"""mmprep: precompute vision-model embeddings for image manifests into a safetensors cache."""

from __future__ import annotations

__version__ = "0.1.0"

from mmprep.keys import cache_key

__all__ = ["__version__", "cache_key"]
