"""`mmprep.serving.ec_source` (what MmprepECConnector asks the cache) and `mmprep rewrite --target vllm-ec`,
on caches encoded by `mmprep encode` from real images; the connector inside a real vLLM: tests/interop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import cli

from _model_helpers import pattern_image, save_llava
from mmprep.keys import cache_key
from mmprep.serving import to_vllm_ec_part
from mmprep.serving.ec_source import EcSource, ModelMismatchError, ServedModel
from mmprep.serving.vllm_hash import vllm_image_identifier
from mmprep.store.index import CacheIndex
from mmprep.store.layout import CacheLayout
from mmprep.store.reader import EmbeddingCache
from mmprep.store.shards import ShardEntry, ShardWriter

MODEL_ID = "served-model"  # the vLLM --model string given to encode --vllm-model-id


def encode(manifest: Path, model: str, cache: Path, images: Path, *options: str) -> None:
    result = cli("encode", str(manifest), "--model", model, "--out", str(cache), "--allow-local-dir", str(images),
                 "--progress", "none", "--json", *options)  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three images in a Qwen2-VL cache (with vLLM identifiers) and in a LLaVA cache; a fourth not cached."""
    root = tmp_path_factory.mktemp("ec-source")
    images = root / "img"
    images.mkdir()
    for i in range(4):
        pattern_image((40 + 16 * i, 48 - 4 * i), seed=i).save(images / f"{i}.png")
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"url": str(images / f"{i}.png")}) + "\n" for i in range(3)))
    encode(manifest, "builtin:tiny-qwen2-vl", root / "qwen", images, "--vllm-model-id", MODEL_ID)
    encode(manifest, str(save_llava(root / "llava-model")), root / "llava", images)
    return {"root": root, "images": images, "qwen": root / "qwen", "llava": root / "llava"}


def image(world: dict[str, Path], i: int) -> str:
    return str(world["images"] / f"{i}.png")


def served_like(cache: Path, **changes: object) -> ServedModel:
    """The ServedModel of a vLLM serving the cache's own model (width, dtype and architecture from the cache)."""
    with EmbeddingCache(cache) as reader:
        info, entry = reader.model_info, reader.get_key(_all_keys(cache)[0])
    assert entry is not None
    fields = dict(
        width=entry.embeddings.shape[-1],
        dtype=entry.embeddings.dtype,
        architectures=(info["architecture"],),
        model_id=MODEL_ID,
    )
    return ServedModel(**{**fields, **changes})  # type: ignore[arg-type]


def _all_keys(cache: Path) -> list[str]:
    index = CacheIndex(CacheLayout(cache).index, readonly=True)
    try:
        return [r[0] for r in index.conn.execute("SELECT key FROM entries")]
    finally:
        index.close()


def rows_of(world: dict[str, Path], i: int) -> int:
    with EmbeddingCache(world["qwen"]) as reader:
        return reader.get(image(world, i)).embeddings.shape[0]  # type: ignore[union-attr]


def test_a_uuid_and_vllms_identifier_both_find_the_entry(world: dict[str, Path]) -> None:
    source = EcSource(world["qwen"], None, served_like(world["qwen"]))
    assert (
        EcSource(world["qwen"], None, served_like(world["qwen"], model_id="builtin:tiny-qwen2-vl")).identity_note
        is None
    )
    rows = rows_of(world, 1)
    by_key = source.check(cache_key(image(world, 1)), rows)
    data = Path(image(world, 1)).read_bytes()
    by_vllm = source.check(vllm_image_identifier(data, MODEL_ID), rows)
    assert by_key.hit and by_vllm.hit and by_key.key == by_vllm.key == cache_key(image(world, 1))
    with EmbeddingCache(world["qwen"]) as reader:
        assert torch.equal(by_key.tensor, reader.get(image(world, 1)).embeddings)  # type: ignore[arg-type, union-attr]
    other_server = EcSource(world["qwen"], None, served_like(world["qwen"], model_id="another-model"))
    assert not other_server.check(vllm_image_identifier(data, MODEL_ID), rows).hit  # recorded for MODEL_ID only
    miss = source.check(cache_key(image(world, 3)), 12)
    assert (miss.hit, miss.found, miss.reason) == (False, False, "not in the cache")
    assert not source.check("not-a-key", 12).found


def test_every_check_rejects_with_the_reason(world: dict[str, Path]) -> None:
    key, rows = cache_key(image(world, 1)), rows_of(world, 1)
    source = EcSource(world["qwen"], None, served_like(world["qwen"]))
    wrong_rows = source.check(key, rows + 1)
    assert wrong_rows.found and not wrong_rows.hit
    assert wrong_rows.reason == f"entry {key}: it has {rows} rows and the request's placeholder has {rows + 1}"
    width = served_like(world["qwen"]).width
    wide = EcSource(world["qwen"], None, served_like(world["qwen"], width=width * 2)).check(key, rows)
    assert not wide.hit and f"its width is {width}, the served model's is {width * 2}" in wide.reason  # type: ignore[operator]
    half = EcSource(world["qwen"], None, served_like(world["qwen"], dtype=torch.float16)).check(key, rows)
    assert half.hit and half.tensor.dtype == torch.float16  # type: ignore[union-attr]  # cast to the served dtype
    assert source.identity_note is not None and "the cache's model is builtin:tiny-qwen2-vl" in source.identity_note
    with pytest.raises(
        ModelMismatchError, match="is a Qwen2VLForConditionalGeneration; vLLM serves a LlavaForConditionalGeneration"
    ):
        EcSource(world["qwen"], None, served_like(world["qwen"], architectures=("LlavaForConditionalGeneration",)))


def test_an_entry_whose_rows_do_not_fill_its_grid_is_rejected(world: dict[str, Path], tmp_path: Path) -> None:
    """A hand-written entry: 5 rows for a grid of 4 merged patches (20 is not 5 x a square)."""
    cache = tmp_path / "cache"
    layout = CacheLayout(cache)
    index = CacheIndex(layout.index)
    index.register_model("e" * 64, "by-hand", "qwen2_vl", {"architecture": "Qwen2VLForConditionalGeneration"})
    writer = ShardWriter(layout, "e" * 64, "by-hand", "r", "qwen2_vl")
    tensors = {"embeddings": torch.randn(5, 8), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    writer.add(ShardEntry(cache_key("u"), "u", None, tensors, "c" * 64, 1.0))
    index.commit_shard(writer.flush(), "e" * 64, "r")
    index.close()
    verdict = EcSource(cache, None, ServedModel(8, torch.float32)).check(cache_key("u"), 5)
    assert verdict.found and not verdict.hit and "5 embedding rows for a grid of 16 patches" in verdict.reason  # type: ignore[operator]


def test_entries_committed_after_start_are_found(world: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"url": image(world, 0)}) + "\n")
    encode(manifest, "builtin:tiny-qwen2-vl", cache, world["images"])
    source = EcSource(cache, None, served_like(world["qwen"]))
    late = cache_key(image(world, 2))
    assert not source.check(late, rows_of(world, 2)).found
    manifest.write_text(json.dumps({"url": image(world, 2)}) + "\n")
    encode(manifest, "builtin:tiny-qwen2-vl", cache, world["images"])
    assert source.check(late, rows_of(world, 2)).hit  # the nightly run's entry, without reopening
    source.close()


def test_pooled_caches_are_refused_at_start(world: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "clip"
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"url": image(world, 0)}) + "\n")
    encode(manifest, "builtin:tiny-clip", cache, world["images"])
    with pytest.raises(ModelMismatchError, match="is a pooled model: vLLM has no encoder output for it"):
        EcSource(cache, None, ServedModel(8, torch.float32))


# --- rewrite --target vllm-ec --------------------------------------------------------------------------


def request_line(custom_id: str, urls: list[str]) -> str:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Describe."}]
    return json.dumps(
        {"custom_id": custom_id, "body": {"model": "m", "messages": [{"role": "user", "content": content}]}}
    )


def rewrite(cache: Path, text: str, tmp_path: Path) -> tuple[int, list[dict], dict]:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(text)
    result = cli("rewrite", str(source), "-o", str(out), "--cache", str(cache), "--target", "vllm-ec", "--json")
    summary = json.loads(result.stderr[result.stderr.index("{") :]) if "{" in result.stderr else {}
    return result.exit_code, [json.loads(line) for line in out.read_text().splitlines()], summary


def test_rewrite_vllm_ec_writes_metadata_only_parts_for_qwen(world: dict[str, Path], tmp_path: Path) -> None:
    lines = (
        request_line("all", [image(world, 0), image(world, 1)])
        + "\n"
        + request_line("miss", [image(world, 0), image(world, 3)])
        + "\n"
    )
    code, out, summary = rewrite(world["qwen"], lines, tmp_path)
    assert code == 1 and (summary["replaced"], summary["misses"], summary["kept"]) == (2, 1, 1)
    parts = out[0]["body"]["messages"][0]["content"]
    with EmbeddingCache(world["qwen"]) as reader:
        for i, part in enumerate(parts[:2]):
            e = reader.get(image(world, i))
            assert part == {
                "type": "image_embeds",
                "image_embeds": {"image_grid_thw": e.image_grid_thw.reshape(-1).tolist()},
                "uuid": e.key,
            }  # type: ignore[union-attr]
            assert part == to_vllm_ec_part(e)  # type: ignore[arg-type]
    assert out[1] == json.loads(request_line("miss", [image(world, 0), image(world, 3)]))  # a miss: left as it is
    assert len(json.dumps(out[0])) < 2 * len(request_line("all", [image(world, 0), image(world, 1)]))


def test_rewrite_vllm_ec_adds_uuids_for_families_without_placeholder_metadata(
    world: dict[str, Path], tmp_path: Path
) -> None:
    code, out, summary = rewrite(
        world["llava"], request_line("one", [image(world, 0), image(world, 3)]) + "\n", tmp_path
    )
    parts = out[0]["body"]["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": image(world, 0)}, "uuid": cache_key(image(world, 0))}
    assert "uuid" not in parts[1] and (summary["replaced"], summary["misses"]) == (1, 1)


def test_rewrite_vllm_ec_leaves_an_entry_the_connector_would_refuse(world: dict[str, Path], tmp_path: Path) -> None:
    """An image_url family (LLaVA): a hand-written entry one row short gets no uuid, is counted invalid and named."""
    import shutil

    cache = shutil.copytree(world["llava"], tmp_path / "llava")
    with EmbeddingCache(cache) as reader:
        good = reader.get(image(world, 0))
        fingerprint, name = reader.fingerprint, reader.model_name
    assert good is not None
    short = {"embeddings": good.embeddings[:-1].clone()}  # the placeholder vLLM reserves has one more row
    writer = ShardWriter(CacheLayout(cache), fingerprint, name, "by-hand", "llava")
    writer.add(ShardEntry(cache_key(image(world, 3)), image(world, 3), None, short, "c" * 64, 1.0))
    index = CacheIndex(CacheLayout(cache).index)
    index.commit_shard(writer.flush(), fingerprint, "by-hand")  # type: ignore[arg-type]  # one entry: a shard
    index.close()
    code, out, summary = rewrite(cache, request_line("two", [image(world, 0), image(world, 3)]) + "\n", tmp_path)
    parts = out[0]["body"]["messages"][0]["content"]
    assert parts[0]["uuid"] == cache_key(image(world, 0)) and "uuid" not in parts[1]
    assert (summary["replaced"], summary["invalid"], summary["misses"], code) == (1, 1, 0, 1)
    assert f"entry {cache_key(image(world, 3))[:16]} has a [{good.embeddings.shape[0] - 1}, " in summary["problems"][0]


def test_the_connectors_mmprep_side_imports_no_transformers() -> None:
    """vLLM's scheduler imports the connector: mmprep's part of it loads torch and the reader, never transformers."""
    import subprocess
    import sys

    code = "import sys, mmprep.serving.ec_source; print(sorted(m for m in ('transformers', 'PIL', 'httpx') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
