"""Runs in the vLLM venv (MMPREP_VLLM_PYTHON), never in mmprep's: one vLLM engine answers a job file's requests.

    python vllm_driver.py JOB.json OUT.json

JOB: {"model": DIR, "llm": {extra LLM(...) kwargs}, "max_tokens": N,
      "requests": [{"id": ID, <one input>}, ...]} where the input is one of
  "prompt" + "image_urls": [URL...]      LLM.generate, images fetched and decoded by vLLM (fetch_image)
  "prompt" + "embeds_files": [FILE...]   LLM.generate, multi_modal_data from safetensors files (each the
                                         dict mmprep's to_vllm gives, saved tensor by tensor; several are
                                         concatenated into one dict, as vLLM wants)
  "messages": [...]                      LLM.chat with these OpenAI messages, as given
  "batch_file": FILE                     LLM.chat on body.messages of each OpenAI batch line (ids: the
                                         request's "id_prefix" + the line's custom_id)
  "concurrent": [{"id", "messages"}...] LLM.chat on these conversations in one call (with the engine core in
                                         this process, VLLM_ENABLE_V1_MULTIPROCESSING=0, all are added before
                                         the engine's first step: the scheduler sees them together)
  "command": [ARGV...], "env": {...}     not a request: a command run between two requests while the
                                         engine lives (e.g. `mmprep encode`, `mmprep gc`)
OUT: {"vllm": version, "results": {ID: {"token_ids", "logprobs", "prompt_token_ids", "seconds"} or {"error"}},
      "commands": {ID: {"returncode", "output"}}}.
Before each request or command the driver prints `mmprep-interop: <ID>` to its log, so a test can
tell which of vLLM's log lines belong to which request.

Greedy, ignore_eos, one request at a time ("seconds" is its wall time: with max_tokens=1, its time to
first token), except the requests of one "concurrent" group. It imports nothing from mmprep: what reaches vLLM is exactly what the files hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from typing import Any

ENGINE_DEFAULTS: dict[str, Any] = dict(
    dtype="float32", enforce_eager=True, max_model_len=2048, enable_mm_embeds=True,
    limit_mm_per_prompt={"image": 4, "video": 0}, seed=0,
)  # fmt: skip


def _result(output: Any, seconds: float) -> dict[str, Any]:
    completion = output.outputs[0]
    token_ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
    return {
        "token_ids": token_ids, "logprobs": logprobs,
        "prompt_token_ids": list(output.prompt_token_ids or []), "seconds": seconds,
        "finish_reason": completion.finish_reason,
    }  # fmt: skip


def _inputs(request: dict[str, Any]) -> tuple[str, Any]:
    """("generate", prompt dict) or ("chat", messages) for one request."""
    if "messages" in request:
        return "chat", request["messages"]
    if "image_urls" in request:
        from vllm.multimodal.utils import fetch_image

        images = [fetch_image(url) for url in request["image_urls"]]
        return "generate", {"prompt": request["prompt"], "multi_modal_data": {"image": images}}
    import torch
    from safetensors.torch import load_file

    items = [load_file(path) for path in request["embeds_files"]]
    # one dict for all the prompt's images: embeddings concatenated, grids stacked ([n_images, 3])
    data = items[0] if len(items) == 1 else {k: torch.cat([item[k] for item in items]) for k in items[0]}
    return "generate", {"prompt": request["prompt"], "multi_modal_data": {"image": data}}


def _expand(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batch-file requests become one chat request per line, keyed by the prefix and the line's custom_id."""
    expanded = []
    for request in requests:
        if "batch_file" not in request:
            expanded.append(request)
            continue
        with open(request["batch_file"], encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    envelope = json.loads(line)
                    request_id = request.get("id_prefix", "") + envelope["custom_id"]
                    expanded.append({"id": request_id, "messages": envelope["body"]["messages"]})
    return expanded


def main(job_path: str, out_path: str) -> int:
    import vllm
    from vllm import LLM, SamplingParams

    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    started = time.perf_counter()
    llm = LLM(model=job["model"], **{**ENGINE_DEFAULTS, **job.get("llm", {})})
    engine_seconds = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8), ignore_eos=True, logprobs=0)
    results: dict[str, Any] = {}
    commands: dict[str, Any] = {}
    for request in _expand(job["requests"]):
        print(f"mmprep-interop: {request['id']}", flush=True)
        if "command" in request:
            done = subprocess.run(
                request["command"], env=request.get("env"), capture_output=True, text=True, check=False
            )
            commands[request["id"]] = {"returncode": done.returncode, "output": (done.stdout + done.stderr)[-4000:]}
            continue
        if "concurrent" in request:  # one LLM.chat call: vLLM schedules them together
            group = request["concurrent"]
            start = time.perf_counter()
            try:
                outputs = llm.chat([r["messages"] for r in group], params, use_tqdm=False)
                for member, output in zip(group, outputs):
                    results[member["id"]] = _result(output, time.perf_counter() - start)
            except Exception as exc:
                for member in group:
                    results[member["id"]] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                traceback.print_exc()
            continue
        try:
            kind, inputs = _inputs(request)
            start = time.perf_counter()
            if kind == "chat":
                [output] = llm.chat(inputs, params, use_tqdm=False)
            else:
                [output] = llm.generate(inputs, params, use_tqdm=False)
            results[request["id"]] = _result(output, time.perf_counter() - start)
        except Exception as exc:  # recorded per request: the test decides whether a refusal was expected
            results[request["id"]] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            traceback.print_exc()
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(
            {"vllm": vllm.__version__, "engine_seconds": engine_seconds, "results": results, "commands": commands}, f
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
