"""The one way tests run the `mmprep` command line in-process, and what the end-to-end tests share with it:
the loopback flags, a JSON-summary `encode`, manifest writing and reading an entry's index row."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from mmprep import cache_key
from mmprep.cli import app

NET = ["--allow-http", "--allow-host", "127.0.0.1"]  # the test servers live on loopback


def cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, catch_exceptions: bool = False
) -> Result:
    """`mmprep ARGS...` through typer's CliRunner; an exception inside the command fails the test unless caught."""
    return CliRunner().invoke(app, list(args), env=env, input=input, catch_exceptions=catch_exceptions)


def encode_json(*args: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """`mmprep encode ARGS... --json --progress none`: (exit code, the summary)."""
    result = cli("encode", *args, "--json", "--progress", "none", **kw)
    assert result.stdout.strip().startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout)


def write_manifest(path: Path, rows: list[object]) -> str:
    """A JSONL manifest: each row a JSON object given as text, or any value json.dumps writes on one line."""
    path.write_text("".join((r if isinstance(r, str) and r.startswith("{") else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def entry_row(cache: Path, url: str) -> dict[str, Any]:
    """The index row of `url`'s entry (any model), as a dict."""
    db = sqlite3.connect(cache / "index.sqlite")
    db.row_factory = sqlite3.Row
    row = db.execute("SELECT * FROM entries WHERE key=?", (cache_key(url),)).fetchone()
    db.close()
    return dict(row)
