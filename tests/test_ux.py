"""The first hour and the nightly job (issue 13): failures that settings or time can change are tried again,
exit codes tell new failures from old ones, the index migrates from schema 1, and the CLI says what it does.
Every test goes through the real entry point (typer's CliRunner), against real files, servers and SQLite."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _http import Handler, serve
from _cli import cli
from conftest import image_bytes
from mmprep import cache_key
from mmprep.cli import app

TINY = ["--model", "builtin:tiny-clip", "--progress", "none"]


def encode(manifest: Path, out: Path, *args: str) -> tuple[int, dict]:
    result = cli("encode", str(manifest), "--out", str(out), *TINY, "--json", *args)
    assert result.stdout.strip().startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout)


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def failure_rows(out: Path) -> dict[str, tuple]:
    db = sqlite3.connect(out / "index.sqlite")
    rows = {r[0]: r[1:] for r in db.execute("SELECT url, kind, depends_on FROM failures")}
    db.close()
    return rows


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Local images: three PNGs, a BMP (not in the default --formats) and a 20 kB PNG."""
    root = tmp_path_factory.mktemp("imgs")
    files = {}
    for i in range(3):
        files[f"png{i}"] = root / f"{i}.png"
        files[f"png{i}"].write_bytes(image_bytes("RGB", (24 + i, 30), "PNG", i))
    files["bmp"] = root / "x.bmp"
    files["bmp"].write_bytes(image_bytes("RGB", (20, 20), "BMP", 7))
    return files


# -- failures that settings or time can change ----------------------------------------------------


def test_settings_dependent_failures_are_retried_when_those_settings_change(tmp_path, images):
    """bad_path (no --allow-local-dir), then unsupported_format (BMP): each is tried again once the setting it
    depended on changed, and a rerun with unchanged settings skips it without exit 1."""
    out = tmp_path / "cache"
    manifest = write_rows(tmp_path / "m.jsonl", [str(images["png0"]), str(images["bmp"])])
    code, first = encode(manifest, out)
    assert code == 1 and first["failures_by_kind"] == {"bad_path": 2} and first["new_failures"] == 2
    assert all(
        depends == json.dumps({"allow_local_dirs": []}, separators=(",", ":"))
        for _, depends in failure_rows(out).values()
    )

    allow = ["--allow-local-dir", str(images["png0"].parent)]
    more = write_rows(tmp_path / "more.jsonl", [str(images["png0"]), str(images["bmp"]), str(images["png2"])])
    code, second = encode(more, out, *allow, "--retry-failed")  # the setting changed: both tried again
    assert second["retried_failures"] == 2 and second["encoded"] == 1
    assert second["skipped_other"] == 1  # --retry-failed: the new row waits for a plain run
    assert second["failures_by_kind"] == {"unsupported_format": 1}
    assert code == 1 and second["new_failures"] == 1  # failed in another way: a new failure

    code, third = encode(manifest, out, *allow)  # nothing changed: skipped, counted, not fatal
    assert (code, third["skipped_failed"], third["failed"], third["cached"]) == (0, 1, 0, 1)

    code, fourth = encode(manifest, out, *allow, "--formats", "JPEG,PNG,WEBP,BMP")
    assert (code, fourth["encoded"], fourth["retried_failures"], fourth["failed"]) == (0, 1, 1, 0)
    assert failure_rows(out) == {}


def gone_then_back(h: Handler) -> None:
    """404 until the test puts an image there."""
    body = h.server.body  # type: ignore[attr-defined]
    h.reply(200, body, {"Content-Type": "image/png"}) if body else h.reply(404, b"gone", {"Content-Type": "text/plain"})


def test_permanent_failures_expire_and_old_ones_do_not_fail_the_cron_job(tmp_path):
    out = tmp_path / "cache"
    net = ["--allow-http", "--allow-host", "127.0.0.1", "--retries", "0"]
    with serve() as server:
        server.body = b""  # type: ignore[attr-defined]
        server.routes["/img.png"] = gone_then_back
        manifest = write_rows(tmp_path / "m.jsonl", [server.url("/img.png")])
        code, first = encode(manifest, out, *net)
        assert code == 1 and first["failures_by_kind"] == {"http_status": 1}
        code, again = encode(manifest, out, *net)  # default: tried again after 7 days, so skipped now
        assert (code, again["skipped_failed"], again["failed"]) == (0, 1, 0)
        code, expired = encode(manifest, out, *net, "--retry-permanent-after", "0")  # still 404: an old failure
        assert (code, expired["failed"], expired["new_failures"], expired["retried_failures"]) == (0, 1, 0, 1)
        server.body = image_bytes("RGB", (30, 30), "PNG", 3)  # type: ignore[attr-defined]
        code, never = encode(manifest, out, *net, "--retry-permanent-after", "never")
        assert (code, never["skipped_failed"], never["encoded"]) == (0, 1, 0)
        code, back = encode(manifest, out, *net, "--retry-permanent-after", "0s")
        assert (code, back["encoded"], back["failed"]) == (0, 1, 0)
    human = cli("encode", str(manifest), "--out", str(out), *TINY, *net, "--retry-permanent-after", "soon")
    assert human.exit_code == 2 and "--retry-permanent-after" in human.output


def test_gc_failures_forgets_records_by_kind_and_age(tmp_path, images):
    out = tmp_path / "cache"
    bad = ["data:text/plain;base64,aGk=", str(images["png0"]), "{not json"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(bad[0]) + "\n" + json.dumps(bad[1]) + "\n" + bad[2] + "\n")
    assert encode(manifest, out)[0] == 1
    assert len(failure_rows(out)) == 3
    dry = cli("gc", str(out), "--failures", "--kind", "bad_path", "--dry-run")
    assert dry.exit_code == 0 and "would forget 1 failure record " in dry.output and len(failure_rows(out)) == 3
    assert cli("gc", str(out), "--failures", "--kind", "nonsense").exit_code == 2
    assert cli("gc", str(out), "--kind", "bad_path").exit_code == 2  # --kind needs --failures
    assert "forgot 0 failure records" in cli("gc", str(out), "--failures", "--older-than", "1d").output
    assert "forgot 1 failure record;" in cli("gc", str(out), "--failures", "--kind", "bad_path").output
    assert {kind for kind, _ in failure_rows(out).values()} == {"bad_data_url", "bad_manifest_line"}
    assert "forgot 2 failure records" in cli("gc", str(out), "--failures").output and failure_rows(out) == {}


def test_an_index_of_schema_1_opens_and_migrates_in_place(tmp_path, images):
    """A cache written before failures recorded their settings: read-only commands read it as it is, the next
    writer migrates it in place (schema 2) and tries its settings-dependent failures once."""
    out = tmp_path / "cache"
    manifest = write_rows(tmp_path / "m.jsonl", [str(images["png0"]), str(images["png1"])])
    allow = ["--allow-local-dir", str(images["png0"].parent)]
    encode(write_rows(tmp_path / "one.jsonl", [str(images["png0"])]), out, *allow)
    encode(manifest, out)  # png1: bad_path (no --allow-local-dir)
    db = sqlite3.connect(out / "index.sqlite")
    db.execute("ALTER TABLE failures DROP COLUMN depends_on")  # the schema-1 table
    db.execute("UPDATE meta SET value='1' WHERE name='schema_version'")
    db.commit()
    db.close()
    stats = cli("stats", str(out), "--json")
    assert stats.exit_code == 0 and json.loads(stats.stdout)["failures_by_kind"] == {"bad_path": 1}
    shown = cli("show", str(out), str(images["png1"]))
    assert shown.exit_code == 1 and json.loads(shown.stdout)["failures"][0]["kind"] == "bad_path"
    merged = cli("merge", str(tmp_path / "merged"), str(out))
    assert merged.exit_code == 0 and "1 failure," in merged.output
    shutil.copytree(out, tmp_path / "copy")
    rebuilt = cli("index", "rebuild", str(tmp_path / "copy"))  # the old index it keeps runs and failures of: schema 1
    assert rebuilt.exit_code == 0 and "kept 2 runs, 1 failure)" in rebuilt.output
    code, summary = encode(manifest, out, *allow)  # unknown settings: tried once, now with the directory allowed
    assert (code, summary["retried_failures"], summary["encoded"], summary["cached"]) == (0, 1, 1, 1)
    db = sqlite3.connect(out / "index.sqlite")
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == "2"
    assert "depends_on" in {r[1] for r in db.execute("PRAGMA table_info(failures)")}
    db.close()


# -- the CLI says what it does --------------------------------------------------------------------


def all_commands():
    import typer

    root = typer.main.get_command(app)
    stack = [([], root)]
    while stack:
        path, command = stack.pop()
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            stack.append((path + [name], sub))


def test_every_commands_help_renders_defaults_metavars_and_brackets():
    seen = []
    for path in all_commands():
        text = cli(*path, "--help").output
        seen.append(" ".join(path))
        for bad in ("<bool>", "<list[", "<str>", "<path>", "MMPREP_OUT", "{"):
            assert bad not in text, (path, bad, text)
        assert not re.search(r" \.(\s|$)", text), (path, text)  # a sentence cut before its default
    assert {"encode", "check", "stats", "verify", "gc", "show", "merge", "index rebuild"} <= set(seen)
    encode_help = " ".join(cli("encode", "--help").output.split())
    assert "mmprep[ray]" in encode_help and "--out DIR" in encode_help and "MMPREP_CACHE_DIR" in encode_help
    assert "default: (CPU count)" in encode_help and "--retry-permanent-after AGE" in encode_help
    assert "default: 128MiB" in encode_help  # the one default, from Settings
    assert "MMPREP_CACHE_DIR" in cli("stats", "--help").output and "[DIR] URL_OR_KEY" in cli("show", "--help").output


def test_version_and_option_errors_name_the_option(tmp_path, images):
    from mmprep import __version__

    assert cli("--version").output.strip() == f"mmprep {__version__}"
    manifest = write_rows(tmp_path / "m.jsonl", [str(images["png0"])])
    shard = cli("encode", str(manifest), *TINY, "--out", str(tmp_path / "c"), "--shard", "3/2")
    assert shard.exit_code == 2 and "--shard" in shard.output
    size = cli("encode", str(manifest), *TINY, "--out", str(tmp_path / "c"), "--shard-size", "big")
    assert size.exit_code == 2 and "--shard-size" in size.output
    bare = cli("encode", str(manifest), "--model", "tiny-clip", "--out", str(tmp_path / "c"), "--progress", "none")
    assert bare.exit_code == 2 and "builtin:tiny-clip" in bare.output


def test_cheap_checks_come_before_the_model_loads(tmp_path, images):
    manifest = write_rows(tmp_path / "m.jsonl", [str(images["png0"])])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = cli("encode", str(manifest), *TINY, "--out", str(a_file))
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    from mmprep.store.lock import WriterLock

    out = tmp_path / "locked"
    with WriterLock(out):  # a model that cannot load: exit 75 proves the lock was checked before loading it
        locked = cli("encode", str(manifest), "--model", str(tmp_path / "no-model"), "--out", str(out))
        assert locked.exit_code == 75 and "--wait-lock" in locked.output
        # ... and before anything heavy: in a process where importing torch fails, it still exits 75
        no_torch = "import sys; sys.modules['torch'] = None; from mmprep.cli import main; main()"
        args = ["encode", str(manifest), *TINY, "--out", str(out)]
        proc = subprocess.run([sys.executable, "-c", no_torch, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr


def test_one_env_name_for_the_cache_dir_in_every_command(tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./mmprep-cache here
    out = tmp_path / "cache"
    manifest = write_rows(tmp_path / "m.jsonl", [str(images["png0"])])
    env = {"MMPREP_CACHE_DIR": str(out)}
    code = cli("encode", str(manifest), *TINY, "--allow-local-dir", str(images["png0"].parent), env=env).exit_code
    assert code == 0 and (out / "index.sqlite").is_file()
    for args in (["stats"], ["verify"], ["show", str(images["png0"])], ["gc", "--dry-run"]):
        result = cli(*args, env=env)
        assert result.exit_code == 0, (args, result.output)
    assert json.loads(cli("stats", "--json", env=env).stdout)["cache_dir"] == str(out)
    old = cli("stats", env={"MMPREP_CACHE_DIR": "", "MMPREP_OUT": str(out)})
    assert old.exit_code == 2 and "MMPREP_OUT is not read" in old.output  # not a name for it, and it says so


@pytest.fixture(scope="module")
def cache_with_ids(tmp_path_factory, images) -> Path:
    """A cache whose manifest gave ids, one URL twice under two ids, a data URL that is not an image,
    and the same bytes under two paths (content dedup)."""
    root = tmp_path_factory.mktemp("ids")
    twin = images["png0"].parent / "twin.png"
    twin.write_bytes(images["png0"].read_bytes())
    manifest = write_rows(root / "m.jsonl", [
        {"url": str(images["png0"]), "id": "sku-1"}, {"url": str(images["png0"]), "id": "sku-1b"},
        {"url": str(images["png1"]), "id": "sku-2"}, {"url": "data:text/plain;base64,aGk=", "id": "bad-1"},
    ])  # fmt: skip
    out = root / "cache"
    allow = ["--allow-local-dir", str(images["png0"].parent)]
    assert cli("encode", str(manifest), "--out", str(out), *TINY, *allow).exit_code == 1
    dedup = write_rows(root / "twin.jsonl", [{"url": str(twin), "id": "sku-twin"}])
    human = cli("encode", str(dedup), "--out", str(out), *TINY, *allow)
    assert human.exit_code == 0 and "content dedup" in human.output and "copied, not encoded" in human.output
    code, again = encode(dedup, out, *allow)
    return out


def test_show_by_id_hints_and_iso_times(cache_with_ids, images):
    out = cache_with_ids
    by_id = cli("show", str(out), "--id", "sku-2")
    info = json.loads(by_id.stdout)
    assert by_id.exit_code == 0 and info["key"] == cache_key(str(images["png1"]))
    assert info["entries"][0]["created"].endswith("Z") and "T" in info["entries"][0]["created"]
    failed = json.loads(cli("show", str(out), "--id", "bad-1").stdout)
    assert not failed["cached"] and failed["failures"][0]["kind"] == "bad_data_url"
    assert failed["failures"][0]["last_seen"].endswith("Z")
    miss = cli("show", str(out), "sku-2")  # an id where the URL goes
    assert miss.exit_code == 1 and "did you mean `mmprep show --id sku-2`" in miss.output
    assert cli("show", str(out), "--id", "sku-1b").exit_code == 1  # a repeated URL keeps the first row's id
    assert cli("show", "--id", "sku-1", env={"MMPREP_CACHE_DIR": str(out)}).exit_code == 0  # DIR defaults
    assert cli("show", str(out), "a", "b").exit_code == 2


def test_summary_stats_and_json_words(cache_with_ids):
    out = cache_with_ids
    stats = cli("stats", str(out))
    assert "failing rows by kind" in stats.stdout and "failing rows by host" in stats.stdout
    runs = json.loads(cli("stats", str(out), "--json").stdout)["runs"]
    assert all(r["started"].endswith("Z") and r["finished"].endswith("Z") for r in runs)
    assert [r["encoded"] for r in runs] == [0, 0, 2]  # content dedup is not counted as encoded
    summaries = [json.loads(r[0]) for r in sqlite3.connect(out / "index.sqlite").execute(
        "SELECT summary FROM runs ORDER BY started")]  # fmt: skip
    assert [s["content_dedup"] for s in summaries] == [0, 1, 0] and summaries[2]["cached"] == 1
    dry = cli("gc", str(out), "--older-than", "0s", "--dry-run")
    assert "would drop 3 entries" in dry.output and "dropped" not in dry.output.replace("would drop", "")


def test_check_speaks_words_not_dicts(tmp_path, images):
    manifest = write_rows(tmp_path / "m.jsonl", [str(images["png0"]), "data:text/plain;base64,aGk="])
    result = cli("check", str(manifest), "--allow-local-dir", str(images["png0"].parent), "--progress", "none",
                 "--errors", str(tmp_path / "e.jsonl"))  # fmt: skip
    assert result.exit_code == 1
    assert "2 rows: 1 ok, 1 failed (bad_data_url 1)" in result.output and "{" not in result.output
    assert "m.jsonl:2 bad_data_url:" in result.output  # the first error records, printed


def test_verify_repair_quarantines_a_damaged_shard(tmp_path, images):
    out = tmp_path / "cache"
    allow = ["--allow-local-dir", str(images["png0"].parent)]
    manifest = write_rows(tmp_path / "m.jsonl", [str(images[f"png{i}"]) for i in range(3)])
    assert encode(manifest, out, *allow)[0] == 0
    [shard] = list((out / "shards").rglob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\0\0\0\0"  # four bytes of tensor data
    shard.write_bytes(bytes(data))
    repaired = cli("verify", str(out), "--deep", "--repair")
    assert repaired.exit_code == 1 and "1 problem (1 checksum_mismatch)" in repaired.stdout
    assert "3 entries dropped from the index" in repaired.stdout and "quarantine" in repaired.stdout
    assert (out / "quarantine" / shard.relative_to(out / "shards")).is_file() and not shard.exists()
    code, again = encode(manifest, out, *allow)
    assert (code, again["encoded"]) == (0, 3)


# -- progress and the end of a run, as a user's terminal or cron log sees them --------------------


def slow_image(h: Handler) -> None:
    time.sleep(0.15)
    server = h.server
    with server.lock:
        server.served += 1  # type: ignore[attr-defined]
        if server.served == server.interrupt_after:  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the encode running in this process receives it
    h.reply(
        200, image_bytes("RGB", (32, 32), "PNG", int(h.path.strip("/").split(".")[0])), {"Content-Type": "image/png"}
    )


def counts(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (f.split("=") for f in line.split() if "=" in f and f.split("=")[1].isdigit())}


def slow_run(tmp_path: Path, rows: int, interrupt_after: int = 0, *args: str):
    """`encode --progress log` every 0.1 s, two rows at a time from a server answering each after 0.15 s."""
    with serve() as server:
        server.served, server.interrupt_after = 0, interrupt_after  # type: ignore[attr-defined]
        for i in range(rows):
            server.routes[f"/{i}.png"] = slow_image
        manifest = write_rows(tmp_path / "m.jsonl", [server.url(f"/{i}.png") for i in range(rows)])
        net = ["--allow-http", "--allow-host", "127.0.0.1"]
        result = cli(
            "encode",
            str(manifest),
            "--out",
            str(tmp_path / "cache"),
            "--model",
            "builtin:tiny-clip",
            *net,
            "--concurrency",
            "2",
            "--batch-size",
            "2",
            "--progress",
            "log",
            "--progress-interval",
            "0.1",
            *args,
        )
        if interrupt_after:
            again = encode(manifest, tmp_path / "cache", *net)
            return result, again
    return result, None


def test_log_progress_moves_before_the_first_shard_commit(tmp_path):
    """A slow server: log lines every 0.1 s count rows as they leave the model, long before the shard commits."""
    result, _ = slow_run(tmp_path, 12)
    stderr = result.stderr
    assert result.exit_code == 0, stderr
    lines = [counts(line) for line in stderr.splitlines() if " mmprep: done=" in line]
    before_commit = [c for c in lines if c["encoded"] > 0 and c["committed"] == 0]
    assert before_commit, stderr  # progress moved while nothing was committed yet
    assert len({c["encoded"] for c in lines}) >= 3  # it moved more than once
    assert lines[-1]["encoded"] == lines[-1]["committed"] == 12
    done = [int(line.split("done=")[1].split("/")[0]) for line in stderr.splitlines() if " mmprep: done=" in line]
    assert done == sorted(done) and " done=12/12 (100%)" in stderr
    summary_start = stderr.index("mmprep run ")
    assert stderr[summary_start - 1] == "\n"  # the summary starts on a line of its own


def test_interrupt_says_what_is_committed_and_a_rerun_goes_on(tmp_path):
    result, (code, again) = slow_run(tmp_path, 40, interrupt_after=10)
    assert result.exit_code == 130, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "rerun the same command to continue" in last
    committed = int(last.split()[1])
    assert committed >= 1 and "rows left" in last
    assert (code, again["cached"], again["encoded"]) == (0, committed, 40 - committed)
