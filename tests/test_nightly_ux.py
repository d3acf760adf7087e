"""Issue 22: a nightly job's last frictions and the offline serving demo's model directory.

Empty manifests stop before the model loads, hub errors come back in one request and one line, output
under cron carries no padding, `show` speaks errors.jsonl's types, `-h` and option suggestions help, the
first http error names every flag a loopback URL needs, and the builtin VLMs are complete model
directories (tokenizer, chat template) that `mmprep models path` prints. All through the real CLI,
against real files, real HTTP servers on 127.0.0.1 and real SQLite.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path

import pytest

from _cli import cli
from _http import Handler, serve
from conftest import image_bytes
from mmprep.errors import EXIT_EMPTY
from mmprep.pipeline.core import RunCounters
from mmprep.report import Reporter
from mmprep.settings import BUILTIN_MODELS

REPO = Path(__file__).resolve().parent.parent


def mmprep(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m mmprep` in a fresh interpreter (the hub client reads its settings at import)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "mmprep", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


# -- empty manifests (cron safety) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, body",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n  \n"),
        ("header.csv", b"url,id\n"),
        ("empty.txt.gz", gzip.compress(b"", mtime=0)),
    ],
)
def test_a_manifest_without_rows_exits_66_before_the_model_or_the_cache(tmp_path, name, body):
    manifest = tmp_path / name
    manifest.write_bytes(body)
    out = tmp_path / "cache"
    # a model that cannot load: had it been loaded, the run would end with exit 2 and "cannot load model"
    result = cli(
        "encode", str(manifest), "--model", str(tmp_path / "no-such-model"), "--out", str(out), "--progress", "none"
    )
    assert result.exit_code == EXIT_EMPTY == 66, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no rows in manifest" in lines[0] and name in lines[0] and "--allow-empty" in lines[0], (
        lines
    )
    assert "cannot load" not in result.stderr
    assert not out.exists()  # no lock taken, no index created
    check = cli("check", str(manifest), "--progress", "none", "--errors", str(tmp_path / "e.jsonl"))
    assert check.exit_code == 66 and "no rows in manifest" in check.stderr


def test_allow_empty_makes_an_empty_manifest_a_green_run(tmp_path):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("")
    check = cli("check", str(manifest), "--allow-empty", "--progress", "none", "--errors", str(tmp_path / "e.jsonl"))
    assert check.exit_code == 0, check.output
    run = cli("encode", str(manifest), "--allow-empty", "--model", "builtin:tiny-clip", "--out", str(tmp_path / "c"),
              "--progress", "none", "--json")  # fmt: skip
    assert run.exit_code == 0 and json.loads(run.stdout)["rows"] == 0, run.output


def test_an_empty_stdin_is_found_empty_at_the_end(tmp_path):
    result = cli("check", "-", "--progress", "none", "--errors", str(tmp_path / "e.jsonl"), input="")
    assert result.exit_code == 66 and "held no rows" in result.stderr and "--allow-empty" in result.stderr
    ok = cli("check", "-", "--progress", "none", "--errors", str(tmp_path / "e.jsonl"), "--allow-empty", input="")
    assert ok.exit_code == 0


def test_a_manifest_with_only_a_bad_row_is_not_empty(tmp_path):
    manifest = tmp_path / "cut.jsonl"
    manifest.write_text(
        '{"url": "https://example.com/a.pn'
    )  # truncated inside its only row: a bad row, not an empty file
    result = cli("check", str(manifest), "--progress", "none", "--errors", str(tmp_path / "e.jsonl"))
    assert result.exit_code == 1 and "bad_manifest_line" in result.stderr, result.output


# -- hub errors --------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: connections are refused


@contextmanager
def hub(status: int, error_code: str | None) -> Iterator[list[str]]:
    """A real HTTP server standing in for the model hub: answers every request with `status`; yields the requests."""
    seen: list[str] = []

    def answer(h: Handler) -> None:
        seen.append(f"{h.command} {h.path}")
        h.reply(status, b"", {"X-Error-Code": error_code} if error_code else {})

    with serve() as server:
        server.fallback = answer
        yield seen, server.url("")  # type: ignore[misc]


def hub_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """The hub at `endpoint`, an empty hub cache, and no HF_HUB_OFFLINE (as a user's shell would have it)."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
    }


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "http" not in lines[0] and "Retrying" not in done.stderr, lines[0]  # no hub URL, no retries
    return lines[0]


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text('{"url": "https://example.com/a.png"}\n')
    return path


def test_no_network_fails_in_one_line_that_says_what_to_do(tmp_path, manifest):
    done = mmprep("check", str(manifest), "--model", "nobody/unknown", "--progress", "none",
                  env=hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"), cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert "cannot be reached" in line and "--model DIR" in line and "HF_HUB_OFFLINE" in line, line


def test_a_hub_in_trouble_is_asked_once_not_retried(tmp_path, manifest):
    with hub(503, None) as (seen, endpoint):  # the hub client retries 5xx with backoff; the probe asks once
        done = mmprep("encode", str(manifest), "--model", "nobody/unknown", "--out", str(tmp_path / "c"),
                      "--progress", "none", env=hub_env(tmp_path, endpoint), cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    asked = [r for r in seen if "/resolve/" in r]  # (the hub client also makes a call of its own at start-up)
    assert asked == ["HEAD /nobody/unknown/resolve/main/config.json"], seen
    assert "--model DIR" in line, line


def test_an_unknown_id_says_so_and_names_a_token(tmp_path, manifest):
    with hub(404, "RepoNotFound") as (seen, endpoint):
        done = mmprep("check", str(manifest), "--model", "nobody/unknown", "--progress", "none",
                      env=hub_env(tmp_path, endpoint), cwd=tmp_path)  # fmt: skip
    line = one_line_error(done)
    assert "no such model on the hub" in line and "HF_TOKEN" in line and "--model DIR" in line, line
    assert len([r for r in seen if "/resolve/" in r]) == 1, seen


def test_offline_and_not_cached_says_which_setting_to_change(tmp_path, manifest):
    env = {**hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"), "HF_HUB_OFFLINE": "1"}
    line = one_line_error(mmprep("check", str(manifest), "--model", "nobody/unknown", env=env, cwd=tmp_path))
    assert "HF_HUB_OFFLINE is set" in line and "--model DIR" in line, line


# -- mmprep models path, and the builtins as complete model directories -----------------------------


def test_models_path_prints_a_builtins_complete_directory_on_one_line(mmprep_home):
    from transformers import AutoConfig, AutoTokenizer

    result = cli("models", "path", "builtin:tiny-qwen2-vl")
    assert result.exit_code == 0 and result.stdout.count("\n") == 1, result.output
    directory = Path(result.stdout.strip())
    assert directory == Path(mmprep_home) / "builtin" / "tiny-qwen2-vl"
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert (
        prompt
        == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt)["input_ids"]
    assert ids.count(config.image_token_id) == 1 and config.vision_start_token_id in ids
    assert max(ids) < config.text_config.vocab_size
    head = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert head in (32, 64)  # vLLM's CPU attention


def test_the_qwen3_vl_builtin_has_a_tokenizer_and_template_too():
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(cli("models", "path", "builtin:tiny-qwen3-vl").stdout.strip())
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.chat_template and config.text_config.head_dim in (32, 64)


def test_a_builtin_from_an_older_mmprep_is_rebuilt(tmp_path, monkeypatch):
    from mmprep.models.builtin import MARKER, builtin_model_dir

    monkeypatch.setenv("MMPREP_HOME", str(tmp_path))
    old = tmp_path / "builtin" / "tiny-clip"
    old.mkdir(parents=True)
    (old / MARKER).write_text(json.dumps({"name": "builtin:tiny-clip", "seed": 0}))  # no version: an older build
    assert builtin_model_dir("tiny-clip") == old
    assert json.loads((old / MARKER).read_text())["version"] >= 2 and (old / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == ["tiny-clip"]  # nothing left aside


def test_models_path_of_a_directory_and_of_a_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    assert cli("models", "path", str(tmp_path)).stdout == f"{tmp_path.resolve()}\n"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    done = mmprep(
        "models",
        "path",
        "someone/tiny",
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout == f"{snapshot}\n", done.stderr
    missing = mmprep("models", "path", "someone/other", env={"HF_HUB_CACHE": str(tmp_path / "hub")}, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stdout == "" and "not in the local hub cache" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


# -- help --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["encode"], ["index", "rebuild"], ["models", "path"], ["export"]])
def test_dash_h_is_help(command):
    short, long = cli(*command, "-h"), cli(*command, "--help")
    assert short.exit_code == long.exit_code == 0 and short.output == long.output and "Usage:" in short.output


def test_encode_help_lists_every_builtin():
    from mmprep.models.builtin import BUILDERS

    assert tuple(BUILDERS) == BUILTIN_MODELS  # the names --help shows are the builtins that exist
    text = " ".join(cli("encode", "--help").output.split())
    assert all(f"builtin:{name}" in text for name in BUILTIN_MODELS), text


@pytest.mark.parametrize(
    "args, hint",
    [
        (["encode", "--private", "m.jsonl"], "did you mean --allow-private-network?"),
        (["encode", "--cache", "c", "m.jsonl"], "did you mean --out?"),
        (["check", "--allow-privat", "m.jsonl"], "--allow-private-network"),
        (["stats", "--cache", "c"], "the cache directory is this command's DIR argument"),
        (["encode", "--empty-ok", "m.jsonl"], "did you mean --allow-empty?"),
    ],
)
def test_an_unknown_option_gets_a_useful_suggestion(args, hint):
    result = cli(*args)
    assert result.exit_code == 2 and f"No such option: {args[1]}" in result.output and hint in result.output, (
        result.output
    )


# -- the first error names every flag a loopback URL needs -------------------------------------------


def test_check_names_allow_private_network_with_allow_http_on_the_first_run(tmp_path, image_server):
    loopback = image_server.add("/a.png", image_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"url": loopback}) + "\n" + json.dumps({"url": "http://example.com/b.png"}) + "\n")
    errors = tmp_path / "e.jsonl"
    first = cli("check", str(manifest), "--progress", "none", "--errors", str(errors))
    records = [json.loads(line) for line in errors.read_text().splitlines()]
    assert first.exit_code == 1 and [r["kind"] for r in records] == ["bad_scheme", "bad_scheme"]
    assert "--allow-http" in records[0]["message"] and "--allow-private-network" in records[0]["message"], records[0]
    assert "--allow-private-network" in first.stderr
    assert "--allow-private-network" not in records[1]["message"]  # a public name needs --allow-http alone
    second = cli("check", str(manifest), "--progress", "none", "--errors", str(errors), "--allow-http",
                 "--allow-private-network", "--timeout", "5", "--retries", "0")  # fmt: skip
    kinds = [json.loads(line)["kind"] for line in errors.read_text().splitlines()]
    assert image_server.hits["/a.png"] == 1 and "bad_scheme" not in kinds and "blocked_url" not in kinds, second.output


# -- honest output -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> tuple[Path, Path]:
    """A cache of two local images and a failure that depends on a setting (http refused); its errors file."""
    root = tmp_path_factory.mktemp("honest")
    (root / "imgs").mkdir()
    rows = []
    for i in range(2):
        (root / "imgs" / f"{i}.png").write_bytes(image_bytes("RGB", (30 + i, 24), "PNG", i))
        rows.append({"url": str(root / "imgs" / f"{i}.png"), "id": f"image-with-a-rather-long-caller-id-{i}"})
    rows.append({"url": "http://example.com/x.png", "id": "plain-http"})
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "cache"
    result = cli("encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), "--progress", "log",
                 "--allow-local-dir", str(root / "imgs"))  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert not [line for line in lines if line != line.rstrip()], "trailing blanks in the run's log"
    assert any(line.startswith(" rows") or "rows" in line for line in lines)
    return out, next((out / "errors").glob("*.jsonl"))


def test_show_gives_nested_objects_and_the_booleans_of_errors_jsonl(small_cache):
    out, errors = small_cache
    record = json.loads(errors.read_text().splitlines()[0])
    shown = json.loads(cli("show", str(out), "http://example.com/x.png").stdout)
    failure = shown["failures"][0]
    assert failure["retryable"] is record["retryable"] is False
    assert isinstance(failure["depends_on"], dict) and failure["depends_on"], failure  # an object, not JSON text
    assert failure["kind"] == record["kind"] == "bad_scheme"


def test_stats_fits_100_columns_without_trailing_blanks(small_cache):
    out, _ = small_cache
    for _ in range(2):  # two runs in the table
        cli("encode", str(out.parent / "m.jsonl"), "--model", "builtin:tiny-clip", "--out", str(out),
            "--progress", "none", "--allow-local-dir", str(out.parent / "imgs"))  # fmt: skip
    text = cli("stats", str(out)).stdout
    lines = text.splitlines()
    assert "builtin:tiny-clip" in text and "recent runs" in text and "bad_scheme 1" in text, text
    assert max(len(line) for line in lines) <= 100, text
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]


def test_the_log_progress_has_an_eta_from_its_first_line():
    """The rate counts from the start, so the first progress line already has an ETA (it had none before
    a second sample existed: the first line under cron, the first ticks of the bar)."""
    stream = StringIO()
    counters = RunCounters(rows_expected=100)
    reporter = Reporter("log", every=0.05, stream=stream)
    reporter.start(counters)
    counters.encoded = 10
    try:
        for _ in range(2000):  # until the first log line (a bound, not a timing assertion)
            if stream.getvalue():
                break
            threading.Event().wait(0.01)
    finally:
        counters.encoded = 100
        reporter.stop(counters)
    first = stream.getvalue().splitlines()[0]
    assert "done=10/100" in first and " eta=" in first, first


def test_vllm_ec_export_progress_and_summary_agree(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes("RGB", (56 + 28 * i, 56), "PNG", i))
        rows.append(json.dumps({"url": str(tmp_path / "imgs" / f"{i}.png")}) + "\n")
    (tmp_path / "m.jsonl").write_text("".join(rows))
    out, store = tmp_path / "cache", tmp_path / "ec"
    encoded = cli("encode", str(tmp_path / "m.jsonl"), "--model", "builtin:tiny-qwen2-vl", "--out", str(out),
                  "--progress", "none", "--allow-local-dir", str(tmp_path / "imgs"))  # fmt: skip
    assert encoded.exit_code == 0, encoded.output
    for written, skipped in ((2, 0), (0, 2)):  # the second export finds both entries in the store
        result = cli("export", str(out), "--out", str(store), "--format", "vllm-ec", "--progress", "log")
        assert result.exit_code == 0, result.output
        progress = [line for line in result.stderr.splitlines() if "mmprep export:" in line][-1]
        summary = result.stderr.strip().splitlines()[-1]
        assert f"written={written} skipped={skipped}" in progress, progress
        assert f"{written} written, 0 replaced, {skipped} skipped" in summary, summary
