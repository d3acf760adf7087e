"""Commands that read or maintain a cache directory: stats, verify, index rebuild, gc, merge, show, version."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmprep import __version__
from mmprep.cli.common import CacheDirArg, age_text, app, cache_dir_of, err, fail, human_bytes, model_label
from mmprep.errors import MmprepError, UsageError

@app.command()
def stats(
    cache_dir: Annotated[Optional[Path], typer.Argument(help="Cache directory [default: $MMPREP_CACHE_DIR or ./mmprep-cache].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (stable, documented shape).")] = False,
) -> None:
    """Show what a cache directory holds: models, entries, shards, failures, recent runs."""
    from mmprep.store.stats import cache_stats

    try:
        data = cache_stats(cache_dir_of(cache_dir))
    except MmprepError as exc:
        fail(exc)
    if json_out:
        print(json.dumps(data, indent=2))
        return
    out = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get whole lines
    out.print(f"[bold]{data['cache_dir']}[/bold]: {data['entries']} entries, {human_bytes(data['bytes_on_disk'])} on disk")
    models = Table(title="models")
    for col in ("model", "family", "fingerprint", "dtype", "entries", "shards", "bytes", "live", "shapes"):
        models.add_column(col)
    for m in data["models"]:
        shapes = ", ".join(f"{s['dtype']}{s['shape']}×{s['entries']}" for s in m["shapes"])
        live = "-" if m["live_fraction"] is None else f"{m['live_fraction']:.0%}"
        models.add_row(
            model_label(m), m["family"], m["fingerprint"][:16], str(m["dtype"]), str(m["entries"]),
            str(m["shards"]), human_bytes(m["shard_bytes"]), live, shapes,
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
    out.print("last completed run: " + ("never" if age is None else f"{age_text(age)} ago"))



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
        report = verify_cache(cache_dir_of(cache_dir), deep=deep, repair=repair)
    except MmprepError as exc:
        fail(exc)
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
        report = rebuild_index(cache_dir_of(cache_dir))
    except MmprepError as exc:
        fail(exc)
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
            cache_dir_of(cache_dir), model=model, older_than=age, keep_last_runs=keep_last_runs, dry_run=dry_run
        )
    except ValueError as exc:
        fail(UsageError(str(exc)))
    except MmprepError as exc:
        fail(exc)
    tag = " (dry run)" if dry_run else ""
    err.print(
        f"gc{tag}: {report.entries_dropped} entries dropped, {len(report.shards_deleted)} shards deleted, "
        f"{len(report.shards_compacted)} compacted, {human_bytes(report.bytes_freed)} freed"
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
        fail(exc)
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
        fail(UsageError(str(exc)))
    except MmprepError as exc:
        fail(exc)
    print(json.dumps(info, indent=2, default=str))
    raise typer.Exit(0 if info["cached"] else 1)


@app.command()
def version() -> None:
    """Print mmprep's version."""
    print(__version__)

