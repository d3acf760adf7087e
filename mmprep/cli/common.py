"""What every command shares: the Typer app, option helpers, value parsers, output helpers, exit codes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from mmprep.version import __version__
from mmprep.errors import (
    EXIT_EMPTY, EXIT_LOCKED, EXIT_RUN_FAILED, EXIT_USAGE, CacheLockedError, CacheWriteError, EmptyManifestError, MmprepError,
    UsageError,
)  # fmt: skip
from mmprep.settings import DEFAULT_CACHE_DIR, LoadSettings, ModelSettings, Settings, ShardSpec

app = typer.Typer(
    name="mmprep",
    help="Precompute vision-model embeddings for image manifests (JSONL, parquet, CSV/TSV, URL lists) into a safetensors cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: brackets ("mmprep[ray]") and defaults print as written
    context_settings={"help_option_names": ["-h", "--help"]},  # every command and group inherits -h
)
err = Console(stderr=True, soft_wrap=True)  # messages are never wrapped: logs and greps see whole lines
_D = LoadSettings()  # defaults shown in --help come from the one place they are defined
_S = Settings(out=Path(DEFAULT_CACHE_DIR), model=ModelSettings(name=""))

CACHE_DIR_ENV = "MMPREP_CACHE_DIR"  # the cache directory's one environment name, for every command


def _argument_type(self: typer.core.TyperArgument, ctx: object) -> str | None:
    """An argument with a metavar shows just that (typer would add a Python type like <list[str]>)."""
    return None if self.metavar else _typer_argument_type(self, ctx)  # type: ignore[arg-type]  # typer passes its click Context as ctx


def _argument_usage(self: typer.core.TyperArgument) -> str:
    """An argument in the usage line as click writes it (MANIFEST..., [DIR]); a metavar that spells out its own
    shape ("[DIR] URL_OR_KEY") as written. Typer would write {manifests}..."""
    name = self.display_name_raw
    if " " in name or name.startswith("["):
        return name
    return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


def _option_metavar(self: typer.core.TyperOption, ctx: object) -> str | None:
    """An option's value in help: its metavar, else its name in capitals (--format FORMAT); a switch shows none.
    Typer would show a Python type (<str>, <bool>)."""
    if self.is_flag or self.count:
        return None
    return self.metavar or (self.name or "value").upper()


# What a user types for the cache directory, by habit from other tools
_OUT_ALIASES = frozenset({"--cache", "--cache-dir", "--output", "--output-dir", "--out-dir", "--dir", "-o"})


def option_suggestions(typed: str, command: typer.core.TyperCommand) -> list[str]:
    """Options of `command` a mistyped `typed` may have meant: a habit's alias (--cache for --out), the options
    that contain the typed word (--private: --allow-private-network), then close spellings (as click's)."""
    import difflib

    names = [n for p in command.params if p.param_type_name == "option" for n in (*p.opts, *p.secondary_opts)]
    longs = [n for n in names if n.startswith("--") and n != "--help"]
    if typed in _OUT_ALIASES and "--out" in names:
        return ["--out"]
    found = []
    word = typed.lstrip("-")
    if len(word) >= 3:
        found += [n for n in longs if word in n]
    found += difflib.get_close_matches(typed, longs, n=3, cutoff=0.6)
    return list(dict.fromkeys(found))[:3]


def _parse_args(self: typer.core.TyperCommand, ctx: Any, args: list[str]) -> list[str]:
    """Click's parse, with an unknown option's suggestions from `option_suggestions` (the error class is
    click's, or the copy of click that typer >= 0.2x vendors: matched by name)."""
    try:
        return _typer_parse_args(self, ctx, args)
    except Exception as exc:
        if type(exc).__name__ != "NoSuchOption":
            raise
        typed: str = getattr(exc, "option_name", "")
        hints = option_suggestions(typed, self)
        if not hints and typed in _OUT_ALIASES and any(p.name == "cache_dir" for p in self.params):
            hint = " (the cache directory is this command's DIR argument)"
        elif len(hints) == 1:
            hint = f" (did you mean {hints[0]}?)"
        else:
            hint = f" (possible options: {', '.join(hints)})" if hints else ""
        no_such_option: Any = type(exc)
        raise no_such_option(typed, f"No such option: {typed}{hint}", ctx=ctx) from None


_typer_parse_args = typer.core.TyperCommand.parse_args
typer.core.TyperCommand.parse_args = _parse_args  # type: ignore[method-assign, assignment]  # typer has no hook for suggestions
_typer_argument_type = typer.core.TyperArgument.display_type_rich
typer.core.TyperArgument.display_type_rich = _argument_type  # type: ignore[method-assign, assignment]  # typer has no hook for help text
typer.core.TyperArgument._usage_display_name = _argument_usage  # type: ignore[method-assign]  # as above
typer.core.TyperOption.display_type_rich = _option_metavar  # type: ignore[method-assign]  # as above


def _print_version(value: bool) -> None:
    if value:
        print(f"mmprep {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", help="Print mmprep's version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Precompute vision-model embeddings for JSONL image manifests into a safetensors cache."""


def env_name(name: str) -> str:
    return "MMPREP_" + name.upper().replace("-", "_")


def option(name: str, help: str, metavar: str | None = None, **kw: object) -> object:
    """An option of `encode`/`check` with its MMPREP_<NAME> environment variable; `metavar` names its value in help."""
    return typer.Option(f"--{name}", envvar=env_name(name), help=help, metavar=metavar, **kw)  # type: ignore[arg-type]  # **kw: typer.Option's own keywords, untyped here


PROGRESS = ("auto", "bar", "log", "none")
MAX_SIZE = 1024**4  # sizes (--max-bytes, --shard-size) above 1 TiB are typos
MAX_SIDE = 16384  # check --size: a side above this is a typo, and would allocate gigabytes per row


def parse_size(text: str, name: str) -> int:
    """'20MiB', '20M', '512k', '1048576' → bytes (binary multiples); `name` is the option, for the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{name}: not a size: {text!r} (examples: 20MiB, 512k, 1048576)")
    unit = m.group(2).lower()
    factor = 1024 ** ("kmgt".find(unit) + 1) if unit else 1
    size = int(float(m.group(1)) * factor)
    if size > MAX_SIZE:
        raise UsageError(f"{name}: {text!r} is over the largest size accepted, 1 TiB")
    return size


def check_choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}, not {value!r}")
    return value


def parse_duration_option(text: str, name: str) -> float:
    """'30d', '12h' → seconds; a bad value is a usage error naming the option."""
    from mmprep.settings import parse_duration  # not via store.gc: that imports torch, and this runs before the lock

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def parse_rgb(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise UsageError(f"--alpha-background: expected R,G,B with values 0-255, got {text!r}")
    return rgb


def parse_formats(text: str) -> tuple[str, ...]:
    """'jpeg,png' → ('JPEG', 'PNG'), checked against the formats Pillow can open."""
    from PIL import Image

    Image.init()
    names = tuple(f.strip().upper() for f in text.split(",") if f.strip())
    unknown = [n for n in names if n not in Image.OPEN]
    if not names or unknown:
        raise UsageError(
            f"--formats: unknown image format(s) {', '.join(unknown) or repr(text)}; Pillow knows e.g. JPEG, PNG, WEBP, GIF"
        )
    return names


def parse_shard(text: str | None) -> ShardSpec | None:
    """'2/4' → ShardSpec(2, 4); parts are numbered from 1."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(f"--shard: expected I/N with 1 <= I <= N (e.g. 1/4), got {text!r}")
    return ShardSpec(int(m.group(1)), int(m.group(2)))


def parse_wxh(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not 0 < int(m.group(1)) <= MAX_SIDE or not 0 < int(m.group(2)) <= MAX_SIDE:
        raise UsageError(f"--size: expected WxH like 224x224, each side 1 to {MAX_SIDE}, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cache_dir_of(path: Path | None) -> Path:
    """The cache directory: the argument (or $MMPREP_CACHE_DIR, which typer reads for it), else ./mmprep-cache;
    a file there is a usage error."""
    if os.environ.get("MMPREP_OUT") and not os.environ.get(CACHE_DIR_ENV):  # the cache directory's old second name
        err.print(f"[yellow]warning:[/yellow] MMPREP_OUT is not read; set {CACHE_DIR_ENV} for the cache directory")
    out = path or Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a directory (the cache directory)")
    return out


CACHE_DIR_HELP = f"Cache directory [default: ./{DEFAULT_CACHE_DIR}]."
CacheDirArg = Annotated[
    Optional[Path], typer.Argument(help=CACHE_DIR_HELP, metavar="DIR", envvar=CACHE_DIR_ENV, show_default=False)
]


def hide_transformers_progress_bars() -> None:
    """Our own progress output replaces transformers' per-load progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def model_label(m: dict) -> str:
    """The model's name, plus the pixel-changing decode flags its entries were made with."""
    from mmprep.imaging.decode import decode_flags

    flags = " ".join(decode_flags(m["decode"]))
    return f"{m['name']} ({flags})" if flags else m["name"]


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]  # a float from here on: only printed
    return str(n)


def fail(exc: MmprepError) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # [brackets] in messages; one line for logs
    codes = {CacheLockedError: EXIT_LOCKED, CacheWriteError: EXIT_RUN_FAILED, EmptyManifestError: EXIT_EMPTY}
    raise typer.Exit(codes.get(type(exc), EXIT_USAGE))
