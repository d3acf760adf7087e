"""The `mmprep` command line: a thin layer that turns flags into `Settings` and calls the stages.

Every option can also be set through an `MMPREP_<NAME>` environment variable (e.g. MMPREP_BATCH_SIZE).
Exit codes: 0 all rows encoded or cached · 1 some rows failed · 2 usage/configuration error ·
130 interrupted (SIGINT) · 143 terminated (SIGTERM).

One module per command group: `common` (the app, shared options and parsers), `run` (encode, check),
`cache` (stats, verify, index, gc, merge, show, version), `export` (export), `rewrite` (rewrite),
`models` (models path).
"""

from __future__ import annotations

from mmprep.cli import run  # noqa: F401, I001  (importing registers the commands, in this order in --help)
from mmprep.cli import cache  # noqa: F401, I001
from mmprep.cli import export  # noqa: F401, I001
from mmprep.cli import rewrite  # noqa: F401, I001
from mmprep.cli import models  # noqa: F401, I001
from mmprep.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="mmprep")
