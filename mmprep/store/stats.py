"""What a cache directory holds, for `mmprep stats` (the `--json` shape is documented in README)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmprep.errors import UsageError
from mmprep.store.index import CacheIndex
from mmprep.store.layout import CacheLayout

RECENT_RUNS = 10
SHAPE_SAMPLES = 5


def cache_stats(root: Path) -> dict[str, Any]:
    """Summarise a cache directory from its index and the files on disk (read-only)."""
    layout = CacheLayout(root)
    if not layout.index.is_file():
        raise UsageError(f"not an mmprep cache directory (no {layout.index.name}): {root}")
    index = CacheIndex(layout.index, readonly=True)
    try:
        db = index.conn
        models = []
        for m in db.execute("SELECT fingerprint, name, family, info FROM models ORDER BY created"):
            fp = m["fingerprint"]
            entries = db.execute("SELECT count(*) FROM entries WHERE fingerprint=?", (fp,)).fetchone()[0]
            shard_row = db.execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM shards WHERE fingerprint=?", (fp,)
            ).fetchone()
            shapes = [
                {"dtype": r[0], "shape": json.loads(r[1]), "entries": r[2]}
                for r in db.execute(
                    "SELECT dtype, shape, count(*) AS n FROM entries WHERE fingerprint=? "
                    "GROUP BY dtype, shape ORDER BY n DESC LIMIT ?",
                    (fp, SHAPE_SAMPLES),
                )
            ]
            info = json.loads(m["info"])
            models.append(
                {
                    "fingerprint": fp,
                    "name": m["name"],
                    "family": m["family"],
                    "dtype": info.get("dtype"),
                    "entries": entries,
                    "shards": shard_row[0],
                    "shard_bytes": shard_row[1],
                    "shapes": shapes,
                }
            )
        failures = {
            r[0]: r[1]
            for r in db.execute("SELECT kind, count(*) FROM failures GROUP BY kind ORDER BY count(*) DESC")
        }
        runs = []
        for r in db.execute(
            "SELECT run_id, model, started, finished, status, exit_code, summary FROM runs "
            "ORDER BY started DESC LIMIT ?",
            (RECENT_RUNS,),
        ):
            s = json.loads(r["summary"]) if r["summary"] else {}
            runs.append(
                {
                    "run_id": r["run_id"],
                    "model": r["model"],
                    "started": r["started"],
                    "finished": r["finished"],
                    "status": r["status"],
                    "exit_code": r["exit_code"],
                    "rows": s.get("rows"),
                    "encoded": s.get("encoded"),
                    "cached": s.get("cached"),
                    "failed": s.get("failed"),
                    "images_per_s": s.get("images_per_s"),
                }
            )
    finally:
        index.close()
    return {
        "cache_dir": str(root),
        "bytes_on_disk": _tree_bytes(root),
        "entries": sum(m["entries"] for m in models),
        "models": models,
        "failures_by_kind": failures,
        "runs": runs,
    }


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
