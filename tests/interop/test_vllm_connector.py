"""Issue #23 on a real vLLM: a stock vLLM loads `mmprep.serving.vllm_connector.MmprepECConnector` by module
path and serves image embeddings straight from an mmprep cache (no export), Qwen2-VL.

One engine (ec_consumer, the connector on the cache, totals logged after every check) answers every
request of this module, in order; between requests the driver runs `mmprep encode` (an image cached
after the engine started) and `mmprep gc` (entries and shards removed while serving). The reference is
the same engine's vision encoder: a request whose uuid is in no cache (`nocache-*`) runs the encoder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _image_corpus import encode as encode_image
from _image_corpus import exif_jpeg, noise
from _model_helpers import pattern_image
from _tiny_vlm import save_tiny_qwen2_vl
from _vllm import transparent_png
from _vllm import (
    QUESTION, VllmRun, connector_counts, encode, max_logprob_gap, mismatch, mmprep, run_vllm, served, vllm_python,
    write_entry_by_hand,
)  # fmt: skip
from mmprep import cache_key
from mmprep.store.reader import EmbeddingCache


IMAGES = {  # cached before the engine starts; 12, 35, 20 (rotated by EXIF) and 12 merged tokens
    "a.png": encode_image(pattern_image((112, 84), seed=1), "PNG"),
    "b.jpg": encode_image(noise((200, 150), seed=2), "JPEG", quality=90),
    "exif6.jpg": exif_jpeg(pattern_image((112, 70), seed=10), orientation=6),
    "alpha.png": transparent_png(),
}
SMALL = "c.webp"  # 4 merged tokens: cached; its tensors are copied into WRONG's hand-written entry
WRONG = "wrong.png"  # 35 merged tokens; its entry (written by hand) has SMALL's 4 rows and grid
LATE = "late.png"  # encoded while the engine runs
EXTRA = {
    SMALL: encode_image(pattern_image((60, 60), seed=3), "WEBP", lossless=True),
    WRONG: encode_image(noise((200, 150), seed=12), "PNG"),
    LATE: encode_image(pattern_image((98, 70), seed=7), "PNG"),
}
CONNECTOR = "mmprep.serving.vllm_connector"


def url_part(url: str, uuid: str | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    return part if uuid is None else {**part, "uuid": uuid}


def meta_part(grid: list[int], uuid: str) -> dict[str, Any]:
    return {"type": "image_embeds", "image_embeds": {"image_grid_thw": grid}, "uuid": uuid}


def chat(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


class Served:
    """The engine's answers, with each request's hits, misses and rejections from the connector's INFO lines."""

    def __init__(self, run: VllmRun, urls: dict[str, str], read_only: Path | None) -> None:
        self.run, self.urls, self.read_only = run, urls, read_only
        self.counts = connector_counts(run.log)

    def same_as_encoder(self, reference: str, request: str) -> None:
        reason = mismatch(self.run[reference], self.run[request])
        assert reason is None, (request, reason)
        print(
            f"{request}: same tokens as {reference}, logprobs within {max_logprob_gap(self.run[reference], self.run[request]):.2g}"
        )


@contextmanager
def read_only_view(cache: Path, view: Path) -> Iterator[Path | None]:
    """`view`: a read-only bind mount of `cache`, as a serving node mounts the cache (writers keep writing
    `cache`, the mount shows their commits); None where this process cannot mount."""
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(cache), str(view)], capture_output=True).returncode != 0:
        yield None
        return
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True)
        yield view if remount.returncode == 0 and not os.access(view, os.W_OK) else None
    finally:
        subprocess.run(["umount", "--lazy", str(view)], check=True)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vllm_python()  # skip before building anything when there is no vLLM
    root = tmp_path_factory.mktemp("vllm-connector")
    model = save_tiny_qwen2_vl(root / "model")
    model_id = str(model)  # the string vLLM is started with: part of its identifiers
    cache = root / "cache"
    with served({**IMAGES, **EXTRA}) as urls:
        summary = encode([urls[n] for n in [*IMAGES, SMALL]], model, cache, "--vllm-model-id", model_id)
        assert summary["encoded"] == len(IMAGES) + 1, summary
        with EmbeddingCache(cache) as reader:
            small = reader.get(urls[SMALL])
            assert small is not None and small.embeddings.shape[0] == 4
            grids = {n: reader.get(urls[n]).image_grid_thw.reshape(-1).tolist() for n in IMAGES}  # type: ignore[union-attr]
        write_entry_by_hand(cache, urls[WRONG], {k: v.clone() for k, v in small.tensors.items()})

        batch, rewritten = root / "batch.jsonl", root / "batch.ec.jsonl"
        lines = [{"custom_id": n, "body": {"messages": chat(url_part(urls[n], None))}} for n in IMAGES]
        lines.append(
            {"custom_id": "two", "body": {"messages": chat(url_part(urls["b.jpg"], None), url_part(urls[SMALL], None))}}
        )
        batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
        done = mmprep(
            "rewrite", str(batch), "-o", str(rewritten), "--cache", str(cache), "--target", "vllm-ec", "--json"
        )
        assert done.returncode == 0, done.stderr
        rewritten_text = rewritten.read_text()
        assert "image_url" not in rewritten_text and len(rewritten_text) < 2 * len(batch.read_text())

        requests: list[dict[str, Any]] = [
            {"batch_file": str(rewritten), "id_prefix": "meta:"}
        ]  # first: the connector loads
        for name in IMAGES:
            requests += [
                {"id": f"encoder:{name}", "messages": chat(url_part(urls[name], f"nocache-{name}"))},
                {"id": f"uuid:{name}", "messages": chat(url_part(urls[name], cache_key(urls[name])))},
                {"id": f"vllm-id:{name}", "messages": chat(url_part(urls[name], None))},
            ]
        requests += [
            {
                "id": "encoder:two",
                "messages": chat(url_part(urls["b.jpg"], "nocache-two-b"), url_part(urls[SMALL], "nocache-two-c")),
            },
            {"id": f"encoder:{WRONG}", "messages": chat(url_part(urls[WRONG], f"nocache-{WRONG}"))},
            {"id": f"uuid:{WRONG}", "messages": chat(url_part(urls[WRONG], cache_key(urls[WRONG])))},
            {
                "id": f"meta:{WRONG}",
                "messages": chat(meta_part(grids["b.jpg"], cache_key(urls[WRONG]))),
            },  # b's size: 35 tokens
            {
                "id": "meta:missing",
                "messages": chat(meta_part([1, 4, 4], cache_key("http://nowhere/never-encoded.png"))),
            },
            {"id": "alive:a.png", "messages": chat(meta_part(grids["a.png"], cache_key(urls["a.png"])))},
            {"id": f"encoder:{LATE}", "messages": chat(url_part(urls[LATE], f"nocache-{LATE}"))},
            {"id": f"before:{LATE}", "messages": chat(url_part(urls[LATE], cache_key(urls[LATE])))},
        ]
        env = {**os.environ}
        mmprep_cli = [sys.executable, "-m", "mmprep"]
        late_manifest = root / "late.jsonl"
        late_manifest.write_text(json.dumps({"url": urls[LATE]}) + "\n")
        requests.append({"id": "command:encode-late", "env": env, "command": [
            *mmprep_cli, "encode", str(late_manifest), "--model", str(model), "--out", str(cache), "--allow-http",
            "--allow-host", "127.0.0.1", "--progress", "none", "--vllm-model-id", model_id,
        ]})  # fmt: skip
        requests += [
            {"id": f"uuid:{LATE}", "messages": chat(url_part(urls[LATE], cache_key(urls[LATE])))},
            {"id": f"vllm-id:{LATE}", "messages": chat(url_part(urls[LATE], None))},
            {"id": "command:gc", "env": env, "command": [*mmprep_cli, "gc", str(cache), "--keep-last-runs", "1"]},
            {"id": "gone:b.jpg", "messages": chat(url_part(urls["b.jpg"], cache_key(urls["b.jpg"])))},
            {"id": "gone-meta:b.jpg", "messages": chat(meta_part(grids["b.jpg"], cache_key(urls["b.jpg"])))},
            {"id": f"after-gc:{LATE}", "messages": chat(url_part(urls[LATE], cache_key(urls[LATE])))},
        ]
        with read_only_view(cache, root / "cache-ro") as read_only:  # the engine reads the mount, if there is one
            ec_config = {
                "ec_connector": "MmprepECConnector", "ec_connector_module_path": CONNECTOR, "ec_role": "ec_consumer",
                "ec_connector_extra_config": {"cache_dir": str(read_only or cache), "log_interval_s": 0},
            }  # fmt: skip
            run = run_vllm(root / "vllm", model, requests, llm={"ec_transfer_config": ec_config}, with_mmprep=True)
    print(
        f"vLLM {run.version}: engine up in {run.engine_seconds:.1f} s; cache read {'through a read-only mount' if read_only else 'in place'}"
    )
    yield Served(run, urls, read_only)


def test_the_connector_is_loaded_by_module_path_from_the_cache(served_run: Served) -> None:
    log = served_run.run.log
    assert "mmprep connector: serving" in log and "Creating connector with name: MmprepECConnector" in log
    assert served_run.run.version.split("+")[0] == "0.32.0"
    assert "proven with vLLM" not in log  # the proven version: no warning
    assert "not proven on a real vLLM" not in log  # a proven family (PROVEN_FAMILIES): no warning either


def test_every_answer_here_came_through_a_read_only_mount(served_run: Served) -> None:
    """Serving nodes mount the cache read-only: this module's engine read it through such a mount (the hits,
    the entry encoded after start and gc while serving were all seen through it)."""
    if served_run.read_only is None:
        pytest.skip("a read-only bind mount needs root and mount(2): the engine read the cache in place")
    assert f" from {served_run.read_only}" in served_run.run.log  # the connector's "serving ... from DIR" line
    assert sum(hits for hits, _, _ in served_run.counts.values()) > 0


@pytest.mark.parametrize("path", ["meta", "uuid", "vllm-id"])
def test_served_from_the_cache_generates_what_the_encoder_does(served_run: Served, path: str) -> None:
    """Metadata-only (from `rewrite --target vllm-ec`), image_url + uuid, image_url alone (vLLM's identifier):
    same tokens and logprobs as the encoder, one hit per image (EXIF-rotated JPEG and transparent PNG included)."""
    for name in IMAGES:
        served_run.same_as_encoder(f"encoder:{name}", f"{path}:{name}")
        assert served_run.counts[f"{path}:{name}"] == (1, 0, 0), (path, name, served_run.counts)
    generations = {tuple(served_run.run[f"encoder:{name}"].token_ids) for name in IMAGES}
    assert len(generations) == len(IMAGES)  # the images drive the output


def test_a_request_with_two_images_counts_two_hits(served_run: Served) -> None:
    served_run.same_as_encoder("encoder:two", "meta:two")
    assert served_run.counts["meta:two"] == (2, 0, 0)


def test_the_reference_requests_were_misses(served_run: Served) -> None:
    assert served_run.counts["encoder:a.png"] == (0, 1, 0)
    assert served_run.counts["encoder:two"] == (0, 2, 0)


def test_an_entry_with_the_wrong_row_count_is_rejected_and_the_encoder_answers(served_run: Served) -> None:
    served_run.same_as_encoder(f"encoder:{WRONG}", f"uuid:{WRONG}")
    assert served_run.counts[f"uuid:{WRONG}"] == (0, 0, 1)
    key = cache_key(served_run.urls[WRONG])
    warnings = [
        line for line in served_run.run.log.splitlines() if "WARNING" in line and f"entry {key} rejected" in line
    ]
    assert len(warnings) == 1 and "has 4 rows and the request's placeholder has 35" in warnings[0], warnings


def test_a_metadata_only_request_without_a_valid_entry_fails_alone(served_run: Served) -> None:
    """No pixels to fall back on: the request fails, with an ERROR naming the uuid; the engine answers the next one."""
    run = served_run.run
    for request, uuid in (
        (f"meta:{WRONG}", cache_key(served_run.urls[WRONG])),
        ("meta:missing", cache_key("http://nowhere/never-encoded.png")),
    ):
        assert run.generations[request].finish_reason == "error" and not run.generations[request].token_ids, request
        assert re.search(
            rf"ERROR.*mmprep connector: request \S+ fails: its image uuid {uuid} is metadata-only", run.log
        ), request
    served_run.same_as_encoder("encoder:a.png", "alive:a.png")


def test_an_entry_encoded_after_the_engine_started_is_served_without_restart(served_run: Served) -> None:
    assert served_run.run.commands["command:encode-late"]["returncode"] == 0, served_run.run.commands
    assert served_run.counts[f"before:{LATE}"] == (0, 1, 0)
    for request in (f"uuid:{LATE}", f"vllm-id:{LATE}"):
        served_run.same_as_encoder(f"encoder:{LATE}", request)
        assert served_run.counts[request] == (1, 0, 0), request


def test_gc_while_serving(served_run: Served) -> None:
    """gc drops every entry but the late run's and deletes their shards: those are misses (the encoder answers,
    or a metadata-only request fails alone), the late entry is still served."""
    gc = served_run.run.commands["command:gc"]
    assert gc["returncode"] == 0, gc
    served_run.same_as_encoder("encoder:b.jpg", "gone:b.jpg")
    assert served_run.counts["gone:b.jpg"] == (0, 1, 0)
    assert served_run.run.generations["gone-meta:b.jpg"].finish_reason == "error"
    assert served_run.counts["gone-meta:b.jpg"] == (0, 1, 0)
    served_run.same_as_encoder(f"encoder:{LATE}", f"after-gc:{LATE}")
    assert served_run.counts[f"after-gc:{LATE}"] == (1, 0, 0)
