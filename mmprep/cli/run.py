"""`mmprep encode` and `mmprep check`: the two commands that read manifests and load images."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mmprep.cli.common import (
    _D,
    _S,
    CACHE_DIR_ENV,
    PROGRESS,
    app,
    cache_dir_of,
    check_choice,
    env_name,
    err,
    fail,
    human_bytes,
    option,
    parse_duration_option,
    parse_formats,
    parse_rgb,
    parse_shard,
    parse_size,
    parse_wxh,
    hide_transformers_progress_bars,
)
from mmprep.errors import EXIT_EMPTY, CacheLockedError, EmptyManifestError, MmprepError, ModelLoadError, UsageError
from mmprep.manifest import check_readable, rowless_manifests
from mmprep.settings import (
    BUILTIN_MODELS, DECODE_PROFILES, DEFAULT_CACHE_DIR, RAY_WORKER_RESTARTS, RETRY_PERMANENT_AFTER, LoadSettings,
    ManifestSettings, ModelSettings, Settings, duration_text, size_text,
)  # fmt: skip


def resolve_model(model: str | None, out: Path) -> str:
    """--model, else $MMPREP_MODEL (handled by the option), else the cache's only model; never a builtin."""
    if model:
        return model
    from mmprep.store.index import CacheIndex

    index_path = out / "index.sqlite"
    names: list[str] = []
    if index_path.is_file():
        index = CacheIndex(index_path, readonly=True)
        try:
            names = sorted({row["name"] for row in index.models()})
        finally:
            index.close()
    if len(names) == 1:
        return names[0]
    if names:
        raise UsageError(
            f"the cache {out} holds several models ({', '.join(names)}); choose one with --model or MMPREP_MODEL"
        )
    raise UsageError(
        "no model given: pass --model (a Hugging Face id, a local directory, or builtin:tiny-clip for a "
        "smoke test) or set MMPREP_MODEL"
    )


# Loading options, declared once and shared by `encode` and `check`.
ConcurrencyOpt = Annotated[int, option("concurrency", "Rows loading at once (also the HTTP pool size).", "N", min=1)]
PerHostOpt = Annotated[int, option("per-host", "Concurrent requests to one host.", "N", min=1)]
TimeoutOpt = Annotated[
    float, option("timeout", "Total deadline per row and attempt, in seconds.", "SECONDS", min=0.001, max=86400)
]
MaxBytesOpt = Annotated[str, option("max-bytes", "Largest body accepted (e.g. 20MiB).", "SIZE")]
MaxRedirectsOpt = Annotated[int, option("max-redirects", "Redirect hops followed.", "N", min=0)]
RetriesOpt = Annotated[int, option("retries", "Extra attempts for timeouts, connection errors, 429, 5xx.", "N", min=0)]
AllowHttpOpt = Annotated[bool, option("allow-http", "Allow plain http:// URLs.")]
AllowLocalOpt = Annotated[
    Optional[list[Path]], option("allow-local-dir", "Allow local paths / file:// under DIR (repeatable).", "DIR")
]
AllowPrivateOpt = Annotated[bool, option("allow-private-network", "Allow loopback/private/link-local destinations.")]
AllowHostOpt = Annotated[
    Optional[list[str]],
    option("allow-host", "Allow this host, IP or CIDR even in a blocked range (repeatable).", "HOST"),
]
DenyHostOpt = Annotated[
    Optional[list[str]], option("deny-host", "Always refuse this host, IP or CIDR (repeatable).", "HOST")
]
FormatsOpt = Annotated[str, option("formats", "Allowed image formats, comma-separated.", "LIST")]
DecodeAsOpt = Annotated[
    str,
    option(
        "decode-as",
        "Decode like vllm (EXIF, alpha on white), hf (convert_to_rgb) or pil (convert('RGB'), caches made before profiles).",
        "PROFILE",
        callback=lambda v: check_choice(v, "--decode-as", DECODE_PROFILES),
    ),
]
AlphaOpt = Annotated[
    Optional[str],
    option(
        "alpha-background",
        "Composite transparency onto R,G,B.",
        "R,G,B",
        show_default="the profile's: white, pil: dropped",
    ),
]
ExifOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--exif-transpose/--no-exif-transpose",
        envvar=env_name("exif-transpose"),
        show_default="the profile's: on for vllm",
        help="Apply EXIF orientation, or not.",
    ),
]
FastDecodeOpt = Annotated[
    bool, option("fast-decode", "Decode large JPEGs at a reduced DCT scale (>= 2x the model input; not bit-exact).")
]
MaxPixelsOpt = Annotated[int, option("max-pixels", "Largest image (width x height) decoded.", "N", min=1)]
MaxSideOpt = Annotated[
    Optional[int], option("max-side", "Largest width or height decoded.", "N", min=1, show_default="none")
]
DecodeWorkersOpt = Annotated[
    Optional[int], option("decode-workers", "Decode threads.", "N", min=1, show_default="CPU count")
]
ShardOpt = Annotated[
    Optional[str],
    option("shard", "Process only part I of N (e.g. 2/4), split by entry-key hash.", "I/N", show_default="every row"),
]
ProgressOpt = Annotated[
    str,
    option(
        "progress",
        "auto (bar on a terminal, else log), bar, log or none.",
        "MODE",
        callback=lambda v: check_choice(v, "--progress", PROGRESS),
    ),
]
ProgressIntervalOpt = Annotated[
    float, option("progress-interval", "Seconds between two log lines (--progress log).", "SECONDS", min=0.01)
]
ManifestsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="MANIFEST",
        help="Manifests by extension: JSONL (default; '-' reads stdin), .parquet, .csv, .tsv, .txt (one URL a line); .gz ok except parquet.",
    ),
]
UrlColOpt = Annotated[str, option("url-col", "Parquet/CSV/TSV manifests: the column holding the image URL.", "COLUMN")]
IdColOpt = Annotated[
    Optional[str],
    option(
        "id-col",
        "Parquet/CSV/TSV manifests: the column holding your id.",
        "COLUMN",
        show_default="'id' when there is one",
    ),
]
ModelOpt = Annotated[
    Optional[str],
    option(
        "model",
        f"Hugging Face id, local directory, or a builtin smoke-test model (random weights): {', '.join('builtin:' + n for n in BUILTIN_MODELS)}.",
        "MODEL",
        show_default="the cache's only model",
    ),
]
AllowEmptyOpt = Annotated[
    bool, option("allow-empty", "A manifest without rows (empty file, header alone) is fine: exit 0, not 66.")
]
RevisionOpt = Annotated[
    Optional[str], option("revision", "Hub revision (branch, tag or commit).", "REV", show_default="main")
]


def load_settings(
    *, concurrency: int = _D.concurrency, per_host: int = _D.per_host, timeout: float = _D.timeout,
    max_bytes: str = size_text(_D.max_bytes), max_redirects: int = _D.max_redirects, retries: int = _D.retries,
    allow_http: bool = _D.allow_http, allow_local_dir: list[Path] | None = None,
    allow_private_network: bool = _D.allow_private_network, allow_host: list[str] | None = None,
    deny_host: list[str] | None = None, formats: str = ",".join(_D.formats), decode_as: str = _D.decode_as,
    alpha_background: str | None = None, exif_transpose: bool | None = _D.exif_transpose,
    fast_decode: bool = _D.fast_decode, max_pixels: int = _D.max_pixels, max_side: int | None = _D.max_side,
    decode_workers: int | None = None, shard: str | None = None, url_col: str = _D.manifest.url_col,
    id_col: str | None = _D.manifest.id_col,
) -> LoadSettings:  # fmt: skip
    """The loading options of `encode` and `check` (as the CLI gives them: text, lists) as one LoadSettings."""
    extra: dict[str, Any] = {"decode_workers": decode_workers} if decode_workers else {}
    return LoadSettings(
        concurrency=concurrency,
        per_host=per_host,
        timeout=timeout,
        max_bytes=parse_size(max_bytes, "--max-bytes"),
        max_redirects=max_redirects,
        retries=retries,
        allow_http=allow_http,
        allow_local_dirs=tuple(p.resolve() for p in allow_local_dir or ()),
        allow_private_network=allow_private_network,
        allow_hosts=tuple(allow_host or ()),
        deny_hosts=tuple(deny_host or ()),
        formats=parse_formats(formats),
        decode_as=decode_as,
        alpha_background=parse_rgb(alpha_background),
        exif_transpose=exif_transpose,
        fast_decode=fast_decode,
        max_pixels=max_pixels,
        max_side=max_side,
        shard=parse_shard(shard),
        manifest=ManifestSettings(url_col=url_col, id_col=id_col),
        **extra,
    )


LOAD_OPTIONS = tuple(inspect.signature(load_settings).parameters)


def loading_options(arguments: dict[str, Any]) -> LoadSettings:
    """`load_settings` of the loading options among a command's arguments (`encode` and `check` take them all)."""
    return load_settings(**{name: arguments[name] for name in LOAD_OPTIONS})


@app.command()
def encode(
    manifests: ManifestsArg,
    model: ModelOpt = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", envvar=CACHE_DIR_ENV, metavar="DIR", help="Cache directory.", show_default=f"./{DEFAULT_CACHE_DIR}"
        ),
    ] = None,
    revision: RevisionOpt = None,
    device: Annotated[str, option("device", "auto, cpu, cuda or cuda:N.", "DEVICE")] = _S.model.device,
    dtype: Annotated[
        str, option("dtype", "auto (fp16/bf16 on CUDA, fp32 on CPU), float32, float16 or bfloat16.", "DTYPE")
    ] = _S.model.dtype,
    batch_size: Annotated[int, option("batch-size", "Images per forward pass.", "N", min=1)] = _S.model.batch_size,
    concurrency: ConcurrencyOpt = _D.concurrency,
    per_host: PerHostOpt = _D.per_host,
    timeout: TimeoutOpt = _D.timeout,
    max_bytes: MaxBytesOpt = size_text(_D.max_bytes),
    max_redirects: MaxRedirectsOpt = _D.max_redirects,
    retries: RetriesOpt = _D.retries,
    allow_http: AllowHttpOpt = _D.allow_http,
    allow_local_dir: AllowLocalOpt = None,
    allow_private_network: AllowPrivateOpt = _D.allow_private_network,
    allow_host: AllowHostOpt = None,
    deny_host: DenyHostOpt = None,
    formats: FormatsOpt = ",".join(_D.formats),
    decode_as: DecodeAsOpt = _D.decode_as,
    alpha_background: AlphaOpt = None,
    exif_transpose: ExifOpt = None,
    fast_decode: FastDecodeOpt = _D.fast_decode,
    max_pixels: MaxPixelsOpt = _D.max_pixels,
    max_side: MaxSideOpt = _D.max_side,
    decode_workers: DecodeWorkersOpt = None,
    shard: ShardOpt = None,
    url_col: UrlColOpt = _D.manifest.url_col,
    id_col: IdColOpt = _D.manifest.id_col,
    shard_size: Annotated[
        str, option("shard-size", f"Close a shard at this many tensor bytes (or after {_S.flush_seconds:g} s).", "SIZE")
    ] = size_text(_S.shard_bytes),
    refresh_older_than: Annotated[
        Optional[str],
        option(
            "refresh-older-than",
            "Re-validate cached entries last checked before this age (30d, 12h): 304 or same bytes keeps them, new bytes re-encode.",
            "AGE",
            show_default="off",
        ),
    ] = None,
    wait_lock: Annotated[
        float,
        option(
            "wait-lock",
            "Seconds to wait while another run writes the cache (inf: forever) instead of exiting 75.",
            "SECONDS",
            min=0,
        ),
    ] = _S.wait_lock or 0.0,
    retry_failed: Annotated[
        bool,
        option(
            "retry-failed",
            "Only retry earlier failures this run might change (retryable, settings changed, expired); nothing new.",
        ),
    ] = _S.retry_failed,
    retry_permanent_after: Annotated[
        str,
        option(
            "retry-permanent-after",
            "Try a permanently failed row again once its failure is this old (7d, 12h; 0: now; never: keep skipping it).",
            "AGE",
        ),
    ] = duration_text(RETRY_PERMANENT_AFTER),
    progress: ProgressOpt = _S.progress,
    progress_interval: ProgressIntervalOpt = _S.log_every,
    engine: Annotated[
        str, option("engine", "local (this process) or ray (a Ray Data pipeline; pip install 'mmprep[ray]').", "ENGINE")
    ] = "local",
    ray_address: Annotated[
        Optional[str],
        option("ray-address", "Ray engine: cluster to join.", "ADDRESS", show_default="$RAY_ADDRESS, else a local Ray"),
    ] = None,
    workers: Annotated[
        Optional[int],
        option("workers", "Ray engine: encoder actors.", "N", min=1, show_default="GPUs / --gpus-per-worker, else 1"),
    ] = None,
    gpus_per_worker: Annotated[
        float, option("gpus-per-worker", "Ray engine: GPUs per encoder actor (0: CPU actors).", "G", min=0)
    ] = 0,
    worker_restarts: Annotated[
        int,
        option(
            "worker-restarts",
            "Ray engine: restarts of a dead encoder actor before the run fails (exit 70).",
            "N",
            min=0,
        ),
    ] = RAY_WORKER_RESTARTS,
    allow_empty: AllowEmptyOpt = False,
    vllm_model_id: Annotated[
        Optional[str],
        option(
            "vllm-model-id",
            "Also record vLLM's identifier of each image for a server started with --model NAME (for export --format vllm-ec --key vllm).",
            "NAME",
            show_default="off",
        ),
    ] = None,
    json_out: Annotated[bool, option("json", "Print the run summary as JSON on stdout.")] = _S.json,
) -> None:
    """Encode every image of the manifests into the cache directory (already cached rows are skipped).

    Exit codes: 0 done (rows that failed before and were skipped again do not count), 1 rows failed that had
    not failed before, 2 usage error, 66 the manifests hold no row (see --allow-empty), 70 the cache could not
    be written, 75 another run holds the cache, 130/143 interrupted (rerun to continue).
    """
    started = time.monotonic()
    lock = None
    try:
        out_dir = cache_dir_of(out)
        load = loading_options(locals())
        check_readable(manifests, load.manifest)
        if not allow_empty:
            require_rows(manifests, load.manifest)
        if engine not in ("local", "ray"):
            raise UsageError(f"--engine must be local or ray, not {engine!r}")
        if engine == "ray" and vllm_model_id:
            raise UsageError("--vllm-model-id works with --engine local only (run it locally once after a Ray run)")
        model_name = resolve_model(model, out_dir)
        settings = Settings(
            out=out_dir,
            model=ModelSettings(name=model_name, revision=revision, device=device, dtype=dtype, batch_size=batch_size),
            load=load,
            shard_bytes=parse_size(shard_size, "--shard-size"),
            refresh_older_than=parse_duration_option(refresh_older_than, "--refresh-older-than")
            if refresh_older_than
            else None,
            retry_failed=retry_failed,
            retry_permanent_after=None
            if retry_permanent_after.strip().lower() == "never"
            else parse_duration_option(retry_permanent_after, "--retry-permanent-after"),
            wait_lock=None if wait_lock == float("inf") else wait_lock,
            json=json_out,
            progress=progress,
            vllm_model_id=vllm_model_id or None,
            log_every=progress_interval,
        )
        lock = take_writer_lock(out_dir, settings.wait_lock)  # before the model loads: a busy cache answers at once
        from mmprep.imaging.decode import pixel_options
        from mmprep.models import open_encoder
        from mmprep.pipeline import EncodeRun
        from mmprep.report import Reporter

        hide_transformers_progress_bars()
        reporter = Reporter(settings.progress, settings.log_every)
        if engine == "ray":  # the model loads on the Ray workers, not here
            from mmprep.engines.ray_engine import run_ray

            summary = run_ray(manifests, settings, address=ray_address, workers=workers,
                              gpus_per_worker=gpus_per_worker, worker_restarts=worker_restarts,
                              reporter=reporter, lock=lock)  # fmt: skip
        else:
            encoder = open_encoder(settings.model, pixel_options(load))  # config, processor, fingerprint
            encoder.start()  # the weights load behind while the run reads, fetches and preprocesses rows
            if load.fast_decode:
                settings = dataclasses.replace(
                    settings, load=dataclasses.replace(load, draft_size=encoder.input_size())
                )
            summary = EncodeRun(manifests, settings, encoder, reporter, lock=lock, started=started).run()
    except MmprepError as exc:
        fail(with_model_hint(exc, model))
    finally:
        if lock is not None:
            lock.release()
    from mmprep.report import interrupted_line, print_run_summary

    if json_out:
        print(json.dumps(summary.as_json(), indent=2))
        if summary.status == "interrupted":
            err.print(interrupted_line(summary), soft_wrap=True)
    else:
        print_run_summary(summary, err)
    raise typer.Exit(empty_exit(summary, allow_empty) or summary.exit_code)


def require_rows(manifests: list[str], settings: ManifestSettings) -> None:
    """A manifest file without a single row stops the run before the cache lock and the model (exit 66)."""
    empty = rowless_manifests(manifests, settings)
    if empty:
        raise EmptyManifestError(
            f"no rows in manifest {', '.join(empty)} (an empty or truncated file?); nothing was done, exit 66 "
            "(pass --allow-empty when an empty manifest is expected)"
        )


def empty_exit(summary: Any, allow_empty: bool) -> int:
    """Exit 66 with one line for a completed run that read no row at all (stdin is only known at the end)."""
    if allow_empty or summary.rows or summary.status != "completed":
        return 0
    err.print("[red]error:[/red] the manifests held no rows (nothing was done), exit 66 (pass --allow-empty when "
              "an empty manifest is expected)", soft_wrap=True)  # fmt: skip
    return EXIT_EMPTY


def take_writer_lock(out: Path, wait: float | None) -> Any:
    """The cache's writer lock, taken before anything slow; a busy cache is exit 75 with a hint at --wait-lock."""
    from mmprep.store.lock import WriterLock

    lock = WriterLock(out, wait=wait)
    try:
        lock.acquire()
    except CacheLockedError as exc:
        raise CacheLockedError(f"{exc}; exit 75: try again later, or pass --wait-lock SECONDS to wait for it") from None
    return lock


def with_model_hint(exc: MmprepError, model: str | None) -> MmprepError:
    """A model that failed to load and is a builtin's name without its prefix gets a suggestion."""
    if not isinstance(exc, ModelLoadError):
        return exc
    return ModelLoadError(f"did you mean --model builtin:{model}? ({exc})") if model in BUILTIN_MODELS else exc


@app.command()
def check(
    manifests: ManifestsArg,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    size: Annotated[
        Optional[str],
        option("size", "Instead of a model's processor, resize to WxH.", "WxH", show_default="decode only"),
    ] = None,
    errors: Annotated[Path, option("errors", "Where to write the error records (JSONL).", "FILE")] = Path(
        "mmprep-check-errors.jsonl"
    ),
    concurrency: ConcurrencyOpt = _D.concurrency,
    per_host: PerHostOpt = _D.per_host,
    timeout: TimeoutOpt = _D.timeout,
    max_bytes: MaxBytesOpt = size_text(_D.max_bytes),
    max_redirects: MaxRedirectsOpt = _D.max_redirects,
    retries: RetriesOpt = _D.retries,
    allow_http: AllowHttpOpt = _D.allow_http,
    allow_local_dir: AllowLocalOpt = None,
    allow_private_network: AllowPrivateOpt = _D.allow_private_network,
    allow_host: AllowHostOpt = None,
    deny_host: DenyHostOpt = None,
    formats: FormatsOpt = ",".join(_D.formats),
    decode_as: DecodeAsOpt = _D.decode_as,
    alpha_background: AlphaOpt = None,
    exif_transpose: ExifOpt = None,
    fast_decode: FastDecodeOpt = _D.fast_decode,
    max_pixels: MaxPixelsOpt = _D.max_pixels,
    max_side: MaxSideOpt = _D.max_side,
    decode_workers: DecodeWorkersOpt = None,
    shard: ShardOpt = None,
    url_col: UrlColOpt = _D.manifest.url_col,
    id_col: IdColOpt = _D.manifest.id_col,
    progress: ProgressOpt = _S.progress,
    progress_interval: ProgressIntervalOpt = _S.log_every,
    allow_empty: AllowEmptyOpt = False,
    json_out: Annotated[bool, option("json", "Print the summary as JSON on stdout.")] = False,
) -> None:
    """Loader-only preflight: fetch, decode and preprocess every row, encode nothing, write no cache."""
    try:
        load = loading_options(locals())
        check_readable(manifests, load.manifest)
        if not allow_empty:
            require_rows(manifests, load.manifest)
        if model and size:
            raise UsageError("--model and --size exclude each other")
        prepare: Any = None
        if model:
            from mmprep.models import load_preprocessor

            hide_transformers_progress_bars()
            prepare = load_preprocessor(ModelSettings(name=model, revision=revision))
            load = dataclasses.replace(load, draft_size=prepare.input_size())
        elif size:
            width, height = parse_wxh(size)
            from mmprep.imaging.resample import resize_to

            prepare = resize_to((width, height))
            load = dataclasses.replace(load, draft_size=(width, height))
        from mmprep.pipeline import CheckRun
        from mmprep.report import Reporter

        summary = CheckRun(
            manifests, load, errors, prepare, Reporter(progress, progress_interval, done_word="ok")
        ).run()
    except MmprepError as exc:
        fail(exc)
    if json_out:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print_check_summary(summary)
    raise typer.Exit(empty_exit(summary, allow_empty) or summary.exit_code)


def print_check_summary(s: Any) -> None:
    """`check`'s human summary: one line of counts and rates, then the first error records."""
    from mmprep.report import plural, print_errors

    kinds = ", ".join(f"{kind} {n}" for kind, n in s.failures_by_kind.items())
    failed = f"[red]{s.failed} failed[/red] ({kinds})" if s.failed else "0 failed"
    duplicates = f", {plural(s.duplicates, 'duplicate')}" if s.duplicates else ""
    err.print(
        f"check {s.status}: {plural(s.rows, 'row')}: [green]{s.ok} ok[/green], {failed}{duplicates} · "
        f"{s.images_per_s:.1f} images/s, {human_bytes(int(s.bytes_per_s))}/s over {s.duration_s:.1f}s",
        soft_wrap=True,
    )
    if s.failed:
        print_errors(s.errors_file, s.failed, err)
