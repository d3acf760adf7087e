"""Issue #16 on a real vLLM: a stock vLLM as `ec_consumer` on a store written by `mmprep export --format vllm-ec`.

One engine (ECExampleConnector, ec_consumer, shared_storage_path = the store) answers every chat
request of this module. The store holds each image twice: under `--key url` (requests carry
`uuid = mmprep.cache_key(url)`) and under `--key vllm` (vLLM's own identifier of the image bytes and
the server's --model string: requests carry no uuid at all). The reference is the same engine's
vision encoder: a request whose identifier is not in the store (a uuid nobody exported) is a miss
and runs the encoder, exactly as a vLLM without a store would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from _image_corpus import encode as encode_image
from _image_corpus import noise
from _model_helpers import pattern_image
from _tiny_vlm import save_tiny_qwen2_vl
from _vllm import QUESTION, VllmRun, encode, max_logprob_gap, mismatch, mmprep, run_vllm, served, vllm_python
from mmprep import cache_key

IMAGES = {  # 12, 35, 4 and 20 merged tokens; the grayscale JPEG is converted by vLLM (its identifier covers that)
    "a.png": encode_image(pattern_image((112, 84), seed=1), "PNG"),
    "b.jpg": encode_image(noise((200, 150), seed=2), "JPEG", quality=90),
    "c.webp": encode_image(pattern_image((60, 60), seed=3), "WEBP", lossless=True),
    "g.jpg": encode_image(pattern_image((140, 112), seed=5).convert("L"), "JPEG", quality=90),
}
SCALED = "s.png"  # exported, then its url-keyed entry replaced by the same tensor times 2
MISSING = "m.png"  # encoded by nobody: not in the store
EXTRA = {
    SCALED: encode_image(noise((84, 84), seed=6), "PNG"),
    MISSING: encode_image(pattern_image((98, 70), seed=7), "PNG"),
}
HIT = re.compile(r"Success load encoder cache for hash (\S+)")
ENTRY = "encoder_cache.safetensors"


def chat(url: str, uuid: str | None) -> list[dict]:
    part: dict = {"type": "image_url", "image_url": {"url": url}}
    if uuid is not None:
        part["uuid"] = uuid
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


class Store:
    """The exported store and the engine's answers."""

    def __init__(self, path: Path, run: VllmRun, urls: dict[str, str], vllm_ids: dict[str, str]) -> None:
        self.path, self.run, self.urls, self.vllm_ids = path, run, urls, vllm_ids
        self.hits = set(HIT.findall(run.log))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    vllm_python()  # skip before building anything when there is no vLLM
    root = tmp_path_factory.mktemp("vllm-ec")
    model = save_tiny_qwen2_vl(root / "model")
    model_id = str(model)  # the string vLLM is started with: part of its identifier (--key vllm)
    ec = root / "store"
    with served({**IMAGES, **EXTRA}) as urls:
        exported = [urls[n] for n in [*IMAGES, SCALED]]
        summary = encode(exported, model, root / "cache", "--vllm-model-id", model_id)
        assert summary["encoded"] == len(exported), summary
        for key in (["--key", "url"], ["--key", "vllm", "--vllm-model-id", model_id]):
            done = mmprep("export", str(root / "cache"), "--format", "vllm-ec", "--out", str(ec), *key,
                          "--progress", "none", "--json")  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["written"] == len(exported), done.stdout
        by_url = {cache_key(urls[n]) for n in [*IMAGES, SCALED]}
        vllm_dirs = {p.name for p in ec.iterdir() if p.is_dir() and not p.name.startswith(".")} - by_url
        assert len(vllm_dirs) == len(exported)
        # which --key vllm directory is which image: the entry's metadata names its cache key
        vllm_ids = {}
        for name in [*IMAGES, SCALED]:
            [vllm_ids[name]] = [d for d in vllm_dirs if _stored_key(ec / d / ENTRY) == cache_key(urls[name])]

        scaled = ec / cache_key(urls[SCALED]) / ENTRY
        tensors = load_file(str(scaled))
        save_file({"ec_cache": (tensors["ec_cache"] * 2).contiguous()}, str(scaled))

        requests = []
        for name in [*IMAGES, SCALED, MISSING]:
            requests.append({"id": f"encoder:{name}", "messages": chat(urls[name], f"not-in-the-store-{name}")})
        for name in IMAGES:
            requests.append({"id": f"url-key:{name}", "messages": chat(urls[name], cache_key(urls[name]))})
            requests.append({"id": f"vllm-key:{name}", "messages": chat(urls[name], None)})
        requests.append({"id": f"scaled:{SCALED}", "messages": chat(urls[SCALED], cache_key(urls[SCALED]))})
        requests.append({"id": f"missing:{MISSING}", "messages": chat(urls[MISSING], cache_key(urls[MISSING]))})
        ec_config = {"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
                     "ec_connector_extra_config": {"shared_storage_path": str(ec)}}  # fmt: skip
        run = run_vllm(
            root / "vllm", model, requests, llm={"ec_transfer_config": ec_config},
            env={"VLLM_LOGGING_LEVEL": "DEBUG"},  # the connector logs its hits at debug level
        )  # fmt: skip
    print(f"vLLM {run.version}: engine up in {run.engine_seconds:.1f} s")
    yield Store(ec, run, urls, vllm_ids)


def _stored_key(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("key")


@pytest.mark.parametrize("key", ["url-key", "vllm-key"])
def test_consumer_on_the_store_generates_what_the_encoder_does(store: Store, key: str) -> None:
    for name in IMAGES:
        reason = mismatch(store.run[f"encoder:{name}"], store.run[f"{key}:{name}"])
        assert reason is None, (key, name, reason)
        print(
            f"{key} {name}: logprobs within {max_logprob_gap(store.run[f'encoder:{name}'], store.run[f'{key}:{name}']):.2g}"
        )
    generations = {tuple(store.run[f"encoder:{name}"].token_ids) for name in IMAGES}
    assert len(generations) == len(IMAGES)  # the images drive the output


def test_every_exported_image_was_a_logged_hit(store: Store) -> None:
    """The engine loaded the store's entry (no encoder) for each request that named an exported image."""
    url_keys = {cache_key(store.urls[n]) for n in [*IMAGES, SCALED]}
    vllm_keys = set(store.vllm_ids.values())
    assert url_keys <= store.hits, url_keys - store.hits
    assert vllm_keys - {store.vllm_ids[SCALED]} <= store.hits, vllm_keys - store.hits  # SCALED: no uuid-less request
    assert not any(h.startswith("not-in-the-store-") for h in store.hits)
    assert cache_key(store.urls[MISSING]) not in store.hits


def test_a_scaled_entry_changes_the_output(store: Store) -> None:
    """What vLLM generates comes from the stored tensor: doubling it changes the generation."""
    reason = mismatch(store.run[f"encoder:{SCALED}"], store.run[f"scaled:{SCALED}"])
    assert reason is not None
    print(f"scaled entry: {reason}")


def test_a_missing_entry_falls_back_to_the_encoder(store: Store) -> None:
    """A uuid with no entry: no hit, the encoder runs, same generation; vLLM leaves an empty directory."""
    assert mismatch(store.run[f"encoder:{MISSING}"], store.run[f"missing:{MISSING}"]) is None
    left = store.path / cache_key(store.urls[MISSING])
    assert left.is_dir() and not any(left.iterdir())


def test_prune_empty_removes_what_the_misses_left(store: Store) -> None:
    """`mmprep export --prune-empty` on the store vLLM used: the misses' empty directories go, entries stay."""
    empty = [p for p in store.path.iterdir() if p.is_dir() and not p.name.startswith(".") and not any(p.iterdir())]
    assert len(empty) >= len(IMAGES) + 2  # one per miss: the encoder:* uuids and the missing entry
    entries_before = sorted(p.parent.name for p in store.path.glob(f"*/{ENTRY}"))
    done = mmprep("export", str(store.path.parent / "cache"), "--format", "vllm-ec", "--out", str(store.path),
                  "--prune-empty", "--progress", "none", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["pruned"] == len(empty) and not any(p.exists() for p in empty)
    assert sorted(p.parent.name for p in store.path.glob(f"*/{ENTRY}")) == entries_before
    assert report["replaced"] == 1  # the entry this module scaled on purpose is put right again
