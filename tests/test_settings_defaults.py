"""Each default is written once, in mmprep/settings.py: the CLI's options and its settings builder read them there."""

from __future__ import annotations

from pathlib import Path

from typer.main import get_command

from mmprep.cli import app
from mmprep.cli.common import parse_size
from mmprep.cli.run import load_settings
from mmprep.settings import (
    ExportSettings, LoadSettings, ModelSettings, Settings, duration_text, parse_duration, size_text,
)  # fmt: skip


def defaults(command: str) -> dict:
    return {p.name: p.default for p in get_command(app).commands[command].params}  # type: ignore[attr-defined]


def test_load_settings_takes_keywords_and_defaults_to_load_settings() -> None:
    assert load_settings() == LoadSettings()
    assert load_settings(max_bytes="1MiB", allow_host=["a.example"]) == LoadSettings(
        max_bytes=1 << 20, allow_hosts=("a.example",)
    )


def test_encode_and_check_options_default_to_the_settings() -> None:
    s = Settings(out=Path("cache"), model=ModelSettings(name="m"))
    for command in ("encode", "check"):
        d = defaults(command)
        assert parse_size(d["max_bytes"], "--max-bytes") == s.load.max_bytes, command
        for name in ("concurrency", "per_host", "timeout", "max_redirects", "retries", "max_pixels", "decode_as",
                     "allow_http", "allow_private_network", "fast_decode", "max_side"):  # fmt: skip
            assert d[name] == getattr(s.load, name), (command, name)
        assert (d["url_col"], d["id_col"]) == (s.load.manifest.url_col, s.load.manifest.id_col), command
        assert (d["progress"], d["progress_interval"]) == (s.progress, s.log_every), command
    d = defaults("encode")
    assert (d["batch_size"], d["device"], d["dtype"]) == (s.model.batch_size, s.model.device, s.model.dtype)
    assert parse_size(d["shard_size"], "--shard-size") == s.shard_bytes
    assert parse_duration(d["retry_permanent_after"]) == s.retry_permanent_after
    assert (d["wait_lock"], d["retry_failed"], d["json_out"]) == (s.wait_lock, s.retry_failed, s.json)
    e, x = defaults("export"), ExportSettings(Path(), Path(), "npy")
    assert (e["fmt"], e["rows_per_file"], e["key"], e["progress"]) == (x.format, x.rows_per_file, x.key, x.progress)


def test_help_texts_read_back_as_the_same_values() -> None:
    for seconds in (7 * 86400, 3600, 90, 1.5, 0):
        assert parse_duration(duration_text(seconds)) == seconds
    for size in (20 << 20, 128 << 20, 1 << 30, 1000, 1536):
        assert parse_size(size_text(size), "--max-bytes") == size
    assert (duration_text(7 * 86400), size_text(20 << 20)) == ("7d", "20MiB")  # what --help shows
