"""Qwen3-VL (dense, MoE), Qwen3.5 and GLM-4.1V on tiny random checkpoints saved like hub ones:
the cache equals a direct transformers forward, and `to_vllm(entry)` substitutes for the encoder in
the language model (logits), with wrong layouts shown to fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _model_helpers import pattern_image, save_glm4v, save_qwen3_5, save_qwen3_vl

from _cli import cli
from mmprep import EmbeddingCache
from mmprep.errors import ModelLoadError
from mmprep.models import Encoder, load_encoder
from mmprep.serving import to_vllm
from mmprep.settings import ModelSettings

# Several sizes and aspect ratios (different grids in one batch), down to a 10x10 image (the 4-token minimum).
pytestmark = pytest.mark.slow  # tiny Qwen3-VL, Qwen3.5 and GLM-4.1V models built and run against transformers
SIZES = [(200, 90), (33, 120), (96, 64), (10, 10)]
ATOL = 1e-5  # cached tensors vs a direct forward
LOGITS_ATOL = 1e-4  # logits from pixels vs from to_vllm(entry)
FAMILIES = {"qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl", "qwen3_5": "qwen3_5", "glm4v": "glm4v"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {
        "qwen3_vl": save_qwen3_vl(root / "qwen3_vl"),
        "qwen3_vl_moe": save_qwen3_vl(root / "qwen3_vl_moe", seed=1, moe=True),
        "qwen3_5": save_qwen3_5(root / "qwen3_5"),
        "glm4v": save_glm4v(root / "glm4v"),
    }


@pytest.fixture(scope="module")
def cached(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each checkpoint through `mmprep encode` (one batch of all sizes), images as PNG files."""
    root = tmp_path_factory.mktemp("cached")
    images = root / "img"
    images.mkdir()
    paths = []
    for seed, size in enumerate(SIZES):
        path = images / f"{size[0]}x{size[1]}.png"
        pattern_image(size, seed).save(path)
        paths.append(str(path))
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"url": p}) + "\n" for p in paths))
    out = root / "cache"
    for directory in checkpoints.values():
        result = cli("encode", str(manifest), "--model", str(directory), "--out", str(out), "--allow-local-dir", str(images),
                     "--batch-size", str(len(SIZES)), "--progress", "none", "--json")  # fmt: skip
        assert result.exit_code == 0, result.output
    return {"out": out, "paths": paths, "images": images}


def entries(cached: dict[str, Any], directory: Path) -> list[Any]:
    with EmbeddingCache(cached["out"], model=str(directory)) as cache:
        return cache.get_many(cached["paths"])


def load(directory: Path) -> Encoder:
    return load_encoder(ModelSettings(name=str(directory)))


def full_model(directory: Path) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(directory)
    model = getattr(transformers, config.architectures[0]).from_pretrained(directory).eval()
    return model, AutoImageProcessor.from_pretrained(directory)


def reference(model: Any, processor: Any, image: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A direct transformers forward on one image: merged tokens (and deepstack levels), grid."""
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    expected = {"embeddings": out.pooler_output[0], "image_grid_thw": inputs["image_grid_thw"]}
    if getattr(out, "deepstack_features", None):
        expected["deepstack"] = torch.stack([level[0] for level in out.deepstack_features])
    return expected, inputs


@pytest.mark.parametrize("key", list(FAMILIES))
def test_cached_tensors_equal_a_direct_forward(checkpoints: dict[str, Path], cached: dict[str, Any], key: str) -> None:
    from PIL import Image

    model, processor = full_model(checkpoints[key])
    got = entries(cached, checkpoints[key])
    grids = set()
    for path, entry in zip(cached["paths"], got, strict=True):
        assert entry is not None and entry.family == FAMILIES[key]
        expected, _ = reference(model, processor, Image.open(path).convert("RGB"))
        assert list(entry.tensors) == list(expected)  # qwen3_vl: embeddings, image_grid_thw, deepstack
        assert torch.equal(entry.image_grid_thw, expected["image_grid_thw"])
        for name in ("embeddings", "deepstack"):
            if name in expected:
                assert entry.tensors[name].shape == expected[name].shape
                assert torch.max(torch.abs(entry.tensors[name] - expected[name])).item() <= ATOL, (key, path, name)
                assert entry.tensors[name].std() > 0.1  # not a degenerate (constant) output
        grids.add(tuple(entry.image_grid_thw[0].tolist()))
    assert len(grids) == len(SIZES)  # one batch really mixed different token counts
    if key.startswith("qwen3_vl"):
        deepstack = got[0].tensors["deepstack"]
        assert deepstack.shape[0] == 2 and not torch.allclose(deepstack[0], deepstack[1])


@pytest.mark.parametrize("key", list(FAMILIES))
def test_batched_encode_equals_one_by_one(checkpoints: dict[str, Path], key: str) -> None:
    encoder = load(checkpoints[key])
    items = [encoder.preprocess(pattern_image(size, seed)) for seed, size in enumerate(SIZES)]
    batched = encoder.encode(items)
    for item, together in zip(items, batched, strict=True):
        (alone,) = encoder.encode([item])
        assert list(alone) == list(together)
        for name in alone:
            torch.testing.assert_close(alone[name], together[name], atol=ATOL, rtol=0)


# -- serving: the language model's logits from pixels == from to_vllm(entry) ------------------------


def vllm_consumes(family: str, config: Any, mm: dict[str, torch.Tensor]) -> Any:
    """What vLLM makes of `multi_modal_data={"image": mm}` before the language model, as a transformers
    precomputed encoder output. Qwen3-VL: vllm/model_executor/models/qwen3_vl.py `_compute_deepstack_embeds`
    splits image_embeds into [visual_dim, multiscale_dim] and views the latter as (levels, visual_dim)."""
    embeds = mm["image_embeds"]
    if family != "qwen3_vl":
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=[embeds])
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    visual_dim = config.vision_config.out_hidden_size
    levels = len(config.vision_config.deepstack_visual_indexes)
    main, multiscale = torch.split(embeds, [visual_dim, visual_dim * levels], dim=-1)
    multiscale = multiscale.reshape(embeds.shape[0], levels, visual_dim).permute(1, 0, 2)
    return BaseModelOutputWithDeepstackFeatures(
        pooler_output=[main], deepstack_features=[[level] for level in multiscale]
    )


def logits(model: Any, grid: torch.Tensor, n_tokens: int, **image: Any) -> torch.Tensor:
    """The language model's logits for "<text> <vision start> <image tokens> <vision end> <text>"."""
    config = model.config
    start = getattr(config, "vision_start_token_id", None) or config.image_start_token_id
    end = getattr(config, "vision_end_token_id", None) or config.image_end_token_id
    ids = torch.tensor([[5, 9, start] + [config.image_token_id] * n_tokens + [end, 17, 3, 30]])
    with torch.no_grad():
        return model(
            input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == config.image_token_id).int(), **image
        ).logits


@pytest.mark.parametrize("key", list(FAMILIES))
def test_to_vllm_substitutes_for_the_encoder(checkpoints: dict[str, Path], cached: dict[str, Any], key: str) -> None:
    from PIL import Image

    family = FAMILIES[key]
    model, processor = full_model(checkpoints[key])
    entry = entries(cached, checkpoints[key])[0]
    _, inputs = reference(model, processor, Image.open(cached["paths"][0]).convert("RGB"))
    mm = to_vllm(entry)
    assert set(mm) == {"image_embeds", "image_grid_thw"} and mm["image_grid_thw"].shape == (1, 3)
    n = mm["image_embeds"].shape[0]
    levels = 2 if family == "qwen3_vl" else 0
    assert mm["image_embeds"].shape == (n, 64 * (1 + levels))

    grid = inputs["image_grid_thw"]
    from_pixels = logits(model, grid, n, pixel_values=inputs["pixel_values"])
    from_cache = logits(model, grid, n, mm_encoder_outputs={"image": vllm_consumes(family, model.config, mm)})
    assert from_pixels.std() > 0.1
    assert torch.max(torch.abs(from_pixels - from_cache)).item() <= LOGITS_ATOL

    # wrong layouts must show: tokens reversed; for Qwen3-VL also the deepstack levels swapped or dropped
    wrong = [{**mm, "image_embeds": mm["image_embeds"].flip(0)}]
    if family == "qwen3_vl":
        merged, level0, level1 = mm["image_embeds"].split(64, dim=-1)
        wrong.append({**mm, "image_embeds": torch.cat([merged, level1, level0], dim=-1)})
        wrong.append(
            {**mm, "image_embeds": torch.cat([merged, torch.zeros_like(level0), torch.zeros_like(level1)], dim=-1)}
        )
    for bad in wrong:
        off = logits(model, grid, n, mm_encoder_outputs={"image": vllm_consumes(family, model.config, bad)})
        assert torch.max(torch.abs(from_pixels - off)).item() > 100 * LOGITS_ATOL


# -- loading --------------------------------------------------------------------------------------


def test_vision_only_loading_never_reads_the_language_model(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A Qwen3-VL checkpoint stripped of every language-model tensor encodes exactly like the full one;
    one without a deepstack merger weight fails at load, naming it."""
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoints["qwen3_vl"] / "model.safetensors")
    vision_only = tmp_path / "vision_only"
    shutil.copytree(checkpoints["qwen3_vl"], vision_only)
    kept = {k: v for k, v in weights.items() if ".visual." in f".{k}"}
    assert 0 < len(kept) < len(weights)
    save_file(kept, vision_only / "model.safetensors", metadata={"format": "pt"})
    encoder = load(vision_only)
    assert all(not n.startswith(("language_model", "lm_head")) for n, _ in encoder.visual.named_parameters())  # type: ignore[attr-defined]
    image = encoder.preprocess(pattern_image((64, 64)))
    (got,), (want,) = encoder.encode([image]), load(checkpoints["qwen3_vl"]).encode([image])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen3_vl"], broken)
    del weights["model.visual.deepstack_merger_list.1.linear_fc2.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError, match=r"lacks vision-tower weights: deepstack_merger_list\.1\.linear_fc2\.weight"
    ):
        load(broken)


def test_unsupported_architecture_names_every_supported_one(tmp_path: Path) -> None:
    from _model_helpers import save_bert

    from mmprep.models import supported_architectures

    with pytest.raises(ModelLoadError) as info:
        load(save_bert(tmp_path / "bert"))
    for architecture in ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                         "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
                         "Glm4vForConditionalGeneration", *supported_architectures()):  # fmt: skip
        assert architecture in str(info.value)


# -- the CLI lists and exports every tensor ---------------------------------------------------------


def test_stats_and_show_list_every_tensor(checkpoints: dict[str, Path], cached: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    result = cli("stats", str(cached["out"]), "--json")
    models = {m["family"]: m for m in json.loads(result.output)["models"]}
    assert models["qwen3_vl"]["tensors"] == {
        "embeddings": {"shape": ["n_tokens", 64], "dtype": "float32"},
        "image_grid_thw": {"shape": [1, 3], "dtype": "int64"},
        "deepstack": {"shape": [2, "n_tokens", 64], "dtype": "float32"},
    }
    assert list(models["glm4v"]["tensors"]) == ["embeddings", "image_grid_thw"]
    table = cli("stats", str(cached["out"])).output
    assert "deepstack" in table and "image_grid_thw" in table

    model = str(checkpoints["qwen3_vl"])  # the model's name: one fingerprint in this cache
    out = tmp_path / "e.safetensors"
    result = cli("show", str(cached["out"]), cached["paths"][0], "--model", model, "--export", str(out))
    assert result.exit_code == 0
    (row,) = json.loads(result.output)["entries"]
    assert row["by_name"]["deepstack"] == {"dtype": "F32", "shape": [2, 18, 64]}
    exported = load_file(out)
    assert sorted(exported) == ["deepstack", "embeddings", "image_grid_thw"]
    with EmbeddingCache(cached["out"], model=model) as cache:
        assert torch.equal(exported["deepstack"], cache.get(cached["paths"][0]).tensors["deepstack"])
