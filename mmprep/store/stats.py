"""What a cache directory holds, for `mmprep stats` (the `--json` shape is documented in docs/cli.md#mmprep-stats-dir---json)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmprep.errors import UsageError
from mmprep.store.index import CacheIndex, index_created, utc_iso
from mmprep.store.layout import CacheLayout, entry_tensor_name

RECENT_RUNS = 10
SHAPE_SAMPLES = 5
TOP_HOSTS = 10


def cache_stats(root: Path) -> dict[str, Any]:
    """Summarise a cache directory from its index and the files on disk (read-only, never blocks a writer)."""
    layout = CacheLayout(root)
    if not layout.index.is_file():
        raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}")
    index = CacheIndex(layout.index, readonly=True)
    try:
        db = index.conn
        if not index_created(db):  # an index a run never got to write: an empty cache
            return _summary(root, [], {}, Counter(), [], None, None)
        models = [
            _model_stats(db, layout, m)
            for m in db.execute("SELECT fingerprint, name, family, info FROM models ORDER BY created")
        ]
        failures = {r[0]: r[1] for r in db.execute("SELECT kind, count(*) FROM failures GROUP BY kind ORDER BY 2 DESC")}
        hosts: Counter[str] = Counter(_host(r[0]) for r in db.execute("SELECT url FROM failures"))
        runs = [_run_stats(r) for r in db.execute(
            "SELECT run_id, model, started, finished, status, exit_code, summary FROM runs ORDER BY started DESC LIMIT ?",
            (RECENT_RUNS,),
        )]  # fmt: skip
        last_completed = db.execute("SELECT max(finished) FROM runs WHERE status='completed'").fetchone()[0]
        last_clean = db.execute("SELECT max(finished) FROM runs WHERE status='completed' AND exit_code=0").fetchone()[0]
    finally:
        index.close()
    return _summary(root, models, failures, hosts, runs, last_completed, last_clean)


def _summary(
    root: Path,
    models: list[dict[str, Any]],
    failures: dict[str, int],
    hosts: Counter[str],
    runs: list[dict[str, Any]],
    last_completed: float | None,
    last_clean: float | None,
) -> dict[str, Any]:
    now = time.time()
    return {
        "cache_dir": str(root),
        "bytes_on_disk": _tree_bytes(root),
        "entries": sum(m["entries"] for m in models),
        "models": models,
        "failures_by_kind": failures,
        "failures_by_host": dict(hosts.most_common(TOP_HOSTS)),
        "runs": runs,
        "last_completed_run_age_s": None if last_completed is None else round(now - last_completed, 1),
        "last_clean_run_age_s": None if last_clean is None else round(now - last_clean, 1),
    }


def _model_stats(db: Any, layout: CacheLayout, m: Any) -> dict[str, Any]:
    fp = m["fingerprint"]
    entries = db.execute("SELECT count(*) FROM entries WHERE fingerprint=?", (fp,)).fetchone()[0]
    shards, shard_bytes, written = db.execute(
        "SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(entries), 0) FROM shards WHERE fingerprint=?", (fp,)
    ).fetchone()
    shapes = [
        {"dtype": r[0], "shape": json.loads(r[1]), "entries": r[2]}
        for r in db.execute(
            "SELECT dtype, shape, count(*) FROM entries WHERE fingerprint=? GROUP BY dtype, shape ORDER BY 3 DESC LIMIT ?",
            (fp, SHAPE_SAMPLES),
        )
    ]
    info = json.loads(m["info"])
    tensors = _tensors(db, layout, fp, info)
    return {
        "fingerprint": fp,
        "name": m["name"],
        "family": m["family"],
        "dtype": info.get("dtype"),
        "decode": info.get("decode", {}),  # pixel-changing decode options (part of the fingerprint)
        "entries": entries,
        "shards": shards,
        "shard_bytes": shard_bytes,
        "live_fraction": round(entries / written, 4) if written else None,  # < 1 after gc drops or re-encodes
        "shapes": shapes,
        "tensors": tensors,
    }


def _tensors(db: Any, layout: CacheLayout, fingerprint: str, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tensors stored per entry, name -> {shape, dtype}: as the encoder declared them (symbolic, e.g.
    ["n_tokens", 64]), else (a cache from before declarations, or a rebuilt index) as one entry has them."""
    declared = info.get("output") or {}
    row = db.execute("SELECT key, shard, tensors FROM entries WHERE fingerprint=? LIMIT 1", (fingerprint,)).fetchone()
    if row is None:
        return dict(declared)
    stored = json.loads(row["tensors"])
    names = [entry_tensor_name(row["key"], t) for t in stored]
    if all(n in declared for n in names):
        return {n: declared[n] for n in names}
    header = _shard_header(layout.shard_path(row["shard"]))
    found = {}
    for name, t in zip(names, stored):
        h = header.get(t) or {}
        found[name] = declared.get(name) or {
            "shape": h.get("shape"),
            "dtype": _DTYPE_NAMES.get(h.get("dtype"), h.get("dtype")),
        }
    return found


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32", "U8": "uint8"}


def _shard_header(path: Path) -> dict[str, Any]:
    """A shard's safetensors header (tensor name -> dtype, shape, offsets), read without torch; {} if unreadable."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(size))
    except (OSError, ValueError):
        return {}


def _run_stats(r: Any) -> dict[str, Any]:
    s = json.loads(r["summary"]) if r["summary"] else {}
    rows = (s.get("rows") or 0) - (s.get("other_shard") or 0)
    cached = (s.get("cached") or 0) + (s.get("refreshed") or 0)
    return {
        "run_id": r["run_id"],
        "model": r["model"],
        "started": utc_iso(r["started"]),  # ISO 8601, UTC
        "finished": utc_iso(r["finished"]),
        "status": r["status"],
        "exit_code": r["exit_code"],
        "rows": s.get("rows"),
        "encoded": s.get("encoded"),
        "cached": s.get("cached"),
        "failed": s.get("failed"),
        "hit_rate": round(cached / rows, 4) if rows > 0 else None,
        "images_per_s": s.get("images_per_s"),
        "duration_s": s.get("duration_s"),
    }


def _host(url: str | None) -> str:
    """The host a failure is attributed to: data URLs, local files and bad lines get their own buckets."""
    if not url:
        return "(manifest)"
    if url.startswith("data:"):
        return "(data url)"
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    return host or "(local or invalid)"


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
