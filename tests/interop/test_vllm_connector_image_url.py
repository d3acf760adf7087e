"""Issue #23 on a real vLLM for the families whose requests keep their image_url: `MmprepECConnector` serves
LLaVA, LLaVA-NeXT and Gemma 3 embeddings straight from an mmprep cache (for Gemma 3 the only way vLLM 0.32
takes embeddings from outside: gemma3_mm.py asserts image_embeds is None).

vLLM's request parsers of these families publish no placeholder metadata, so `mmprep rewrite --target
vllm-ec` adds the entry's uuid to each cached `image_url` part; a plain `image_url` part hits through vLLM's
own identifier (recorded by `encode --vllm-model-id`). One engine per family (ec_consumer, the connector on
the cache, totals logged after every check) answers all of that family's requests in one driver run. The
reference is the same engine's vision encoder: a request whose uuid is in no cache (`nocache-*`). Gemma 3's
engine gets the pan-and-scan settings mmprep encoded with as mm_processor_kwargs: Gemma3Processor turns
pan-and-scan off and sets its own crop defaults on every call otherwise.

InternVL and GLM-4.1V are not here: an EC consumer always enables embedding inputs (vllm/config/vllm.py), so
vLLM 0.32 profiles a dummy video for models that support video (interns1.py, glm4_1v.py), and their video
processors need torchvision, which the interop venv cannot have beside the CPU torch (docs/serving.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _image_corpus import encode as encode_image
from _image_corpus import exif_jpeg, noise
from _model_helpers import pattern_image
from _tiny_families import GEMMA3_PAN_AND_SCAN, save_tiny_gemma3, save_tiny_llava, save_tiny_llava_next
from _vllm import transparent_png
from _vllm import (
    QUESTION, VllmRun, connector_counts, encode, max_logprob_gap, mismatch, mmprep, run_vllm, served, vllm_python,
    write_entry_by_hand,
)  # fmt: skip
from mmprep import cache_key
from mmprep.store.reader import EmbeddingCache


IMAGES = {  # different sizes and aspects: the tiled families give each its own token count
    "a.png": encode_image(pattern_image((112, 84), seed=1), "PNG"),
    "b.jpg": encode_image(noise((200, 150), seed=2), "JPEG", quality=90),
    "exif6.jpg": exif_jpeg(pattern_image((112, 70), seed=10), orientation=6),  # rotated 90 degrees by EXIF
    "alpha.png": transparent_png(),
}
TWO = ("a.png", "exif6.jpg")  # one request, two images
WRONG = "wrong.png"  # a.png's bytes at another URL; its entry (written by hand) has one row too few
CONNECTOR = "mmprep.serving.vllm_connector"
# The engine core and its worker in the driver's process (vLLM's single-device layout; the Qwen2-VL module runs
# the multi-process one): about 3 s to start instead of 25.
ENGINE_IN_PROCESS = {"distributed_executor_backend": "uni"}


@dataclass(frozen=True)
class Family:
    """How to build a family's tiny model, what its engine needs beyond the defaults, and its rows if fixed."""

    build: Callable[[Path], Path]
    engine: dict[str, Any]
    rows: dict[str, int] | None = None  # image -> rows of its entry, where the test knows them


FAMILIES = {
    "llava": Family(save_tiny_llava, {}),
    "llava_next": Family(save_tiny_llava_next, {}),
    # pan-and-scan: 2 crops for the 4:3 and (after EXIF) 5:8 images, none for the 7:6 one; (1 + crops) * 4 rows
    "gemma3": Family(
        save_tiny_gemma3,
        {"mm_processor_kwargs": GEMMA3_PAN_AND_SCAN},
        {"a.png": 12, "b.jpg": 12, "exif6.jpg": 12, "alpha.png": 4},
    ),
}


def url_part(url: str, uuid: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    return part if uuid is None else {**part, "uuid": uuid}


def chat(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


@dataclass
class FamilyRun:
    """One family's engine run, the rewritten batch file and each request's (hits, misses, rejected)."""

    family: str
    run: VllmRun
    urls: dict[str, str]
    rows: dict[str, int]  # image -> rows of its cached entry
    rewritten: list[dict[str, Any]]
    counts: dict[str, tuple[int, int, int]]

    def differs(self, reference: str, request: str) -> str | None:
        """Why `request` did not generate what `reference` did (None: same tokens, logprobs within 1e-3)."""
        reason = mismatch(self.run[reference], self.run[request])
        if reason is None:
            gap = max_logprob_gap(self.run[reference], self.run[request])
            print(f"{self.family} {request}: same tokens as {reference}, logprobs within {gap:.2g}")
        return reason

    def same_as_encoder(self, reference: str, request: str) -> None:
        reason = self.differs(reference, request)
        assert reason is None, (self.family, request, reason)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyRun]:
    vllm_python()  # skip before building anything when there is no vLLM
    family = request.param
    root = tmp_path_factory.mktemp(f"vllm-connector-{family}")
    model = FAMILIES[family].build(root / "model")
    model_id = str(model)  # the string vLLM is started with: part of its identifiers
    cache = root / "cache"
    with served({**IMAGES, WRONG: IMAGES["a.png"]}) as urls:
        summary = encode([urls[n] for n in IMAGES], model, cache, "--vllm-model-id", model_id)
        assert summary["encoded"] == len(IMAGES), summary
        with EmbeddingCache(cache) as reader:
            assert reader.family == family, reader.family
            entries = {n: reader.get(urls[n]) for n in IMAGES}
        rows = {n: int(e.embeddings.shape[0]) for n, e in entries.items() if e is not None}
        short = {k: v.clone() for k, v in entries["a.png"].tensors.items()}  # type: ignore[union-attr]
        short["embeddings"] = short["embeddings"][:-1]
        write_entry_by_hand(cache, urls[WRONG], short)

        batch, rewritten = root / "batch.jsonl", root / "batch.ec.jsonl"
        lines = [{"custom_id": n, "body": {"messages": chat(url_part(urls[n]))}} for n in IMAGES]
        lines.append({"custom_id": "two", "body": {"messages": chat(*(url_part(urls[n]) for n in TWO))}})
        batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
        done = mmprep(
            "rewrite", str(batch), "-o", str(rewritten), "--cache", str(cache), "--target", "vllm-ec", "--json"
        )
        assert done.returncode == 0, done.stderr

        requests: list[dict[str, Any]] = [{"batch_file": str(rewritten), "id_prefix": "uuid:"}]
        for name in IMAGES:
            requests += [
                {"id": f"encoder:{name}", "messages": chat(url_part(urls[name], f"nocache-{name}"))},
                {"id": f"vllm-id:{name}", "messages": chat(url_part(urls[name]))},
            ]
        requests += [
            {"id": "encoder:two", "messages": chat(*(url_part(urls[n], f"nocache-two-{n}") for n in TWO))},
            {"id": f"uuid:{WRONG}", "messages": chat(url_part(urls[WRONG], cache_key(urls[WRONG])))},
        ]
        ec_config = {
            "ec_connector": "MmprepECConnector", "ec_connector_module_path": CONNECTOR, "ec_role": "ec_consumer",
            "ec_connector_extra_config": {"cache_dir": str(cache), "log_interval_s": 0},
        }  # fmt: skip
        engine = {"ec_transfer_config": ec_config, **ENGINE_IN_PROCESS, **FAMILIES[family].engine}
        run = run_vllm(
            root / "vllm", model, requests, llm=engine, max_tokens=4, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            with_mmprep=True,
        )  # fmt: skip
    print(f"{family}: vLLM {run.version}, engine up in {run.engine_seconds:.1f} s; rows per image {rows}")
    yield FamilyRun(
        family, run, urls, rows, [json.loads(line) for line in rewritten.read_text().splitlines()],
        connector_counts(run.log),
    )  # fmt: skip


def test_the_connector_serves_the_familys_cache(family_run: FamilyRun) -> None:
    log = family_run.run.log
    assert "Creating connector with name: MmprepECConnector" in log
    assert f", {family_run.family}) from " in log  # the connector's "serving NAME (FP, FAMILY) from DIR" line
    assert "proven with vLLM" not in log  # the proven version: no warning
    assert "not proven on a real vLLM" not in log  # a proven family (PROVEN_FAMILIES): no warning either


def test_the_entries_have_the_rows_vllm_reserves(family_run: FamilyRun) -> None:
    """Gemma 3: the entries carry the pan-and-scan crops' soft tokens, as vLLM reserves placeholders."""
    expected = FAMILIES[family_run.family].rows
    if expected is None:
        pytest.skip(f"{family_run.family}: rows are checked by the hits (a wrong count is a rejection)")
    assert family_run.rows == expected


def test_rewrite_adds_the_entry_uuid_to_each_image_url(family_run: FamilyRun) -> None:
    """No metadata-only part for these families: the image_url stays (vLLM's parser needs the image), with
    the entry's key as uuid."""
    for line in family_run.rewritten:
        parts = [p for p in line["body"]["messages"][0]["content"] if p["type"] != "text"]
        names = TWO if line["custom_id"] == "two" else (line["custom_id"],)
        assert [p["type"] for p in parts] == ["image_url"] * len(names), line
        assert [p["uuid"] for p in parts] == [cache_key(family_run.urls[n]) for n in names], line


@pytest.mark.parametrize("path", ["uuid", "vllm-id"])
def test_served_from_the_cache_generates_what_the_encoder_does(family_run: FamilyRun, path: str) -> None:
    """image_url + uuid (from `rewrite --target vllm-ec`) and image_url alone (vLLM's identifier): same tokens
    and logprobs as the encoder, one hit per image (EXIF-rotated JPEG and transparent PNG included)."""
    wrong = {name: family_run.differs(f"encoder:{name}", f"{path}:{name}") for name in IMAGES}
    assert not any(wrong.values()), (family_run.family, {n: r for n, r in wrong.items() if r})
    for name in IMAGES:
        assert family_run.counts[f"{path}:{name}"] == (1, 0, 0), (path, name, family_run.counts)
    generations = {tuple(family_run.run[f"encoder:{name}"].logprobs) for name in IMAGES}
    assert len(generations) == len(IMAGES)  # the images drive the output


def test_a_request_with_two_images_counts_two_hits(family_run: FamilyRun) -> None:
    family_run.same_as_encoder("encoder:two", "uuid:two")
    assert family_run.counts["uuid:two"] == (2, 0, 0)
    assert family_run.counts["encoder:two"] == (0, 2, 0)


def test_the_reference_requests_were_misses(family_run: FamilyRun) -> None:
    for name in IMAGES:
        assert family_run.counts[f"encoder:{name}"] == (0, 1, 0), name


def test_an_entry_with_a_row_too_few_is_rejected_and_the_encoder_answers(family_run: FamilyRun) -> None:
    family_run.same_as_encoder("encoder:a.png", f"uuid:{WRONG}")
    assert family_run.counts[f"uuid:{WRONG}"] == (0, 0, 1)
    key = cache_key(family_run.urls[WRONG])
    warnings = [
        line for line in family_run.run.log.splitlines() if "WARNING" in line and f"entry {key} rejected" in line
    ]
    assert len(warnings) == 1, warnings
