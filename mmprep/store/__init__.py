"""The cache directory: safetensors shards, the SQLite index, and readers of both."""

from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.layout import CacheLayout
from mmprep.store.shards import ShardEntry, ShardWriter
from mmprep.store.stats import cache_stats

__all__ = ["CacheIndex", "CacheLayout", "FailureRecord", "ShardEntry", "ShardWriter", "cache_stats"]
