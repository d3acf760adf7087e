"""Gemma 3, InternVL (HF format), LLaVA-NeXT — families whose image becomes several views (pan-and-scan
crops, tiles, an anyres grid): mmprep's tensors against transformers' own processor + forward, the
language model's logits from pixels against logits from the cached tokens, batching, vision-only loading."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from _model_helpers import (
    IMAGE_TOKEN,
    features_of,
    pattern_image,
    save_gemma3,
    save_internvl,
    save_llava_next,
    tiny_tokenizer,
)

from _cli import cli
from mmprep.errors import ModelLoadError
from mmprep.models import Encoder, load_encoder, load_preprocessor
from mmprep.serving import ServingFormatError, to_vllm
from mmprep.settings import ModelSettings
from mmprep.store.reader import CachedEmbedding, EmbeddingCache

# wide, very wide, tall, square, and a very small image: different crop / tile / grid counts per image
pytestmark = pytest.mark.slow  # tiny Gemma 3, InternVL and LLaVA-NeXT models built and run against transformers
SIZES = [(60, 40), (200, 90), (33, 120), (256, 256), (5, 3)]
IMAGES = [pattern_image(size, seed) for seed, size in enumerate(SIZES)]
ATOL = 1e-5
PROMPT_ATOL = 1e-4
# How serving turns pan-and-scan on (vLLM: mm_processor_kwargs); the tiny checkpoint's
# preprocessor_config.json holds the same values, which is what mmprep reads.
PAN_AND_SCAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=3)


@dataclass
class Reference:
    """transformers' own path for one family: the full model, and its processor's inputs for one image."""

    model: Any
    inputs: Callable[[Any], dict[str, torch.Tensor]]  # image -> model inputs (prompt with one image)
    view_tokens: int  # tokens of the first view (base image / first tile), for the "moved view" negative

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image's tokens in the order the language model's placeholders receive them."""
        pixels = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        with torch.no_grad():
            features = features_of(self.model.get_image_features(**pixels))
        return features[0] if isinstance(features, (list, tuple)) else features.flatten(0, 1)


def gemma3_reference(path: Path, serving_kwargs: dict[str, Any]) -> Reference:
    from transformers import AutoImageProcessor, Gemma3ForConditionalGeneration, Gemma3Processor

    tokenizer = tiny_tokenizer(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image>")
    processor = Gemma3Processor(AutoImageProcessor.from_pretrained(path, backend="pil"), tokenizer, image_seq_length=4)
    model = Gemma3ForConditionalGeneration.from_pretrained(path).eval()
    return Reference(
        model,
        lambda image: dict(
            processor(images=image, text="w5 w6 <start_of_image> w7", return_tensors="pt", **serving_kwargs)
        ),
        4,
    )


def internvl_reference(path: Path) -> Reference:
    from transformers import AutoImageProcessor, InternVLForConditionalGeneration, InternVLProcessor

    # InternVLProcessor cannot be built without torchvision (its video processor); it adds these to every
    # image-processor call and expands each image to <img> + image_seq_length * tiles <IMG_CONTEXT> + </img>.
    assert InternVLProcessor.images_kwargs == {"crop_to_patches": True}
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    model = InternVLForConditionalGeneration.from_pretrained(path).eval()
    per_tile = 4  # (32 / 8) ** 2 patches, pixel-shuffled by 0.5 per side

    def inputs(image: Any) -> dict[str, torch.Tensor]:
        pixel_values = image_processor(images=image, crop_to_patches=True, return_tensors="pt")["pixel_values"]
        ids = [1, 5, 6, 121, *[IMAGE_TOKEN] * (per_tile * pixel_values.shape[0]), 122, 7]
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}

    return Reference(model, inputs, per_tile)


def llava_next_reference(path: Path) -> Reference:
    from transformers import AutoImageProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

    processor = LlavaNextProcessor(
        AutoImageProcessor.from_pretrained(path, backend="pil"), tiny_tokenizer(image_token="<image>"),
        patch_size=8, vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    return Reference(
        model, lambda image: dict(processor(images=image, text="w5 w6 <image> w7", return_tensors="pt")), 16
    )


FAMILIES = ["gemma3", "gemma3_no_pan_and_scan", "internvl", "llava_next"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiled")
    return {
        "gemma3": save_gemma3(root / "gemma3"),
        "gemma3_no_pan_and_scan": save_gemma3(root / "gemma3_plain", pan_and_scan=False),
        "internvl": save_internvl(root / "internvl"),
        "llava_next": save_llava_next(root / "llava_next"),
    }


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, Reference]:
    return {
        "gemma3": gemma3_reference(checkpoints["gemma3"], PAN_AND_SCAN),
        "gemma3_no_pan_and_scan": gemma3_reference(checkpoints["gemma3_no_pan_and_scan"], {}),
        "internvl": internvl_reference(checkpoints["internvl"]),
        "llava_next": llava_next_reference(checkpoints["llava_next"]),
    }


@pytest.fixture(scope="module")
def encoders(checkpoints: dict[str, Path]) -> dict[str, Encoder]:
    return {name: load_encoder(ModelSettings(name=str(path))) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def batched(encoders: dict[str, Encoder]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every test image through preprocess, then ONE batched encode, per family."""
    return {name: enc.encode([enc.preprocess(image) for image in IMAGES]) for name, enc in encoders.items()}


@dataclass
class Cached:
    """What `mmprep encode` wrote per family: the cache directory and the entries, in image order."""

    dirs: dict[str, Path]
    entries: dict[str, list[CachedEmbedding]]

    def __getitem__(self, family: str) -> list[CachedEmbedding]:
        return self.entries[family]


@pytest.fixture(scope="module")
def cached(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Cached:
    """`mmprep encode` (the CLI, in batches of 2 mixed sizes) of the test images saved as PNG files, per
    family; the entries read back with EmbeddingCache."""
    import json

    root = tmp_path_factory.mktemp("cached")
    paths = [root / "images" / f"{i}-{w}x{h}.png" for i, (w, h) in enumerate(SIZES)]
    paths[0].parent.mkdir()
    for image, path in zip(IMAGES, paths, strict=True):
        image.save(path)  # lossless: decoding gives back the very pixels of IMAGES
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"url": str(path)}) + "\n" for path in paths))
    result = Cached({}, {})
    for family in ("gemma3", "internvl", "llava_next"):
        out = result.dirs[family] = root / family
        run = cli("encode", str(manifest), "--model", str(checkpoints[family]), "--out", str(out), "--batch-size", "2",
                  "--allow-local-dir", str(paths[0].parent), "--progress", "none", "--json")  # fmt: skip
        assert run.exit_code == 0, run.output
        summary = json.loads(run.stdout)
        assert summary["encoded"] == len(IMAGES) and summary["failed"] == 0
        with EmbeddingCache(out) as cache:
            result.entries[family] = [cache.get(str(path)) for path in paths]
    return result


# -- fidelity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_equal_transformers_processor_and_forward(
    family: str, encoders: dict[str, Encoder], references: dict[str, Reference], batched: dict[str, Any]
) -> None:
    encoder, reference = encoders[family], references[family]
    hidden = encoder.output_shape()[1]
    counts = []
    for image, out in zip(IMAGES, batched[family], strict=True):
        inputs = reference.inputs(image)
        expected = reference.features(inputs)
        embeddings = out["embeddings"]
        assert embeddings.dtype == torch.float32 and embeddings.shape == (
            int((inputs["input_ids"] == IMAGE_TOKEN).sum()),
            hidden,
        )
        assert embeddings.is_contiguous() and embeddings.untyped_storage().nbytes() == embeddings.numel() * 4
        torch.testing.assert_close(embeddings, expected, atol=ATOL, rtol=0)
        assert embeddings.std(dim=0).min() > 1e-3  # every channel varies across tokens: weights are not at zero
        assert set(out) == {"embeddings", "image_sizes"} and out["image_sizes"].dtype == torch.int64
        assert out["image_sizes"].tolist() == [[image.height, image.width]]  # what the token count follows
        if family == "llava_next":
            assert torch.equal(out["image_sizes"], inputs["image_sizes"])
        counts.append(embeddings.shape[0])
    assert not torch.allclose(
        batched[family][0]["embeddings"][:4], batched[family][3]["embeddings"][:4]
    )  # images differ
    if family == "gemma3_no_pan_and_scan":
        assert counts == [4] * len(IMAGES)  # hub default: one view per image, however wide
    else:
        assert len(set(counts)) >= 3 and max(counts) > min(counts)  # crops / tiles / grids follow each image
    # --fast-decode aims at a fixed input size only where every image is resized to one
    assert encoder.input_size() == ((32, 32) if family == "gemma3_no_pan_and_scan" else None)


@pytest.mark.parametrize("family", ["gemma3", "internvl", "llava_next"])
def test_pipeline_stores_every_tensor_of_the_encoder(
    family: str, cached: dict[str, Any], batched: dict[str, Any]
) -> None:
    """Through `mmprep encode`, shards and EmbeddingCache: the family and every named tensor, as encoded."""
    for entry, encoded in zip(cached[family], batched[family], strict=True):
        assert entry is not None and entry.family == family
        assert entry.tensors.keys() == encoded.keys()
        for name, tensor in encoded.items():
            torch.testing.assert_close(entry.tensors[name], tensor, atol=ATOL, rtol=0)


def test_to_vllm_layouts(cached: dict[str, Any]) -> None:
    """InternVL and LLaVA-NeXT: [1, n_tokens, hidden] (vLLM's parser reads a 2-D tensor as pixels); Gemma 3:
    refused, since vLLM 0.32 takes no image embeddings for it."""
    for family in ("internvl", "llava_next"):
        for entry in cached[family]:
            mm = to_vllm(entry)
            assert mm.ndim == 3 and mm.shape[0] == 1 and torch.equal(mm[0], entry.embeddings)
    with pytest.raises(ServingFormatError, match="no precomputed-embedding image input for Gemma 3"):
        to_vllm(cached["gemma3"][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_count_follows_the_image_size(
    family: str, checkpoints: dict[str, Path], batched: dict[str, Any]
) -> None:
    """The token count from (height, width) and the config alone (what vLLM reserves as placeholders, and what
    the vllm-ec export checks) equals the processor's, for every test image."""
    import importlib

    from mmprep.models.source import load_config, load_image_processor, resolve_source

    module = importlib.import_module(f"mmprep.models.{family.removesuffix('_no_pan_and_scan')}")
    source = resolve_source(str(checkpoints[family]))
    config, image_processor = load_config(source), load_image_processor(source)
    for out in batched[family]:
        height, width = out["image_sizes"][0].tolist()
        assert module.image_token_count(config, image_processor, height, width) == out["embeddings"].shape[0]


@pytest.mark.parametrize("family", ["gemma3", "internvl", "llava_next"])
def test_vllm_ec_export_writes_each_images_encoder_output(family: str, cached: Cached, tmp_path: Path) -> None:
    """`mmprep export --format vllm-ec`: one `ec_cache` tensor per image, the stored embeddings, row counts checked."""
    from safetensors.torch import load_file

    from mmprep import cache_key

    store = tmp_path / "store"
    result = cli("export", str(cached.dirs[family]), "--out", str(store), "--format", "vllm-ec", "--progress", "none")
    assert result.exit_code == 0, result.output
    assert f"{len(IMAGES)} written, 0 replaced, 0 skipped" in result.output
    for entry in cached[family]:
        tensors = load_file(str(store / cache_key(entry.url) / "encoder_cache.safetensors"))
        assert list(tensors) == ["ec_cache"] and torch.equal(tensors["ec_cache"], entry.embeddings)


def test_vllm_ec_export_refuses_an_entry_whose_size_does_not_fit(cached: Cached, tmp_path: Path) -> None:
    """An image size that gives another token count than the tensor's (here: a square, so no crops) is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mmprep import cache_key

    damaged = tmp_path / "cache"
    shutil.copytree(cached.dirs["gemma3"], damaged)
    victim = cache_key(cached["gemma3"][1].url)  # 200x90: 2 crops, 12 tokens; a 90x90 image gets 4
    for shard in (damaged / "shards").rglob("*.safetensors"):
        tensors = load_file(str(shard))
        if f"{victim}.image_sizes" in tensors:
            with safe_open(str(shard), "pt") as f:
                metadata = f.metadata()
            tensors[f"{victim}.image_sizes"] = torch.tensor([[90, 90]])
            save_file(tensors, str(shard), metadata=metadata)
    store = tmp_path / "store"
    result = cli("export", str(damaged), "--out", str(store), "--format", "vllm-ec", "--progress", "none")
    assert result.exit_code == 1 and "refused" in result.output and victim[:16] in result.output
    assert not (store / victim / "encoder_cache.safetensors").exists()


def test_gemma3_pan_and_scan_views(batched: dict[str, Any]) -> None:
    """Wide and tall images get crops after the full view; the 5x3 image is too small to crop."""
    views = [out["embeddings"].shape[0] // 4 for out in batched["gemma3"]]
    assert views == [3, 3, 4, 1, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_encode_equals_one_by_one(family: str, encoders: dict[str, Encoder], batched: dict[str, Any]) -> None:
    encoder = encoders[family]
    for image, together in zip(IMAGES, batched[family], strict=True):
        alone = encoder.encode([encoder.preprocess(image)])[0]
        assert alone.keys() == together.keys()
        for name in alone:
            torch.testing.assert_close(alone[name], together[name], atol=ATOL, rtol=0)


def test_ray_and_check_preprocess_like_the_encoder(checkpoints: dict[str, Path], encoders: dict[str, Encoder]) -> None:
    """load_preprocessor (Ray CPU tasks, `mmprep check`) applies the family's processor arguments too (InternVL
    tiles), and what the Ray actor then keeps of its output (`input_names`) encodes like the local engine."""
    for family in ("gemma3", "internvl", "llava_next"):
        encoder = encoders[family]
        preprocess = load_preprocessor(ModelSettings(name=str(checkpoints[family])))
        assert preprocess.input_size() is None
        got, want = preprocess(IMAGES[1]), encoder.preprocess(IMAGES[1])
        assert torch.equal(got["pixel_values"], want["pixel_values"]) and want["pixel_values"].shape[-4] > 1
        kept = {name: got[name] for name in encoder.input_names(got)}  # as ray_engine.EncodeActor does
        for name, tensor in encoder.encode([want])[0].items():
            torch.testing.assert_close(encoder.encode([kept])[0][name], tensor, atol=0, rtol=0)


# -- serving equivalence: the cached tokens substitute for the vision encoder ------------------------


def logits_from_tokens(model: Any, inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The language model's logits with the image placeholders filled with `tokens` (no pixels)."""
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().clone()
    mask = ids == IMAGE_TOKEN
    assert int(mask.sum()) == tokens.shape[0]
    embeds[mask] = tokens.to(embeds.dtype)
    extra = {k: v for k, v in inputs.items() if k in ("attention_mask", "token_type_ids")}
    with torch.no_grad():
        return model(inputs_embeds=embeds, **extra).logits


def wrong_layouts(tokens: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
    return {"reversed": tokens.flip(0), "first view moved last": torch.cat([tokens[view:], tokens[:view]])}


@pytest.mark.parametrize("family", ["gemma3", "internvl", "llava_next"])
def test_logits_from_cached_tokens_equal_logits_from_pixels(
    family: str, references: dict[str, Reference], cached: dict[str, Any]
) -> None:
    """The cache entry (to_vllm's tensor where vLLM has one) fills the image placeholders in place of the encoder."""
    reference = references[family]
    entry = cached[family][1]  # 200x90: several crops / tiles / grid cells
    tokens = entry.embeddings if family == "gemma3" else to_vllm(entry)[0]
    inputs = reference.inputs(IMAGES[1])
    with torch.no_grad():
        from_pixels = reference.model(**inputs).logits
    assert from_pixels.std() > 1e-3
    torch.testing.assert_close(
        logits_from_tokens(reference.model, inputs, tokens), from_pixels, atol=PROMPT_ATOL, rtol=0
    )
    for name, wrong in wrong_layouts(tokens, reference.view_tokens).items():
        diff = (logits_from_tokens(reference.model, inputs, wrong) - from_pixels).abs().max()
        assert diff > 100 * PROMPT_ATOL, f"{name}: a wrong layout went unnoticed ({diff})"


# -- vision-only loading ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "tensor"),
    [
        ("gemma3", "multi_modal_projector.mm_input_projection_weight"),
        ("internvl", "multi_modal_projector.linear_1.weight"),
        ("llava_next", "image_newline"),
        ("llava_next", "vision_tower.*layers.0.mlp.fc1.weight"),
    ],
)
def test_checkpoint_missing_vision_weights_fails_at_load(
    family: str, tensor: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """At load, naming the missing tensors; not mid-run."""
    import re

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[family], broken)
    weights = load_file(broken / "model.safetensors")
    (name,) = [k for k in weights if re.fullmatch(rf"(model\.)?{tensor}", k)]
    del weights[name]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"lacks vision-tower or projector weights: {tensor}"):
        load_encoder(ModelSettings(name=str(broken)))


@pytest.mark.parametrize("family", ["gemma3", "internvl", "llava_next"])
def test_language_model_is_never_read(
    family: str, checkpoints: dict[str, Path], encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    """A checkpoint stripped of every language-model tensor encodes exactly like the full one."""
    from safetensors.torch import load_file, save_file

    vision_only = tmp_path / "vision_only"
    shutil.copytree(checkpoints[family], vision_only)
    weights = load_file(vision_only / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "language_model" not in k and not k.startswith("lm_head")}
    assert len(kept) < len(weights)
    save_file(kept, vision_only / "model.safetensors", metadata={"format": "pt"})
    encoder = load_encoder(ModelSettings(name=str(vision_only)))
    names = [name for name, _ in encoder.model.named_parameters()]  # type: ignore[attr-defined]
    assert not any("language_model" in n or "lm_head" in n for n in names)
    got = encoder.encode([encoder.preprocess(IMAGES[1])])[0]
    want = encoders[family].encode([encoders[family].preprocess(IMAGES[1])])[0]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("family", "layout"),
    [("gemma3", "hub"), ("llava_next", "hub"), ("gemma3", "model."), ("internvl", "model."), ("llava_next", "model.")],
)
def test_checkpoint_key_layouts_load_alike(
    family: str, layout: str, checkpoints: dict[str, Path], encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    """Hub checkpoints name SigLIP/CLIP towers "vision_tower.vision_model.*"; transformers v5 prefixes "model.":
    both load the same vision weights."""
    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        if layout == "model.":
            return key if key.startswith("lm_head") else f"model.{key}"
        tower = key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.")
        return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if tower else key

    copy = tmp_path / "relaid"
    shutil.copytree(checkpoints[family], copy)
    weights = load_file(copy / "model.safetensors")
    relaid = {renamed(k): v for k, v in weights.items()}
    assert set(relaid) != set(weights)
    save_file(relaid, copy / "model.safetensors", metadata={"format": "pt"})
    encoder = load_encoder(ModelSettings(name=str(copy)))
    got = encoder.encode([encoder.preprocess(IMAGES[1])])[0]
    want = encoders[family].encode([encoders[family].preprocess(IMAGES[1])])[0]
    torch.testing.assert_close(got["embeddings"], want["embeddings"], atol=0, rtol=0)
