"""Manifest reading: every supported format streamed into `Record`s (or `BadLine`s) in bounded memory.

The format comes from the file extension (docs/manifests.md#manifest-format): `.parquet`, `.csv`, `.tsv`,
`.txt` (one URL a line); anything else, and stdin, is JSONL. All but parquet may be gzipped.
"""

from mmprep.manifest.formats import check_readable, manifest_format, read_manifest, read_manifests, rowless_manifests
from mmprep.manifest.jsonl import parse_line
from mmprep.manifest.records import BadLine, Record
from mmprep.manifest.source import MAX_LINE_CHARS

__all__ = [
    "MAX_LINE_CHARS", "BadLine", "Record", "check_readable", "manifest_format", "parse_line", "read_manifest", "rowless_manifests",
    "read_manifests",
]  # fmt: skip
