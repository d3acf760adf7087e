"""One settings object carries every option from the CLI down; defaults live here and nowhere else."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024

DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
DEFAULT_CACHE_DIR = "mmprep-cache"
DECODE_PROFILES: tuple[str, ...] = ("vllm", "hf", "pil")  # --decode-as: whose image loader the pixels mirror
DEFAULT_DECODE_AS = "vllm"  # what vLLM's server computes from the same image (docs/serving.md#decode-profiles)
RETRY_PERMANENT_AFTER = 7 * 86400.0  # --retry-permanent-after: a permanent failure is tried again after a week
RAY_WORKER_RESTARTS = 3  # --worker-restarts: restarts of a dead Ray encoder actor (Ray Data's own default: forever)


DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (examples: 30d, 12h, 90m, 45s)")
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


def duration_text(seconds: float) -> str:
    """Seconds as the largest whole unit parse_duration reads back: 604800 -> '7d', 90 -> '90s' (for --help)."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % DURATION_UNITS[unit] == 0:
            return f"{seconds / DURATION_UNITS[unit]:.0f}{unit}"
    return f"{seconds:g}s"


def size_text(n: int) -> str:
    """Bytes as the largest whole binary unit the CLI reads back: 20 * MiB -> '20MiB' (for --help)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def default_decode_workers() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ManifestSettings:
    """How manifest rows are read: which columns of a tabular manifest (parquet, csv, tsv) hold the URL and id."""

    url_col: str = "url"  # --url-col
    id_col: str | None = None  # --id-col; None: the `id` column when the file has one, else no id

    @property
    def columns_chosen(self) -> bool:
        """Whether --url-col / --id-col differ from the defaults (they only mean something for tabular files)."""
        return self != ManifestSettings()


@dataclass(frozen=True)
class LoadSettings:
    """How rows are fetched and decoded: URL policy, limits, decoder options."""

    concurrency: int = 32  # rows being fetched/decoded at once; also the HTTP pool size
    per_host: int = 8  # concurrent requests to one host, on top of `concurrency`
    timeout: float = 30.0  # total deadline per row (seconds), retries excluded
    connect_timeout: float = 10.0
    read_timeout: float = 15.0  # between two reads of the body
    max_bytes: int = 20 * MiB  # per body, streamed; data URLs: per decoded payload
    max_redirects: int = 3
    retries: int = 2  # extra attempts for timeouts, connection errors, 429 and 5xx
    retry_backoff: float = 0.5  # first backoff (seconds); doubles per attempt, with jitter
    allow_http: bool = False
    allow_local_dirs: tuple[Path, ...] = ()
    allow_private_network: bool = False
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()
    formats: tuple[str, ...] = DEFAULT_FORMATS
    decode_as: str = DEFAULT_DECODE_AS  # vllm | hf | pil: the decode profile (decode.py)
    alpha_background: tuple[int, int, int] | None = None  # None: the profile's (vllm, hf: white; pil: none)
    exif_transpose: bool | None = None  # None: the profile's (vllm: on; hf, pil: off)
    fast_decode: bool = False  # --fast-decode: JPEG DCT-domain downscaling (draft mode) towards draft_size
    draft_size: tuple[int, int] | None = None  # the model's input (W, H); fast decode keeps >= DRAFT_MARGIN x this
    max_pixels: int = 64_000_000
    max_side: int | None = None
    decode_workers: int = field(default_factory=default_decode_workers)
    shard: ShardSpec | None = None  # None: every row
    manifest: ManifestSettings = field(default_factory=ManifestSettings)
    user_agent: str | None = None  # None: mmprep/<version>


@dataclass(frozen=True)
class ShardSpec:
    """`--shard I/N`: this process handles part I (1-based) of N, chosen by entry-key hash."""

    index: int
    count: int

    def owns(self, key: str) -> bool:
        """Stable across reruns and manifest reorderings: depends only on the key."""
        return int(key[-16:], 16) % self.count == self.index - 1


@dataclass(frozen=True)
class ModelSettings:
    """Which model encodes the images, and where."""

    name: str  # hub id, local directory, or builtin:<name>
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    batch_size: int = 32


@dataclass(frozen=True)
class Settings:
    """Everything one `mmprep encode` run needs."""

    out: Path
    model: ModelSettings
    load: LoadSettings = field(default_factory=LoadSettings)
    shard_bytes: int = 128 * MiB  # --shard-size: a shard is closed once it holds this many tensor bytes
    flush_seconds: float = 30.0  # ... or once its oldest entry waited this long
    retry_failed: bool = False  # only rerun earlier failures that this run might change (nothing new)
    retry_permanent_after: float | None = RETRY_PERMANENT_AFTER  # seconds; None: permanent failures stay skipped
    refresh_older_than: float | None = None  # seconds; re-validate cached entries last checked earlier
    wait_lock: float | None = 0.0  # seconds to wait for another writer of the cache dir (None: forever)
    json: bool = False
    progress: str = "auto"  # auto | bar | log | none
    log_every: float = 10.0  # --progress-interval: seconds between plain progress lines (non-TTY)
    vllm_model_id: str | None = None  # also record vLLM's identifier of each image for a server with this --model


EXPORT_FORMATS = ("npy", "parquet", "vllm-ec")
# The builtin smoke-test models (`models/builtin.py` builds them), named here so that --help lists them without torch.
BUILTIN_MODELS = ("tiny-clip", "tiny-qwen2-vl", "tiny-qwen3-vl")
EC_KEYS = ("url", "vllm")  # vllm-ec directory names: the entry key (sha256 of the URL), or vLLM's own hash


@dataclass(frozen=True)
class ExportSettings:
    """Everything one `mmprep export` needs."""

    cache_dir: Path
    out: Path
    format: str  # one of EXPORT_FORMATS
    model: str | None = None  # name or fingerprint; None: the cache's only model
    dtype: str | None = None  # float16 | float32; None: the stored dtype (bfloat16 becomes float32)
    rows_per_file: int = 100_000  # npy / parquet: rows per output file (memory does not depend on it)
    overwrite: bool = False  # npy / parquet: replace a non-empty OUT
    key: str = "url"  # vllm-ec: one of EC_KEYS
    vllm_model_id: str | None = None  # vllm-ec --key vllm: the vLLM server's --model string
    prune_empty: bool = False  # vllm-ec: remove the empty directories vLLM leaves behind on misses
    progress: str = "auto"  # auto | bar | log | none
    batch_rows: int = 2048  # entries read from the cache per step
