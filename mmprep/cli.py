"""The `mmprep` command line: a thin layer that turns flags into `Settings` and calls the stages.

Every option can also be set through an `MMPREP_<NAME>` environment variable (e.g. MMPREP_BATCH_SIZE).
Exit codes: 0 all rows encoded or cached · 1 some rows failed · 2 usage/configuration error ·
130 interrupted (SIGINT) · 143 terminated (SIGTERM).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmprep import __version__
from mmprep.errors import CacheLockedError, CacheWriteError, MmprepError, UsageError
from mmprep.manifest import check_readable
from mmprep.settings import DEFAULT_CACHE_DIR, RAY_WORKER_RESTARTS, LoadSettings, ModelSettings, Settings, ShardSpec

app = typer.Typer(
    name="mmprep",
    help="Precompute vision-model embeddings for JSONL image manifests into a safetensors cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
_D = LoadSettings()  # defaults shown in --help come from the one place they are defined


def _env(name: str) -> str:
    return "MMPREP_" + name.upper().replace("-", "_")


def _opt(name: str, help: str, **kw: object) -> object:
    return typer.Option(f"--{name}", envvar=_env(name), help=help, **kw)  # type: ignore[arg-type]


PROGRESS = ("auto", "bar", "log", "none")
MAX_SIZE = 1024**4  # sizes (--max-bytes, --shard-size) above 1 TiB are typos
MAX_SIDE = 16384  # check --size: a side above this is a typo, and would allocate gigabytes per row


def parse_size(text: str) -> int:
    """'20MiB', '20M', '512k', '1048576' → bytes (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise typer.BadParameter(f"not a size: {text!r} (examples: 20MiB, 512k, 1048576)")
    unit = m.group(2).lower()
    factor = 1024 ** ("kmgt".find(unit) + 1) if unit else 1
    size = int(float(m.group(1)) * factor)
    if size > MAX_SIZE:
        raise typer.BadParameter(f"{text!r} is over the largest size accepted, 1 TiB")
    return size


def _choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _duration(text: str) -> float:
    from mmprep.store.gc import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_rgb(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise typer.BadParameter(f"expected R,G,B with values 0-255, got {text!r}")
    return rgb  # type: ignore[return-value]


def parse_formats(text: str) -> tuple[str, ...]:
    """'jpeg,png' → ('JPEG', 'PNG'), checked against the formats Pillow can open."""
    from PIL import Image

    Image.init()
    names = tuple(f.strip().upper() for f in text.split(",") if f.strip())
    unknown = [n for n in names if n not in Image.OPEN]
    if not names or unknown:
        raise typer.BadParameter(f"unknown image format(s) {unknown or text!r}; Pillow knows e.g. JPEG, PNG, WEBP, GIF")
    return names


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
ConcurrencyOpt = Annotated[int, _opt("concurrency", "Rows loading at once (also the HTTP pool size).", min=1)]
PerHostOpt = Annotated[int, _opt("per-host", "Concurrent requests to one host.", min=1)]
TimeoutOpt = Annotated[float, _opt("timeout", "Total deadline per row and attempt, seconds.", min=0.001, max=86400)]
MaxBytesOpt = Annotated[str, _opt("max-bytes", "Largest body accepted (e.g. 20MiB).")]
MaxRedirectsOpt = Annotated[int, _opt("max-redirects", "Redirect hops followed.", min=0)]
RetriesOpt = Annotated[int, _opt("retries", "Extra attempts for timeouts, connection errors, 429, 5xx.", min=0)]
AllowHttpOpt = Annotated[bool, _opt("allow-http", "Allow plain http:// URLs.")]
AllowLocalOpt = Annotated[Optional[list[Path]], _opt("allow-local-dir", "Allow local paths / file:// under DIR (repeatable).")]
AllowPrivateOpt = Annotated[bool, _opt("allow-private-network", "Allow loopback/private/link-local destinations.")]
AllowHostOpt = Annotated[Optional[list[str]], _opt("allow-host", "Allow this host, IP or CIDR even in a blocked range (repeatable).")]
DenyHostOpt = Annotated[Optional[list[str]], _opt("deny-host", "Always refuse this host, IP or CIDR (repeatable).")]
FormatsOpt = Annotated[str, _opt("formats", "Allowed image formats, comma-separated.")]
AlphaOpt = Annotated[Optional[str], _opt("alpha-background", "Composite alpha onto R,G,B instead of convert('RGB').")]
ExifOpt = Annotated[bool, _opt("exif-transpose", "Apply EXIF orientation before encoding.")]
FastDecodeOpt = Annotated[bool, _opt("fast-decode", "Decode large JPEGs at a reduced DCT scale (>= 2x the model input; not bit-exact).")]
MaxPixelsOpt = Annotated[int, _opt("max-pixels", "Largest image (width x height) decoded.", min=1)]
MaxSideOpt = Annotated[Optional[int], _opt("max-side", "Largest width or height decoded.", min=1)]
DecodeWorkersOpt = Annotated[Optional[int], _opt("decode-workers", "Decode threads [default: CPU count].", min=1)]
ShardOpt = Annotated[Optional[str], _opt("shard", "Process only part I of N (e.g. 2/4), split by entry-key hash.")]
ProgressOpt = Annotated[str, _opt("progress", "auto | bar | log | none.", callback=lambda v: _choice(v, "--progress", PROGRESS))]
ManifestsArg = Annotated[list[str], typer.Argument(help="JSONL manifests (.gz ok); '-' reads stdin.")]
ModelOpt = Annotated[Optional[str], _opt("model", "Hugging Face id, local directory, or builtin:tiny-clip / builtin:tiny-qwen2-vl.")]
RevisionOpt = Annotated[Optional[str], _opt("revision", "Hub revision (branch, tag or commit).")]


def load_settings(
    concurrency: int, per_host: int, timeout: float, max_bytes: str, max_redirects: int, retries: int,
    allow_http: bool, allow_local_dir: list[Path] | None, allow_private_network: bool,
    allow_host: list[str] | None, deny_host: list[str] | None, formats: str, alpha_background: str | None,
    exif_transpose: bool, max_pixels: int, max_side: int | None, decode_workers: int | None,
    shard: str | None = None, fast_decode: bool = False,
) -> LoadSettings:  # fmt: skip
    """The loading options of `encode` and `check` as one LoadSettings."""
    extra: dict[str, Any] = {"decode_workers": decode_workers} if decode_workers else {}
    return LoadSettings(
        concurrency=concurrency,
        per_host=per_host,
        timeout=timeout,
        max_bytes=parse_size(max_bytes),
        max_redirects=max_redirects,
        retries=retries,
        allow_http=allow_http,
        allow_local_dirs=tuple(p.resolve() for p in allow_local_dir or ()),
        allow_private_network=allow_private_network,
        allow_hosts=tuple(allow_host or ()),
        deny_hosts=tuple(deny_host or ()),
        formats=parse_formats(formats),
        alpha_background=parse_rgb(alpha_background),
        exif_transpose=exif_transpose,
        fast_decode=fast_decode,
        max_pixels=max_pixels,
        max_side=max_side,
        shard=parse_shard(shard),
        **extra,
    )


def parse_shard(text: str | None) -> ShardSpec | None:
    """'2/4' → ShardSpec(2, 4); parts are numbered from 1."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise typer.BadParameter(f"expected I/N with 1 <= I <= N (e.g. 1/4), got {text!r}")
    return ShardSpec(int(m.group(1)), int(m.group(2)))


@app.command()
def encode(
    manifests: ManifestsArg,
    model: ModelOpt = None,
    out: Annotated[Optional[Path], _opt("out", f"Cache directory [env MMPREP_CACHE_DIR, default ./{DEFAULT_CACHE_DIR}].")] = None,
    revision: RevisionOpt = None,
    device: Annotated[str, _opt("device", "auto | cpu | cuda | cuda:N.")] = "auto",
    dtype: Annotated[str, _opt("dtype", "auto | float32 | float16 | bfloat16.")] = "auto",
    batch_size: Annotated[int, _opt("batch-size", "Images per forward pass.", min=1)] = 32,
    concurrency: ConcurrencyOpt = _D.concurrency,
    per_host: PerHostOpt = _D.per_host,
    timeout: TimeoutOpt = _D.timeout,
    max_bytes: MaxBytesOpt = "20MiB",
    max_redirects: MaxRedirectsOpt = _D.max_redirects,
    retries: RetriesOpt = _D.retries,
    allow_http: AllowHttpOpt = _D.allow_http,
    allow_local_dir: AllowLocalOpt = None,
    allow_private_network: AllowPrivateOpt = False,
    allow_host: AllowHostOpt = None,
    deny_host: DenyHostOpt = None,
    formats: FormatsOpt = ",".join(_D.formats),
    alpha_background: AlphaOpt = None,
    exif_transpose: ExifOpt = False,
    fast_decode: FastDecodeOpt = False,
    max_pixels: MaxPixelsOpt = _D.max_pixels,
    max_side: MaxSideOpt = None,
    decode_workers: DecodeWorkersOpt = None,
    shard: ShardOpt = None,
    shard_size: Annotated[str, _opt("shard-size", "Close a shard at this many tensor bytes.")] = "128MiB",
    refresh_older_than: Annotated[Optional[str], _opt("refresh-older-than", "Re-validate cached entries last checked before this age (30d, 12h): 304 or same bytes keeps them, new bytes re-encode.")] = None,
    wait_lock: Annotated[float, _opt("wait-lock", "Seconds to wait while another run writes the cache (inf: forever).", min=0)] = 0.0,
    retry_failed: Annotated[bool, _opt("retry-failed", "Only retry rows that failed before with a retryable kind.")] = False,
    progress: ProgressOpt = "auto",
    engine: Annotated[str, _opt("engine", "local (this process) | ray (a Ray Data pipeline; pip install 'mmprep[ray]').")] = "local",
    ray_address: Annotated[Optional[str], _opt("ray-address", "Ray cluster to join [default: $RAY_ADDRESS, else a local Ray].")] = None,
    workers: Annotated[Optional[int], _opt("workers", "Ray engine: encoder actors [default: GPUs / --gpus-per-worker, else 1].", min=1)] = None,
    gpus_per_worker: Annotated[float, _opt("gpus-per-worker", "Ray engine: GPUs per encoder actor (0: CPU actors).", min=0)] = 0,
    worker_restarts: Annotated[int, _opt("worker-restarts", "Ray engine: restarts of a dead encoder actor before the run fails (exit 70).", min=0)] = RAY_WORKER_RESTARTS,
    json_out: Annotated[bool, typer.Option("--json", envvar="MMPREP_JSON", help="Print the run summary as JSON on stdout.")] = False,
) -> None:
    """Encode every image of the manifests into the cache directory (already cached rows are skipped)."""
    try:
        out_dir = _cache_dir(out)
        check_readable(manifests)
        load = load_settings(
            concurrency, per_host, timeout, max_bytes, max_redirects, retries, allow_http, allow_local_dir,
            allow_private_network, allow_host, deny_host, formats, alpha_background, exif_transpose, max_pixels,
            max_side, decode_workers, shard, fast_decode,
        )  # fmt: skip
        settings = Settings(
            out=out_dir,
            model=ModelSettings(
                name=resolve_model(model, out_dir), revision=revision, device=device, dtype=dtype, batch_size=batch_size
            ),
            load=load,
            shard_bytes=parse_size(shard_size),
            refresh_older_than=_duration(refresh_older_than) if refresh_older_than else None,
            retry_failed=retry_failed,
            wait_lock=None if wait_lock == float("inf") else wait_lock,
            json=json_out,
            progress=progress,
        )
        from mmprep.decode import pixel_options
        from mmprep.models import load_encoder
        from mmprep.pipeline import EncodeRun
        from mmprep.report import Reporter, print_run_summary

        _quiet_transformers()
        if engine not in ("local", "ray"):
            raise UsageError(f"--engine must be local or ray, not {engine!r}")
        if engine == "ray":  # the model loads on the Ray workers, not here
            from mmprep.engines.ray_engine import run_ray

            summary = run_ray(manifests, settings, address=ray_address, workers=workers,
                              gpus_per_worker=gpus_per_worker, worker_restarts=worker_restarts,
                              reporter=Reporter(settings.progress))  # fmt: skip
        else:
            encoder = load_encoder(settings.model, pixel_options(load))
            if load.fast_decode:
                settings = dataclasses.replace(settings, load=dataclasses.replace(load, draft_size=encoder.input_size()))
            summary = EncodeRun(manifests, settings, encoder, Reporter(settings.progress)).run()
    except MmprepError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print_run_summary(summary, err)
    raise typer.Exit(summary.exit_code)


@app.command()
def check(
    manifests: ManifestsArg,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    size: Annotated[Optional[str], typer.Option("--size", help="Instead of a model's processor, resize to WxH.")] = None,
    errors: Annotated[Path, _opt("errors", "Where to write the error records (JSONL).")] = Path("mmprep-check-errors.jsonl"),
    concurrency: ConcurrencyOpt = _D.concurrency,
    per_host: PerHostOpt = _D.per_host,
    timeout: TimeoutOpt = _D.timeout,
    max_bytes: MaxBytesOpt = "20MiB",
    max_redirects: MaxRedirectsOpt = _D.max_redirects,
    retries: RetriesOpt = _D.retries,
    allow_http: AllowHttpOpt = _D.allow_http,
    allow_local_dir: AllowLocalOpt = None,
    allow_private_network: AllowPrivateOpt = False,
    allow_host: AllowHostOpt = None,
    deny_host: DenyHostOpt = None,
    formats: FormatsOpt = ",".join(_D.formats),
    alpha_background: AlphaOpt = None,
    exif_transpose: ExifOpt = False,
    fast_decode: FastDecodeOpt = False,
    max_pixels: MaxPixelsOpt = _D.max_pixels,
    max_side: MaxSideOpt = None,
    decode_workers: DecodeWorkersOpt = None,
    shard: ShardOpt = None,
    progress: ProgressOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", envvar="MMPREP_JSON", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Loader-only preflight: fetch, decode and preprocess every row, encode nothing, write no cache."""
    try:
        check_readable(manifests)
        load = load_settings(
            concurrency, per_host, timeout, max_bytes, max_redirects, retries, allow_http, allow_local_dir,
            allow_private_network, allow_host, deny_host, formats, alpha_background, exif_transpose, max_pixels,
            max_side, decode_workers, shard, fast_decode,
        )  # fmt: skip
        if model and size:
            raise UsageError("--model and --size exclude each other")
        prepare: Any = None
        if model:
            from mmprep.models import load_preprocessor

            _quiet_transformers()
            prepare = load_preprocessor(ModelSettings(name=model, revision=revision))
            load = dataclasses.replace(load, draft_size=prepare.input_size())
        elif size:
            width, height = parse_wxh(size)
            prepare = lambda image: image.resize((width, height))  # noqa: E731
            load = dataclasses.replace(load, draft_size=(width, height))
        from mmprep.pipeline import CheckRun
        from mmprep.report import Reporter

        summary = CheckRun(manifests, load, errors, prepare, Reporter(progress)).run()
    except MmprepError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        s = summary
        err.print(
            f"check {s.status}: {s.rows} rows, [green]{s.ok} ok[/green], "
            f"{'[red]' if s.failed else ''}{s.failed} failed{'[/red]' if s.failed else ''} "
            f"{s.failures_by_kind or ''}, {s.duplicates} duplicates · {s.images_per_s:.1f} images/s, "
            f"{_human(int(s.bytes_per_s))}/s over {s.duration_s:.1f}s"
        )
        if s.failed:
            err.print(f"errors: {s.errors_file}")
    raise typer.Exit(summary.exit_code)


def parse_wxh(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not 0 < int(m.group(1)) <= MAX_SIDE or not 0 < int(m.group(2)) <= MAX_SIDE:
        raise typer.BadParameter(f"expected WxH like 224x224, each side 1 to {MAX_SIDE}, got {text!r}")
    return int(m.group(1)), int(m.group(2))


@app.command()
def stats(
    cache_dir: Annotated[Optional[Path], typer.Argument(help="Cache directory [default: $MMPREP_CACHE_DIR or ./mmprep-cache].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (stable, documented shape).")] = False,
) -> None:
    """Show what a cache directory holds: models, entries, shards, failures, recent runs."""
    from mmprep.store.stats import cache_stats

    try:
        data = cache_stats(_cache_dir(cache_dir))
    except MmprepError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(data, indent=2))
        return
    out = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get whole lines
    out.print(f"[bold]{data['cache_dir']}[/bold]: {data['entries']} entries, {_human(data['bytes_on_disk'])} on disk")
    models = Table(title="models")
    for col in ("model", "family", "fingerprint", "dtype", "entries", "shards", "bytes", "live", "shapes"):
        models.add_column(col)
    for m in data["models"]:
        shapes = ", ".join(f"{s['dtype']}{s['shape']}×{s['entries']}" for s in m["shapes"])
        live = "-" if m["live_fraction"] is None else f"{m['live_fraction']:.0%}"
        models.add_row(
            _model_label(m), m["family"], m["fingerprint"][:16], str(m["dtype"]), str(m["entries"]),
            str(m["shards"]), _human(m["shard_bytes"]), live, shapes,
        )  # fmt: skip
    out.print(models)
    if data["failures_by_kind"]:
        fails = Table(title="failing rows")
        fails.add_column("kind")
        fails.add_column("rows")
        fails.add_column("host")
        fails.add_column("rows")
        kinds, hosts = list(data["failures_by_kind"].items()), list(data["failures_by_host"].items())
        for i in range(max(len(kinds), len(hosts))):
            k = kinds[i] if i < len(kinds) else ("", "")
            h = hosts[i] if i < len(hosts) else ("", "")
            fails.add_row(k[0], str(k[1]), h[0], str(h[1]))
        out.print(fails)
    runs = Table(title="recent runs")
    for col in ("run", "status", "exit", "rows", "encoded", "cached", "failed", "hit rate", "img/s"):
        runs.add_column(col)
    for r in data["runs"]:
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}"
        runs.add_row(
            r["run_id"], r["status"], str(r["exit_code"]), str(r["rows"]), str(r["encoded"]),
            str(r["cached"]), str(r["failed"]), hit, str(r["images_per_s"]),
        )  # fmt: skip
    out.print(runs)
    age = data["last_completed_run_age_s"]
    out.print("last completed run: " + ("never" if age is None else f"{_age(age)} ago"))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _cache_dir(path: Path | None) -> Path:
    return path or Path(os.environ.get("MMPREP_CACHE_DIR") or DEFAULT_CACHE_DIR)


CacheDirArg = Annotated[Optional[Path], typer.Argument(help="Cache directory [default: $MMPREP_CACHE_DIR or ./mmprep-cache].")]


@app.command()
def verify(
    cache_dir: CacheDirArg = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also re-hash every shard against its recorded sha256.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Drop dangling index rows, adopt or remove orphan shards, delete temp files.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check that the index and the shards agree; exit 0 clean, 1 problems found (even if repaired)."""
    from mmprep.store.verify import verify_cache

    try:
        report = verify_cache(_cache_dir(cache_dir), deep=deep, repair=repair)
    except MmprepError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(dataclasses.asdict(report) | {"ok": report.ok}, indent=2))
        raise typer.Exit(report.exit_code)
    out = Console(width=None if sys.stdout.isatty() else 200)
    if report.writer_active:
        out.print(f"[yellow]a writer is running ({report.writer_active}): orphan and temp-file checks skipped[/yellow]")
    for p in report.problems:
        out.print(f"[red]{p.kind}[/red] {p.shard or '-'} {p.key or '-'} {p.detail}")
    for r in report.repairs:
        out.print(f"[green]repaired[/green] {r}")
    verdict = "clean" if report.ok else f"{len(report.problems)} problem(s): {report.counts()}"
    out.print(f"{report.shards_checked} shards, {report.entries_checked} entries checked{' (deep)' if deep else ''}: {verdict}")
    raise typer.Exit(report.exit_code)


index_app = typer.Typer(help="Index maintenance.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("rebuild")
def index_rebuild(cache_dir: CacheDirArg = None) -> None:
    """Rebuild index.sqlite from the self-describing shards alone (the index is derived data)."""
    from mmprep.store.rebuild import rebuild_index

    try:
        report = rebuild_index(_cache_dir(cache_dir))
    except MmprepError as exc:
        _fail(exc)
    err.print(
        f"rebuilt index: {report.shards} shards, {report.entries} entries, {len(report.models)} model(s); "
        f"old index {report.old_index} (kept {report.kept_runs} runs, {report.kept_failures} failures)"
    )
    if report.duplicates:
        err.print(f"{report.duplicates} entries were in more than one shard: the newest is indexed")
    for name in report.unreadable:
        err.print(f"[yellow]warning:[/yellow] unreadable shard left on disk: {name} (see mmprep verify)")


@app.command()
def gc(
    cache_dir: CacheDirArg = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Only entries of this model (name or fingerprint).")] = None,
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="Only entries created before this age (30d, 12h, 90m).")] = None,
    keep_last_runs: Annotated[Optional[int], typer.Option("--keep-last-runs", help="Only entries not written by the model's last N runs.", min=0)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would happen; change nothing.")] = False,
) -> None:
    """Drop entries matching every filter given, then compact shards that are mostly dead."""
    from mmprep.store.gc import collect_garbage, parse_duration

    try:
        age = parse_duration(older_than) if older_than else None
        report = collect_garbage(
            _cache_dir(cache_dir), model=model, older_than=age, keep_last_runs=keep_last_runs, dry_run=dry_run
        )
    except ValueError as exc:
        _fail(UsageError(str(exc)))
    except MmprepError as exc:
        _fail(exc)
    tag = " (dry run)" if dry_run else ""
    err.print(
        f"gc{tag}: {report.entries_dropped} entries dropped, {len(report.shards_deleted)} shards deleted, "
        f"{len(report.shards_compacted)} compacted, {_human(report.bytes_freed)} freed"
    )
    for name in report.skipped:
        err.print(f"[yellow]skipped[/yellow] {name} (missing or unreadable: run mmprep verify)")


@app.command()
def merge(
    dest: Annotated[Path, typer.Argument(help="Cache directory to merge into (created if missing).")],
    sources: Annotated[list[Path], typer.Argument(help="Cache directories to merge from (only read).")],
    move: Annotated[bool, typer.Option("--move", help="Hard-link shards instead of copying them (same file system; falls back to a copy).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Merge caches (e.g. the parts of --shard I/N runs) into DEST; exit 0, or 1 when keys conflicted."""
    from mmprep.store.merge import merge_caches

    try:
        report = merge_caches(dest, list(sources), move=move)
    except MmprepError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        raise typer.Exit(report.exit_code)
    r = report
    err.print(
        f"merged {len(r.sources)} source(s) into {r.dest}: {r.shards_copied} shards copied, {r.shards_linked} linked, "
        f"{r.shards_present} already present; {r.entries_added} entries added, {r.entries_identical} identical, "
        f"{r.failures_merged} failures, {r.runs_merged} runs, {r.models_merged} models"
    )
    for name in r.missing_shards:
        err.print(f"[yellow]skipped[/yellow] {name}: listed by its index but missing (run mmprep verify there)")
    for c in r.conflicts:
        err.print(f"[red]conflict[/red] {c.fingerprint[:16]} {c.key} {c.url}: kept {c.kept_shard}, not {c.source}/{c.source_shard}")
    raise typer.Exit(report.exit_code)


@app.command()
def show(
    cache_dir: Annotated[Path, typer.Argument(help="Cache directory.")],
    url_or_key: Annotated[str, typer.Argument(help="The URL as given in the manifest, or its 64-hex key.")],
    model: Annotated[Optional[str], typer.Option("--model", help="Model name or fingerprint (default: all).")] = None,
    export: Annotated[Optional[Path], typer.Option("--export", help="Write the tensors to a .safetensors or .npy file.")] = None,
) -> None:
    """Show what is cached (or failed) for one entry; exit 0 when cached, 1 when not."""
    from mmprep.store.reader import EmbeddingCache, export_entry, show_entry

    try:
        info = show_entry(cache_dir, url_or_key, model=model)
        if export is not None and info["cached"]:
            with EmbeddingCache(cache_dir, model=info["entries"][-1]["fingerprint"], memory_bytes=0) as cache:
                entry = cache.get_key(info["key"])
            if entry is None:
                raise UsageError("the entry vanished while reading it (a concurrent gc?); try again")
            info["exported"] = [str(p) for p in export_entry(entry, export)]
    except ValueError as exc:
        _fail(UsageError(str(exc)))
    except MmprepError as exc:
        _fail(exc)
    print(json.dumps(info, indent=2, default=str))
    raise typer.Exit(0 if info["cached"] else 1)


@app.command()
def version() -> None:
    """Print mmprep's version."""
    print(__version__)


def _quiet_transformers() -> None:
    """Our own progress output replaces transformers' per-load progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _model_label(m: dict) -> str:
    """The model's name, plus the pixel-changing decode flags its entries were made with."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else " " + ",".join(map(str, v))) for k, v in m["decode"].items()]
    return f"{m['name']} ({' '.join(flags)})" if flags else m["name"]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


EXIT_USAGE, EXIT_RUN_FAILED, EXIT_LOCKED = 2, 70, 75  # 70 = EX_SOFTWARE, 75 = EX_TEMPFAIL: try again later


def _fail(exc: MmprepError) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # [brackets] in messages; one line for logs
    codes = {CacheLockedError: EXIT_LOCKED, CacheWriteError: EXIT_RUN_FAILED}
    raise typer.Exit(codes.get(type(exc), EXIT_USAGE))


def main() -> None:
    app(prog_name="mmprep")


if __name__ == "__main__":
    main()
