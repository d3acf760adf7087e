"""`mmprep export`: write a cache's entries in a layout other tools read (npy, parquet, vLLM EC store)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mmprep.cli.common import (
    PROGRESS,
    CacheDirArg,
    app,
    cache_dir_of,
    check_choice,
    err,
    fail,
    option,
)
from mmprep.errors import MmprepError, UsageError
from mmprep.settings import EC_KEYS, EXPORT_FORMATS, ExportSettings

_D = ExportSettings(Path(), Path(), "npy")  # defaults shown in --help come from the one place they are defined


@app.command()
def export(
    cache_dir: CacheDirArg = None,
    out: Annotated[
        Path, typer.Option("--out", metavar="OUT", help="Output directory (npy, parquet) or vLLM EC store (vllm-ec).")
    ] = ...,  # type: ignore[assignment]  # `...`: typer's mark of a required option
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help=f"{' | '.join(EXPORT_FORMATS)}.",
            callback=lambda v: check_choice(v, "--format", EXPORT_FORMATS),
        ),
    ] = _D.format,
    model: Annotated[
        str | None, option("model", "Model name or fingerprint (needed when the cache holds several).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", metavar="DTYPE", help="float16 | float32 (default: the stored dtype; bfloat16 becomes float32)."
        ),
    ] = None,
    rows_per_file: Annotated[
        int, typer.Option("--rows-per-file", metavar="N", help="npy / parquet: rows per output file.", min=1)
    ] = _D.rows_per_file,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="npy / parquet: replace a non-empty --out (an earlier export).")
    ] = _D.overwrite,
    key: Annotated[
        str,
        typer.Option(
            "--key",
            metavar="KEY",
            help="vllm-ec: entry directory names: url (sha256 of the URL; clients send it as the uuid) or vllm (vLLM's own image hash).",
            callback=lambda v: check_choice(v, "--key", EC_KEYS),
        ),
    ] = _D.key,
    vllm_model_id: Annotated[
        str | None,
        typer.Option(
            "--vllm-model-id",
            metavar="NAME",
            help="vllm-ec --key vllm: the vLLM server's --model string (as given to `encode --vllm-model-id`).",
        ),
    ] = None,
    prune_empty: Annotated[
        bool, typer.Option("--prune-empty", help="vllm-ec: remove the empty directories vLLM leaves behind on misses.")
    ] = _D.prune_empty,
    progress: Annotated[
        str, option("progress", "auto | bar | log | none.", callback=lambda v: check_choice(v, "--progress", PROGRESS))
    ] = _D.progress,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Export one model's entries: npy / parquet vectors for retrieval, or a vLLM encoder-cache store."""
    from mmprep.export.tabular import export_tabular
    from mmprep.report import ExportReporter
    from mmprep.serving.vllm_ec import export_vllm_ec

    try:
        settings = _settings(
            cache_dir_of(cache_dir),
            out,
            fmt,
            model,
            dtype,
            rows_per_file,
            overwrite,
            key,
            vllm_model_id,
            prune_empty,
            progress,
        )
        run = export_vllm_ec if settings.format == "vllm-ec" else export_tabular
        report = run(settings, ExportReporter(settings.progress))
    except MmprepError as exc:
        fail(exc)
    if json_out:
        print(json.dumps(dataclasses.asdict(report) | {"exit_code": report.exit_code}, indent=2))
    for line in getattr(report, "refused", ()):
        err.print(f"[red]refused[/red] {escape(line)}", soft_wrap=True, highlight=False)
    err.print(escape(report.summary_line()), soft_wrap=True, highlight=False)
    raise typer.Exit(report.exit_code)


def _settings(
    cache_dir: Path, out: Path, fmt: str, model: str | None, dtype: str | None, rows_per_file: int,
    overwrite: bool, key: str, vllm_model_id: str | None, prune_empty: bool, progress: str,
) -> ExportSettings:  # fmt: skip
    """Check the options that only make sense together, then build the settings."""
    if dtype is not None and dtype not in ("float16", "float32"):
        raise UsageError(f"--dtype must be float16 or float32, not {dtype!r}")
    if fmt == "vllm-ec":
        if key == "vllm" and not vllm_model_id:
            raise UsageError("--key vllm needs --vllm-model-id NAME (the vLLM server's --model string)")
        if key == "url" and vllm_model_id:
            raise UsageError("--vllm-model-id only applies with --key vllm")
        if overwrite:
            raise UsageError("--overwrite does not apply to --format vllm-ec (the store is updated incrementally)")
    elif key != "url" or vllm_model_id or prune_empty:
        raise UsageError("--key, --vllm-model-id and --prune-empty apply to --format vllm-ec only")
    return ExportSettings(
        cache_dir=cache_dir, out=out, format=fmt, model=model, dtype=dtype, rows_per_file=rows_per_file,
        overwrite=overwrite, key=key, vllm_model_id=vllm_model_id, prune_empty=prune_empty, progress=progress,
    )  # fmt: skip
