"""`python -m benchmarks.costs --model DIR [--before TREE] [--rows N]`: per-image CPU cost of `mmprep check --model`.

Each mmprep tree (this one, and --before's) runs `CheckRun` over the same URLs in a child process with
cProfile enabled in every thread (`threading.setprofile`); the image server runs in another process, so
its work is not counted. Functions' own time (tottime) is summed per stage — fetch/HTTP (httpx, httpcore,
h11, asyncio, sockets, mmprep.fetch), decode (Pillow's decoders and mmprep.imaging.decode), preprocess (resize,
the image processor, numpy, mmprep.models), bookkeeping (the rest) — leaving out time spent waiting
(lock acquires, epoll, sleeps, queue waits). cProfile's own overhead weighs on Python-level code more than
on C calls, so the bookkeeping share is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()

WAITS = ("'acquire'", "'poll'", "time.sleep", "'wait'", "select.select", "'control'", "'get' of '_queue")  # blocked
# ("'get' of '_queue.SimpleQueue'": an idle worker thread waiting for its next task)
STAGES = ("fetch/HTTP", "decode", "preprocess", "bookkeeping")


def stage_of(filename: str, name: str) -> str | None:
    """The stage a profiled function's own time belongs to; None for time spent waiting."""
    if any(w in name for w in WAITS):
        return None
    path = filename.replace("\\", "/")
    if any(
        p in path
        for p in (
            "/httpx/",
            "/httpcore/",
            "/h11/",
            "/anyio/",
            "/asyncio/",
            "/ssl.py",
            "/socket.py",
            "/selectors.py",
            "mmprep/fetch/",
        )
    ):
        return "fetch/HTTP"
    if any(p in name for p in ("_socket", "select.epoll", "_ssl.")):
        return "fetch/HTTP"
    if any(p in path for p in ("mmprep/models/", "/transformers/", "/numpy/")) or "numpy" in name or "resize" in name:
        return "preprocess"
    if "ImagingDecoder" in name or "ImagingCore" in name or "mmprep/imaging/decode" in path or "/PIL/" in path:
        return "decode"
    return "bookkeeping"


def stage_totals(functions: list[list]) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """{stage: seconds} and the heaviest functions with their stage, from [filename, name, own seconds] rows."""
    totals = dict.fromkeys(STAGES, 0.0)
    rows = []
    for filename, name, seconds in functions:
        stage = stage_of(filename, name)
        if stage is not None:
            totals[stage] += seconds
        rows.append((f"{stage or 'waiting'}: {Path(filename).name}:{name}", seconds))
    return totals, sorted(rows, key=lambda r: -r[1])[:15]


def child(model: str, manifest: str, out: str) -> None:
    """Run CheckRun in this process with every thread profiled; write {stage: seconds} and the row count."""
    import cProfile
    import pstats
    import threading

    from mmprep.models import load_preprocessor
    from mmprep.pipeline import CheckRun
    from mmprep.settings import LoadSettings, ModelSettings

    prepare = load_preprocessor(ModelSettings(name=model))
    load = LoadSettings(allow_http=True, allow_hosts=("127.0.0.1",))
    profiles: list[cProfile.Profile] = []

    def start(*_: object) -> None:  # the first event of each new thread: profile that thread from here on
        sys.setprofile(None)
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start)
    main = cProfile.Profile()
    profiles.append(main)
    started = time.perf_counter()
    main.enable()
    summary = CheckRun([manifest], load, Path(out).with_suffix(".errors.jsonl"), prepare).run()
    main.disable()
    wall = time.perf_counter() - started
    threading.setprofile(None)
    functions: dict[tuple[str, str], float] = {}
    for profile in profiles:
        profile.disable()
        try:
            stats = pstats.Stats(profile)
        except TypeError:  # a thread that recorded nothing
            continue
        for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            functions[(filename, name)] = functions.get((filename, name), 0.0) + tottime
    rows = [[filename, name, seconds] for (filename, name), seconds in functions.items()]
    Path(out).write_text(json.dumps({"rows": summary.ok, "failed": summary.failed, "wall": wall, "functions": rows}))


def table(label: str, result: dict) -> list[str]:
    rows = result["rows"]
    stages, heaviest = stage_totals(result["functions"])
    total = sum(stages.values())
    lines = [f"| {label}: stage | µs per image | share |", "| --- | --- | --- |"]
    for stage in STAGES:
        lines.append(f"| {stage} | {stages[stage] / rows * 1e6:,.0f} | {stages[stage] / total:.0%} |")
    lines.append(f"| total CPU (profiled) | {total / rows * 1e6:,.0f} | wall {result['wall']:.1f} s for {rows} rows |")
    lines.append("")
    lines += [f"    {seconds / rows * 1e6:8,.0f} µs  {where}" for where, seconds in heaviest]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory whose image processor `check --model` runs")
    parser.add_argument("--before", type=Path, help="an older mmprep source tree, profiled beside this one")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmprep-bench")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE.parent.parent))
    from benchmarks import inputs

    with inputs.serving_elsewhere(args.work) as server:
        manifest = args.work / f"costs-{args.rows}.jsonl"
        inputs.write_manifest(manifest, [server.url("vga", i) for i in range(args.rows)])
        trees = {"before": args.before, "after": HERE.parent.parent} if args.before else {"now": HERE.parent.parent}
        for label, tree in trees.items():
            out = args.work / f"costs-{label}.json"
            env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            subprocess.run(
                [sys.executable, str(HERE), "--child", args.model, str(manifest), str(out)], env=env, check=True
            )
        for label in trees:
            print("\n".join(table(label, json.loads((args.work / f"costs-{label}.json").read_text()))) + "\n")


if __name__ == "__main__":
    main()
