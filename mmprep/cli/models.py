"""`mmprep models path NAME`: the directory a model name resolves to, for the tools that want one (e.g. `vllm serve`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmprep.cli.common import app, fail, hide_transformers_progress_bars
from mmprep.errors import MmprepError

models_app = typer.Typer(help="Model names and where their files are.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("path")
def path(
    name: Annotated[
        str, typer.Argument(help="builtin:<name>, a local directory, or a hub id.", metavar="NAME", show_default=False)
    ],
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Hub commit, branch or tag.", metavar="REV")
    ] = None,
) -> None:
    """Print the directory a model resolves to, on one line.

    A builtin's (built on first use), a local directory, or a hub id's snapshot in the local hub cache
    (never downloaded). For example: vllm serve "$(mmprep models path builtin:tiny-qwen2-vl)".
    """
    hide_transformers_progress_bars()
    from mmprep.models.source import model_directory

    try:
        print(model_directory(name, revision))
    except MmprepError as exc:
        fail(exc)
