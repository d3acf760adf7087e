"""Issue #23 on a real vLLM for the other Qwen families: `MmprepECConnector` serves Qwen2.5-VL, Qwen3-VL
(deepstack levels side by side) and Qwen3.5 straight from an mmprep cache.

One engine per family (ec_consumer, the connector on the cache, totals logged after every check) answers
all of that family's requests in one driver run: metadata-only requests (`mmprep rewrite --target
vllm-ec`), image_url + uuid, and plain image_url (vLLM's identifier, recorded by `encode --vllm-model-id`),
each for a plain PNG, an EXIF-rotated JPEG and a transparent PNG; then two requests sent together that
name one uuid for two different images. The reference is the same engine's vision encoder: a request
whose uuid is in no cache (`nocache-*`) runs it. tests/interop/test_vllm_connector.py proves the rest of
the connector (late entries, rejected entries, gc, a read-only mount) on Qwen2-VL.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from _image_corpus import encode as encode_image
from _image_corpus import exif_jpeg
from _model_helpers import pattern_image
from _tiny_vlm import save_tiny_qwen2_5_vl, save_tiny_qwen3_5, save_tiny_qwen3_vl
from _vllm import transparent_png
from _vllm import (
    IMAGE_PROMPT, LOGPROB_TOLERANCE, QUESTION, VllmRun, connector_counts, encode, max_logprob_gap, mismatch, mmprep, run_vllm, served, vllm_python,
)  # fmt: skip
from mmprep import cache_key
from mmprep.serving import to_vllm
from mmprep.store.reader import EmbeddingCache


@dataclass(frozen=True)
class Family:
    """One Qwen family as the tier serves it: how its tiny model is built, what vLLM calls it, its engine dtype."""

    save: Callable[[Path], Path]
    architecture: str  # vLLM's model class
    cache_family: str  # mmprep's family of the model (its EC layout)
    llm: dict[str, Any]  # engine options beyond the driver's defaults
    encoder_tolerance: float = LOGPROB_TOLERANCE  # vs vLLM's encoder (vs the same tensor inline: INLINE_TOLERANCE)


FAMILIES = {
    "qwen2_5_vl": Family(save_tiny_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration", "qwen2_vl", {}),
    # vLLM's processor cache off: a uuid's second image is processed, not replaced by the first's (see the last test)
    "qwen3_vl": Family(save_tiny_qwen3_vl, "Qwen3VLForConditionalGeneration", "qwen3_vl", {"mm_processor_cache_gb": 0}),
    # bfloat16: vLLM's CPU gated delta-net (Qwen3.5's linear-attention layers) runs in nothing else
    # ("CPU GDN attention requires BF16", vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py). vLLM's
    # bf16 vision tower then differs from transformers' (mmprep's) by bf16 rounding: measured up to 1.5e-2
    # in logprob, the same tokens, whether mmprep encodes in float32 or bfloat16. The connector's answer is
    # held to INLINE_TOLERANCE against the same tensor given inline (vLLM's image_embeds input).
    "qwen3_5": Family(
        save_tiny_qwen3_5, "Qwen3_5ForConditionalGeneration", "qwen3_5", {"dtype": "bfloat16"}, encoder_tolerance=5e-2
    ),
}


IMAGES = {
    "a.png": encode_image(pattern_image((112, 84), seed=1), "PNG"),
    "exif6.jpg": exif_jpeg(pattern_image((150, 90), seed=10), orientation=6),  # decoded as 90 x 150
    "alpha.png": transparent_png(),
}
HELD, OTHER = "a.png", "exif6.jpg"  # sent together under HELD's uuid (12 and 15 merged tokens in each family)
# The connector's answer vs the same cached tensor given inline: one tensor, one engine, one request at a time
# (measured: 0 in every family; an entry scaled by 1.05 moves Qwen3.5's, the least sensitive, by 1.6e-3).
INLINE_TOLERANCE = 1e-5
# The engine core and its worker in the driver's process (about 3 s to start instead of 25): LLM.chat then adds
# every request of a concurrent group before the engine's first step, so the scheduler checks them together.
ENGINE_IN_PROCESS = {"distributed_executor_backend": "uni"}
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PATHS = ("meta", "uuid", "vllm-id")
CONNECTOR = "mmprep.serving.vllm_connector"


def url_part(url: str, uuid: str | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    return part if uuid is None else {**part, "uuid": uuid}


def chat(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


class Served:
    """One family's engine run: its answers, and what the connector counted for each request."""

    def __init__(self, family: str, run: VllmRun, urls: dict[str, str], rewritten: list[dict[str, Any]]) -> None:
        self.family, self.run, self.urls, self.rewritten = family, run, urls, rewritten
        self.counts = connector_counts(run.log)

    def same_as(self, reference: str, request: str, tolerance: float = LOGPROB_TOLERANCE) -> float:
        """Assert `request` generated what `reference` did; their largest logprob gap."""
        reason = mismatch(self.run[reference], self.run[request], tolerance)
        assert reason is None, (self.family, request, reason)
        return max_logprob_gap(self.run[reference], self.run[request])

    def same_as_encoder(self, image: str, request: str) -> float:
        """`request` generated what vLLM's encoder did on `image` (within the family's tolerance)."""
        return self.same_as(f"encoder:{image}", request, FAMILIES[self.family].encoder_tolerance)


@pytest.fixture(scope="module", params=list(FAMILIES))
def served_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vllm_python()  # skip before building anything when there is no vLLM
    name: str = request.param
    family = FAMILIES[name]
    root = tmp_path_factory.mktemp(f"vllm-connector-{name}")
    model = family.save(root / "model")
    model_id = str(model)  # the string vLLM is started with: part of its identifiers
    cache = root / "cache"
    with served(IMAGES) as urls:
        summary = encode(list(urls.values()), model, cache, "--vllm-model-id", model_id)
        assert summary["encoded"] == len(IMAGES), summary

        batch, rewritten = root / "batch.jsonl", root / "batch.ec.jsonl"
        lines = [{"custom_id": n, "body": {"messages": chat(url_part(urls[n], None))}} for n in IMAGES]
        batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
        done = mmprep(
            "rewrite", str(batch), "-o", str(rewritten), "--cache", str(cache), "--target", "vllm-ec", "--json"
        )
        assert done.returncode == 0, done.stderr
        parts = [json.loads(line)["body"]["messages"][0]["content"][0] for line in rewritten.read_text().splitlines()]
        grids = {image: part["image_embeds"]["image_grid_thw"] for image, part in zip(IMAGES, parts)}
        assert math.prod(grids[HELD]) != math.prod(grids[OTHER]), grids  # else the uuid's entry would fit OTHER

        held = cache_key(urls[HELD])
        requests: list[dict[str, Any]] = [{"batch_file": str(rewritten), "id_prefix": "meta:"}]
        with EmbeddingCache(cache) as reader:
            for image in IMAGES:  # the cached tensors inline, without a uuid: vLLM's identifier is their hash
                entry, inline = reader.get(urls[image]), root / f"{image}.safetensors"
                assert entry is not None, image
                save_file({k: v.contiguous() for k, v in to_vllm(entry).items()}, str(inline))
                requests.append({"id": f"inline:{image}", "prompt": IMAGE_PROMPT, "embeds_files": [str(inline)]})
        for image in IMAGES:
            requests += [
                {"id": f"encoder:{image}", "messages": chat(url_part(urls[image], f"nocache-{image}"))},
                {"id": f"uuid:{image}", "messages": chat(url_part(urls[image], cache_key(urls[image])))},
                {"id": f"vllm-id:{image}", "messages": chat(url_part(urls[image], None))},
            ]
        requests += [
            {"id": "together", "concurrent": [
                {"id": "together:held", "messages": chat(parts[list(IMAGES).index(HELD)])},
                {"id": "together:other", "messages": chat(url_part(urls[OTHER], held))},
            ]},
            {"id": "after:other", "messages": chat(url_part(urls[OTHER], held))},
        ]  # fmt: skip
        ec_config = {
            "ec_connector": "MmprepECConnector", "ec_connector_module_path": CONNECTOR, "ec_role": "ec_consumer",
            "ec_connector_extra_config": {"cache_dir": str(cache), "log_interval_s": 0},
        }  # fmt: skip
        run = run_vllm(
            root / "vllm", model, requests, llm={"ec_transfer_config": ec_config, **ENGINE_IN_PROCESS, **family.llm},
            max_tokens=4, env=IN_PROCESS_ENV, with_mmprep=True,
        )  # fmt: skip
    print(f"{name}: vLLM {run.version}, engine up in {run.engine_seconds:.1f} s")
    yield Served(name, run, urls, parts)


def test_the_connector_serves_the_family(served_run: Served) -> None:
    log = served_run.run.log
    assert "Creating connector with name: MmprepECConnector" in log
    family = FAMILIES[served_run.family]
    assert re.search(rf"mmprep connector: serving \S+ \(\w+, {family.cache_family}\)", log), served_run.family
    assert f"Resolved architecture: {family.architecture}" in log, family.architecture


def test_rewrite_writes_metadata_only_parts(served_run: Served) -> None:
    """`rewrite --target vllm-ec`: each image becomes its placeholder metadata and its uuid, no pixels."""
    for image, part in zip(IMAGES, served_run.rewritten):
        assert part["type"] == "image_embeds" and part["uuid"] == cache_key(served_run.urls[image]), part
        assert list(part["image_embeds"]) == ["image_grid_thw"] and len(part["image_embeds"]["image_grid_thw"]) == 3


@pytest.mark.parametrize("path", PATHS)
def test_served_from_the_cache_generates_what_the_encoder_does(served_run: Served, path: str) -> None:
    """Metadata-only, image_url + uuid, image_url alone (vLLM's identifier): the encoder's tokens and logprobs,
    one hit per image (the EXIF-rotated JPEG and the transparent PNG included)."""
    gaps, inline_gaps = [], []
    for image in IMAGES:
        gaps.append(served_run.same_as_encoder(image, f"{path}:{image}"))
        inline_gaps.append(served_run.same_as(f"inline:{image}", f"{path}:{image}", INLINE_TOLERANCE))
        assert served_run.counts[f"{path}:{image}"] == (1, 0, 0), (served_run.family, path, image, served_run.counts)
        assert served_run.counts[f"encoder:{image}"] == (0, 1, 0), (served_run.family, image)
        assert served_run.counts[f"inline:{image}"] == (0, 1, 0), (served_run.family, image)
    print(
        f"{served_run.family} {path}: logprobs within {max(gaps):.2g} of the encoder's, "
        f"{max(inline_gaps):.2g} of the cached tensor given inline"
    )
    tolerance = FAMILIES[served_run.family].encoder_tolerance
    for first, second in itertools.combinations(IMAGES, 2):  # the images drive the output beyond the tolerance
        assert mismatch(served_run.run[f"encoder:{first}"], served_run.run[f"encoder:{second}"], tolerance), (
            first, second,
        )  # fmt: skip


def test_a_uuid_held_by_a_running_request_for_another_image(served_run: Served) -> None:
    """Two requests sent together (both reach the scheduler before the engine's first step) name one uuid: the
    first (metadata-only) holds HELD's entry, the second carries OTHER's pixels (15 merged tokens, HELD has 12)
    under it.

    With vLLM's processor cache on (its default), vLLM itself takes the uuid as the image's identity: the
    second request gets HELD's processed item and placeholders, the connector's hit is right for it, and
    the answer is HELD's. With the processor cache off, vLLM processes OTHER's pixels under the held uuid,
    and its encoder cache would fill OTHER's 15 placeholders with the held 12-row tensor: the connector fails
    that request alone, with an ERROR naming the uuid, while the first is served. Once the first is done, the
    same request is an ordinary rejected entry (a WARNING), which vLLM's own check then refuses (its encoder
    cache still holds the uuid's 12 rows)."""
    run, uuid = served_run.run, cache_key(served_run.urls[HELD])
    served_run.same_as_encoder(HELD, "together:held")
    if FAMILIES[served_run.family].llm.get("mm_processor_cache_gb") != 0:
        served_run.same_as_encoder(HELD, "together:other")
        assert served_run.counts["together"] == (2, 0, 0), served_run.counts["together"]
        served_run.same_as_encoder(HELD, "after:other")
        return
    other = run.generations["together:other"]
    assert other.finish_reason == "error" and not other.token_ids, other
    assert served_run.counts["together"] == (1, 0, 1), served_run.counts["together"]
    failures = re.findall(
        rf"ERROR.*its image uuid {uuid} names another image's embedding in a request still running", run.log
    )
    assert len(failures) == 1, failures
    # After the first is done the held tensor is released: the entry is an ordinary rejected one (a WARNING,
    # no second ERROR); vLLM's encoder cache still holds the uuid's 12 rows, and vLLM's own check fails it.
    assert served_run.counts["after:other"] == (0, 0, 1)
    assert re.search(
        rf"WARNING.*entry {uuid} rejected \(entry {uuid}: it has 12 rows and the request's placeholder has 15\)",
        run.log,
    )
    assert run.generations["after:other"].finish_reason == "error"
    assert re.search(rf"WARNING.*identifier '{uuid}' holds 12 embeddings, but request \S+ input 0 expects 15", run.log)
