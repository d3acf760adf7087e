"""Commands that read or maintain a cache directory: stats, verify, index rebuild, gc, merge, show, version."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmprep.version import __version__
from mmprep.cli.common import (
    CACHE_DIR_ENV,
    CacheDirArg,
    age_text,
    app,
    cache_dir_of,
    err,
    fail,
    human_bytes,
    model_label,
    parse_duration_option,
)
from mmprep.errors import MmprepError, UsageError
from mmprep.report import plural, print_unpadded


@app.command()
def stats(
    cache_dir: CacheDirArg = None,
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
    out = Console(soft_wrap=True)  # a terminal wraps at its width; logs and pipes get LOG_WIDTH, unpadded
    out.print(
        f"[bold]{escape(str(data['cache_dir']))}[/bold]: {plural(data['entries'], 'entry', 'entries')}, {human_bytes(data['bytes_on_disk'])} on disk"
    )
    if data["models"]:
        out.print("[bold]models[/bold]")
    for m in data["models"]:  # one model on two lines: name, family, fingerprint; then its counts
        shapes = ", ".join(f"{s['dtype']}{s['shape']}×{s['entries']}" for s in m["shapes"])
        live = "" if m["live_fraction"] is None else f" · {m['live_fraction']:.0%} live"
        extra = ", ".join(
            f"{n} {t.get('dtype')}[{', '.join(map(str, t.get('shape') or []))}]"
            for n, t in m["tensors"].items()
            if n != "embeddings"
        )
        out.print(f"  {escape(model_label(m))}  {m['family']}  {m['fingerprint'][:16]}", highlight=False)
        out.print(
            f"    {plural(m['entries'], 'entry', 'entries')} in {plural(m['shards'], 'shard')}, {human_bytes(m['shard_bytes'])}"
            f"{live} · {shapes}" + (f" · also stored: {extra}" if extra else ""), highlight=False,
        )  # fmt: skip
    for title, counts in (
        ("failing rows by kind", data["failures_by_kind"]),
        ("failing rows by host", data["failures_by_host"]),
    ):
        if counts:
            out.print(
                f"[bold]{title}[/bold]: " + ", ".join(f"{escape(str(name))} {n}" for name, n in counts.items()),
                highlight=False,
            )
    if data["runs"]:
        runs = Table(title="recent runs", title_justify="left", box=None, pad_edge=False, header_style="bold")
        for col in ("run (started, UTC)", "status", "exit", "rows", "encoded", "cached", "failed", "hit rate", "img/s"):
            runs.add_column(col, justify="left" if col in ("run (started, UTC)", "status") else "right")
        for r in data["runs"]:
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}"
            runs.add_row(
                r["run_id"], r["status"], str(r["exit_code"]), str(r["rows"]), str(r["encoded"]), str(r["cached"]),
                str(r["failed"]), hit, str(r["images_per_s"]),
            )  # fmt: skip
        print_unpadded(out, runs)
    age = data["last_completed_run_age_s"]
    out.print("last completed run: " + ("never" if age is None else f"{age_text(age)} ago"))


@app.command()
def verify(
    cache_dir: CacheDirArg = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also re-hash every shard against its recorded sha256.")] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Drop dangling index rows, adopt valid orphan shards, move damaged shards to quarantine/, delete temp files.",
        ),
    ] = False,
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
    if report.index_note:
        out.print(f"[yellow]{report.index_note}[/yellow]")
    if report.writer_active:
        out.print(f"[yellow]a writer is running ({report.writer_active}): orphan and temp-file checks skipped[/yellow]")
    for p in report.problems:
        out.print(f"[red]{p.kind}[/red] {p.shard or '-'} {p.key or '-'} {p.detail}")
    for r in report.repairs:
        out.print(f"[green]repaired[/green] {r}")
    verdict = "clean" if report.ok else f"{plural(len(report.problems), 'problem')} ({report.counts_text()})"
    checked = f"{plural(report.shards_checked, 'shard')}, {plural(report.entries_checked, 'entry', 'entries')} checked"
    out.print(f"{checked}{' (deep)' if deep else ''}: {verdict}")
    if repair and report.entries_dropped:
        out.print(f"{plural(report.entries_dropped, 'entry', 'entries')} dropped from the index: the next run whose "
                  "manifests list their URLs encodes them again")  # fmt: skip
    if report.quarantined:
        out.print(f"damaged shards kept in {cache_dir_of(cache_dir) / 'quarantine'} (delete it when done with them)")
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
        f"rebuilt index: {plural(report.shards, 'shard')}, {plural(report.entries, 'entry', 'entries')}, "
        f"{plural(len(report.models), 'model')}; old index {report.old_index} (kept {plural(report.kept_runs, 'run')}, "
        f"{plural(report.kept_failures, 'failure')})"
    )
    if report.duplicates:
        err.print(f"{report.duplicates} entries were in more than one shard: the newest is indexed")
    for name in report.unreadable:
        err.print(f"[yellow]warning:[/yellow] unreadable shard left on disk: {name} (see mmprep verify)")


@app.command()
def gc(
    cache_dir: CacheDirArg = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", metavar="MODEL", help="Only entries (or failures) of this model (name or fingerprint)."
        ),
    ] = None,
    older_than: Annotated[
        Optional[str],
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Only entries created (failures last seen) before this age (30d, 12h, 90m).",
        ),
    ] = None,
    keep_last_runs: Annotated[
        Optional[int],
        typer.Option(
            "--keep-last-runs", metavar="N", help="Only entries not written by the model's last N runs.", min=0
        ),
    ] = None,
    failures: Annotated[
        bool,
        typer.Option(
            "--failures",
            help="Forget failure records instead of dropping entries: the next run tries those rows again.",
        ),
    ] = False,
    kind: Annotated[
        Optional[str],
        typer.Option("--kind", metavar="KIND", help="With --failures: only failures of this kind (e.g. http_status)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would happen; change nothing.")] = False,
) -> None:
    """Drop entries matching every filter given, then compact shards that are mostly dead (or, with --failures,
    forget failure records)."""
    from mmprep.store.gc import collect_garbage, forget_failures

    try:
        root = cache_dir_of(cache_dir)
        age = parse_duration_option(older_than, "--older-than") if older_than else None
        if failures:
            if keep_last_runs is not None:
                raise UsageError("--keep-last-runs drops entries; it does not go with --failures")
            n = forget_failures(root, model=model, kind=kind, older_than=age, dry_run=dry_run)
            records = plural(n, "failure record")
            err.print(
                f"gc: would forget {records} (dry run)"
                if dry_run
                else f"gc: forgot {records}; the next run tries those rows again"
            )
            return
        if kind is not None:
            raise UsageError("--kind filters failure records: add --failures")
        report = collect_garbage(root, model=model, older_than=age, keep_last_runs=keep_last_runs, dry_run=dry_run)
    except ValueError as exc:
        fail(UsageError(str(exc)))
    except MmprepError as exc:
        fail(exc)
    entries = plural(report.entries_dropped, "entry", "entries")
    shards = f"{plural(len(report.shards_deleted), 'shard')} deleted, {len(report.shards_compacted)} compacted"
    if dry_run:
        err.print(f"gc (dry run): would drop {entries}; {shards.replace(' deleted', ' would be deleted')}, "
                  f"{human_bytes(report.bytes_freed)} would be freed")  # fmt: skip
    else:
        if report.temp_files_removed or report.orphans_adopted:
            err.print(f"gc: cleaned up after an interrupted run: {plural(len(report.temp_files_removed), 'temporary file')} "
                      f"deleted, {plural(len(report.orphans_adopted), 'orphan shard')} indexed")  # fmt: skip
        err.print(f"gc: {entries} dropped, {shards}, {human_bytes(report.bytes_freed)} freed")
    for name in report.skipped:
        err.print(f"[yellow]skipped[/yellow] {name} (missing or unreadable: run mmprep verify)")


@app.command()
def merge(
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Cache directory to merge into (created if missing).")],
    sources: Annotated[list[Path], typer.Argument(metavar="SRC", help="Cache directories to merge from (only read).")],
    move: Annotated[
        bool,
        typer.Option(
            "--move", help="Hard-link shards instead of copying them (same file system; falls back to a copy)."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Merge caches (the parts of --shard I/N runs, say) into DEST; exit 0, or 1 when keys conflicted."""
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
        f"merged {plural(len(r.sources), 'source')} into {r.dest}: {plural(r.shards_copied, 'shard')} copied, "
        f"{r.shards_linked} linked, {r.shards_present} already present; "
        f"{plural(r.entries_added, 'entry', 'entries')} added, {r.entries_identical} identical, "
        f"{plural(r.failures_merged, 'failure')}, {plural(r.runs_merged, 'run')}, {plural(r.models_merged, 'model')}"
    )
    for name in r.missing_shards:
        err.print(f"[yellow]skipped[/yellow] {name}: listed by its index but missing (run mmprep verify there)")
    for c in r.conflicts:
        err.print(
            f"[red]conflict[/red] {c.fingerprint[:16]} {c.key} {c.url}: kept {c.kept_shard}, not {c.source}/{c.source_shard}"
        )
    raise typer.Exit(report.exit_code)


@app.command(no_args_is_help=True)
def show(
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="[DIR] URL_OR_KEY",
            help=f"The cache directory (default: ${CACHE_DIR_ENV}, else ./mmprep-cache), then the URL as given in the manifest or its 64-hex key.",
            show_default=False,
        ),
    ] = None,  # type: ignore[assignment]  # typer gives None when no argument is given
    caller_id: Annotated[
        Optional[str],
        typer.Option(
            "--id", metavar="ID", help="Look the entry up by the manifest's id instead of its URL (scans the index)."
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", metavar="MODEL", help="Model name or fingerprint.", show_default="every model"),
    ] = None,
    export: Annotated[
        Optional[Path],
        typer.Option("--export", metavar="FILE", help="Write the tensors to a .safetensors or .npy file."),
    ] = None,
) -> None:
    """Show what is cached (or failed) for one entry as JSON; exit 0 when cached, 1 when not."""
    from mmprep.store.reader import EmbeddingCache, export_entry, show_entry

    targets = list(targets or [])
    try:
        wanted = 0 if caller_id is not None else 1
        if len(targets) not in (wanted, wanted + 1):
            what = "[DIR] with --id" if caller_id is not None else "[DIR] URL_OR_KEY"
            raise UsageError(f"show takes {what}, got {len(targets)} arguments")
        cache_dir = cache_dir_of(Path(targets[0]) if len(targets) > wanted else None)
        query = targets[-1] if caller_id is None else None
        info = show_entry(cache_dir, query, model=model, caller_id=caller_id)
        if export is not None and info["cached"]:
            if info["key"] is None:
                raise UsageError(
                    f"--id {caller_id} names {len(info['keys'])} entries; --export takes one (pass its key)"
                )
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
    if info["id_matches"]:
        err.print(f"no entry for this URL; it is the id of {plural(info['id_matches'], 'row')}: did you mean "
                  f"`mmprep show --id {query}`?", soft_wrap=True)  # fmt: skip
    raise typer.Exit(0 if info["cached"] else 1)


@app.command()
def version() -> None:
    """Print mmprep's version."""
    print(__version__)
