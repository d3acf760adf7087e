"""`mmprep rewrite`: hand the cache to a running server by rewriting its requests (mmprep/serving/rewrite.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mmprep.cli.common import EXIT_RUN_FAILED, app, cache_dir_of, check_choice, err, fail, human_bytes
from mmprep.errors import MmprepError, UsageError
from mmprep.settings import DEFAULT_CACHE_DIR

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`mmprep rewrite ... | head`)


@app.command()
def rewrite(
    requests: Annotated[
        list[str],
        typer.Argument(
            metavar="REQUESTS",
            help="OpenAI chat request files: bare bodies or Batch API lines (.gz ok); '-' reads stdin.",
        ),
    ],
    out: Annotated[
        Optional[str],
        typer.Option(
            "-o", "--out", metavar="OUT", help="Where to write the requests (.gz compresses) (default: stdout)."
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            envvar="MMPREP_MODEL",
            metavar="M",
            help="Model name or fingerprint (default: the cache's only model).",
        ),
    ] = None,
    cache: Annotated[
        Optional[Path],
        typer.Option(
            "--cache", metavar="DIR", help=f"Cache directory (env MMPREP_CACHE_DIR, default ./{DEFAULT_CACHE_DIR})."
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            metavar="TARGET",
            help="vllm: image_embeds parts with the tensors; vllm-ec: metadata-only parts + uuid (Qwen-VL families) or image_url + uuid, for a vLLM serving the cache through MmprepECConnector.",
            callback=lambda v: check_choice(v, "--target", ("vllm", "vllm-ec")),
        ),
    ] = "vllm",
    uuid_only: Annotated[
        bool,
        typer.Option(
            "--uuid-only",
            help='Only add "uuid": <entry key> to cached image parts (for a server reading an encoder-cache store).',
        ),
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", envvar="MMPREP_JSON", help="Print the summary as JSON (on stderr: stdout may carry the requests)."
        ),
    ] = False,
) -> None:
    """Rewrite requests so the server gets cached images as embeddings; exit 0 when every image was replaced, 1 when not."""
    from mmprep.manifest import check_readable, manifest_format
    from mmprep.serving.rewrite import RequestRewriter, open_output
    from mmprep.store.reader import EmbeddingCache

    cache_dir = cache_dir_of(cache)
    try:
        check_readable(requests)
        for path in requests:
            if manifest_format(path) != "jsonl":
                raise UsageError(
                    f"{path}: rewrite reads JSONL request files (one request a line), not {manifest_format(path)}"
                )
        if out not in (None, "-") and not Path(out).parent.is_dir():
            raise UsageError(f"cannot write {out}: its directory does not exist")
        try:
            reader = EmbeddingCache(cache_dir, model=model, memory_bytes=0)  # rewrite keeps its own memo of parts
        except ValueError as exc:  # no such model / several models
            raise UsageError(str(exc)) from None
        with reader:
            try:
                rewriter = RequestRewriter(reader, target=target, uuid_only=uuid_only)
            except ValueError as exc:  # a model the target takes no embeddings for
                raise UsageError(str(exc)) from None
            with open_output(out) as stream:
                summary = rewriter.run(requests, stream)
    except MmprepError as exc:
        fail(exc)
    except BrokenPipeError:
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot write {out or 'stdout'}: {exc.strerror or exc}", soft_wrap=True)
        raise typer.Exit(EXIT_RUN_FAILED) from None
    if json_out:
        err.print_json(json.dumps(summary.as_json()))
    else:
        s = summary
        what = "uuids added" if rewriter.uuid_only else "parts replaced"
        err.print(
            f"rewrite: {s.requests} requests, {s.images} images: [green]{s.replaced} {what}[/green], "
            f"{s.misses} misses, {s.kept} kept (request has a miss), {s.invalid} invalid · "
            f"{s.skipped_lines} lines copied unread · {human_bytes(s.bytes_in)} in, {human_bytes(s.bytes_out)} out · "
            f"{s.requests_per_s:.0f} requests/s, {s.mb_per_s:.1f} MB/s",
            soft_wrap=True,
        )
        for problem in s.problems:
            err.print(f"  {problem}", soft_wrap=True, markup=False)
    raise typer.Exit(summary.exit_code)
