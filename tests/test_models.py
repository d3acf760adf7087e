"""Model families against direct transformers forwards on tiny real models; loading errors; builtins; fingerprints."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from _model_helpers import (
    features_of,
    pattern_image,
    save_bert,
    save_clip,
    save_llava,
    save_qwen2_vl,
    save_siglip,
    save_siglip2,
)

from mmprep.errors import ErrorKind, ModelLoadError, RowError
from mmprep.models import BUILTIN_MODELS, Encoder, builtin_model_dir, load_encoder
from mmprep.models.builtin import MARKER
from mmprep.settings import ModelSettings

# Different sizes and aspect ratios, so variable-resolution processors give different grids per image.
SIZES = [(60, 40), (200, 90), (33, 120), (256, 256)]
IMAGES = [pattern_image(size, seed) for seed, size in enumerate(SIZES)]
ATOL = 1e-5


def load(path: Path | str, **settings: str) -> Encoder:
    return load_encoder(ModelSettings(name=str(path), **settings))


def encode_all(encoder: Encoder) -> list[dict[str, torch.Tensor]]:
    """All test images through preprocess, then one batched encode."""
    return encoder.encode([encoder.preprocess(image) for image in IMAGES])


def assert_owned_cpu(tensor: torch.Tensor) -> None:
    """What the shard writer needs: a contiguous CPU tensor that does not keep a whole batch alive."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_inference()
    assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "clip": save_clip(root / "clip"),
        "siglip": save_siglip(root / "siglip"),
        "siglip2": save_siglip2(root / "siglip2"),
        "qwen2_vl": save_qwen2_vl(root / "qwen2_vl"),
        "qwen2_5_vl": save_qwen2_vl(root / "qwen2_5_vl", v2_5=True),
        "llava": save_llava(root / "llava"),
        "llava_full_last": save_llava(root / "llava_full_last", feature_layer=-1, strategy="full"),
        "bert": save_bert(root / "bert"),
    }


# -- fidelity: the stored tensors equal a direct transformers forward, image by image ------------


@pytest.mark.parametrize(
    ("key", "model_class"), [("clip", "CLIPModel"), ("siglip", "SiglipModel"), ("siglip2", "Siglip2Model")]
)
def test_pooled_matches_direct_forward(models: dict[str, Path], key: str, model_class: str) -> None:
    import transformers
    from transformers import AutoImageProcessor

    encoder = load(models[key])
    outputs = encode_all(encoder)

    model = getattr(transformers, model_class).from_pretrained(models[key]).eval()
    processor = AutoImageProcessor.from_pretrained(models[key])
    assert encoder.family == "pooled" and encoder.describe()["architecture"] == model_class
    for image, out in zip(IMAGES, outputs, strict=True):
        with torch.no_grad():
            expected = features_of(model.get_image_features(**processor(images=image, return_tensors="pt")))[0]
        assert set(out) == {"embeddings"}
        assert out["embeddings"].dtype == torch.float32
        assert list(out["embeddings"].shape) == encoder.describe()["output"]["embeddings"]["shape"]
        assert_owned_cpu(out["embeddings"])
        torch.testing.assert_close(out["embeddings"], expected, atol=ATOL, rtol=0)
    assert not torch.allclose(outputs[0]["embeddings"], outputs[1]["embeddings"])  # the images really differ


@pytest.mark.parametrize(
    ("key", "model_class"),
    [("qwen2_vl", "Qwen2VLForConditionalGeneration"), ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")],
)
def test_qwen2_vl_matches_direct_forward_with_mixed_sizes(models: dict[str, Path], key: str, model_class: str) -> None:
    import transformers
    from transformers import AutoImageProcessor

    encoder = load(models[key])
    outputs = encode_all(encoder)

    model = getattr(transformers, model_class).from_pretrained(models[key]).eval()
    processor = AutoImageProcessor.from_pretrained(models[key])
    hidden = encoder.describe()["output"]["embeddings"]["shape"][1]
    grids = []
    for image, out in zip(IMAGES, outputs, strict=True):
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            expected = features_of(model.get_image_features(**inputs))[0]
        assert set(out) == {"embeddings", "image_grid_thw"}
        assert torch.equal(out["image_grid_thw"], inputs["image_grid_thw"])
        assert out["image_grid_thw"].shape == (1, 3) and out["image_grid_thw"].dtype == torch.int64
        assert out["embeddings"].shape == (int(inputs["image_grid_thw"].prod()) // 4, hidden)
        for tensor in out.values():
            assert_owned_cpu(tensor)
        torch.testing.assert_close(out["embeddings"], expected, atol=ATOL, rtol=0)
        grids.append(tuple(out["image_grid_thw"][0].tolist()))
    assert len(set(grids)) == len(IMAGES)  # one batch really mixed different token counts


@pytest.mark.parametrize("key", ["llava", "llava_full_last"])
def test_llava_matches_direct_forward(models: dict[str, Path], key: str) -> None:
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    encoder = load(models[key])
    outputs = encode_all(encoder)

    model = LlavaForConditionalGeneration.from_pretrained(models[key]).eval()
    processor = AutoImageProcessor.from_pretrained(models[key])
    config = model.config
    n_tokens = (32 // 8) ** 2 + (config.vision_feature_select_strategy == "full")  # patches (+ CLS)
    for image, out in zip(IMAGES, outputs, strict=True):
        with torch.no_grad():
            expected = features_of(
                model.get_image_features(
                    pixel_values=processor(images=image, return_tensors="pt")["pixel_values"],
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                )
            )[0]
        assert out["embeddings"].shape == (n_tokens, 48)
        assert encoder.describe()["output"]["embeddings"]["shape"] == ["n_tokens", 48]
        assert_owned_cpu(out["embeddings"])
        torch.testing.assert_close(out["embeddings"], expected, atol=ATOL, rtol=0)


def test_llava_drops_the_language_model(models: dict[str, Path]) -> None:
    encoder = load(models["llava"])
    names = {name for name, _ in encoder.model.named_parameters()}  # type: ignore[attr-defined]
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    assert not any("language_model" in n or "lm_head" in n for n in names)


def test_qwen2_vl_loads_only_the_vision_tower(models: dict[str, Path]) -> None:
    encoder = load(models["qwen2_vl"])
    assert all(name.startswith(("patch_embed", "blocks", "merger")) for name, _ in encoder.visual.named_parameters())  # type: ignore[attr-defined]


def test_input_size_is_the_processor_resize_target_or_none_for_dynamic_resolution(models: dict[str, Path]) -> None:
    """What --fast-decode aims at: fixed-size processors give (W, H); variable-resolution ones give None."""
    assert load(models["clip"]).input_size() == (32, 32)  # shortest_edge 32
    assert load(models["siglip"]).input_size() == (32, 32)  # height x width
    assert load(models["llava"]).input_size() == (32, 32)
    assert load(models["siglip2"]).input_size() is None  # NaFlex: patch budget
    assert load(models["qwen2_vl"]).input_size() is None  # pixel budget, grid per image


def test_qwen2_vl_checkpoint_without_tower_weights_fails_to_load(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(models["qwen2_vl"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["visual.merger.mlp.0.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks vision-tower weights: merger.mlp.0.weight"):
        load(broken)


def test_llava_never_reads_the_language_model(models: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint stripped of every language-model tensor encodes exactly like the full one."""
    from safetensors.torch import load_file, save_file

    vision_only = tmp_path / "vision_only"
    shutil.copytree(models["llava"], vision_only)
    weights = load_file(vision_only / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "language_model" not in k and not k.startswith("lm_head")}
    assert len(kept) < len(weights)
    save_file(kept, vision_only / "model.safetensors", metadata={"format": "pt"})
    for got, expected in zip(encode_all(load(vision_only)), encode_all(load(models["llava"])), strict=True):
        torch.testing.assert_close(got["embeddings"], expected["embeddings"], atol=0, rtol=0)


def test_llava_checkpoint_without_projector_weights_fails_to_load(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(models["llava"], broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if "multi_modal_projector.linear_2.weight" in k)
    del weights[name]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError, match="lacks vision-tower or projector weights: multi_modal_projector.linear_2.weight"
    ):
        load(broken)


def test_preprocess_is_thread_safe(models: dict[str, Path]) -> None:
    encoder = load(models["qwen2_vl"])
    expected = [encoder.preprocess(image) for image in IMAGES]
    results: list[list[dict[str, torch.Tensor]]] = []

    def work() -> None:
        results.append([encoder.preprocess(image) for image in IMAGES * 5])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for result in results:
        for got, want in zip(result, expected * 5, strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_preprocess_failure_is_a_preprocess_row_error(models: dict[str, Path]) -> None:
    encoder = load(models["qwen2_vl"])
    with pytest.raises(RowError) as caught:
        encoder.preprocess(pattern_image((2000, 5)))  # aspect ratio over Qwen2-VL's limit of 200
    assert caught.value.kind is ErrorKind.PREPROCESS_ERROR


def test_bfloat16_on_cpu_returns_bfloat16_close_to_float32(models: dict[str, Path]) -> None:
    fp32 = encode_all(load(models["clip"]))
    encoder = load(models["clip"], dtype="bfloat16")
    bf16 = encode_all(encoder)
    assert encoder.dtype == torch.bfloat16 and encoder.describe()["dtype"] == "bfloat16"
    for a, b in zip(fp32, bf16, strict=True):
        assert b["embeddings"].dtype == torch.bfloat16
        torch.testing.assert_close(b["embeddings"].float(), a["embeddings"], atol=0.05, rtol=0.05)


# -- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_follows_weights_dtype_and_processor_not_path(models: dict[str, Path], tmp_path: Path) -> None:
    base = load(models["clip"]).fingerprint
    assert len(base) == 64 and int(base, 16) >= 0
    assert load(models["clip"]).fingerprint == base

    copy = tmp_path / "copy"
    shutil.copytree(models["clip"], copy)
    assert load(copy).fingerprint == base  # same files elsewhere: same outputs, same cache entries
    assert load(models["clip"], dtype="bfloat16").fingerprint != base

    reseeded = save_clip(tmp_path / "reseeded", seed=1)
    assert load(reseeded).fingerprint != base

    (copy / "preprocessor_config.json").write_text(
        (copy / "preprocessor_config.json").read_text().replace('"resample": 3', '"resample": 2')
    )
    assert load(copy).fingerprint != base


# -- builtins --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_is_created_once_and_loads_like_a_directory(name: str, caplog: pytest.LogCaptureFixture) -> None:
    directory = builtin_model_dir(name)
    assert (directory / MARKER).is_file() and (directory / "config.json").is_file()
    stamp = (directory / "model.safetensors").stat().st_mtime_ns

    with caplog.at_level(logging.WARNING, logger="mmprep.models"):
        first = load(f"builtin:{name}")
    assert "random weights" in caplog.text
    second = load(f"builtin:{name}")
    assert builtin_model_dir(name) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert first.fingerprint == second.fingerprint == load(directory).fingerprint
    assert load(f"builtin:{name}", dtype="bfloat16").fingerprint != first.fingerprint
    assert first.describe()["note"] == "smoke-test model with random weights"
    assert json.loads(json.dumps(first.describe())) == first.describe()
    assert first.name == f"builtin:{name}"

    outputs = encode_all(first)
    assert len(outputs) == len(IMAGES)
    assert all(torch.isfinite(out["embeddings"]).all() for out in outputs)


def test_builtin_concurrent_first_use_yields_one_complete_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMPREP_HOME", str(tmp_path))
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(builtin_model_dir("tiny-clip"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [tmp_path / "builtin" / "tiny-clip"] * 3
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == ["tiny-clip"]  # no staging leftovers
    assert load("builtin:tiny-clip").fingerprint == load(tmp_path / "builtin" / "tiny-clip").fingerprint


# -- load errors -----------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_supported_ones(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="BertModel") as caught:
        load(models["bert"])
    assert "CLIPModel" in str(caught.value) and "Qwen2VLForConditionalGeneration" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/nonexistent/model-dir", "not found"),
        ("./missing-model", "not found"),
        ("mmprep-test/no-such-model", "no-such-model"),
        ("builtin:no-such", "unknown builtin"),
    ],
)
def test_unloadable_names_fail_quickly(name: str, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=match):
        load(name)
    assert time.monotonic() - started < 60  # no hub retries with backoff (those take minutes)


def test_corrupt_weights_fail_to_load(models: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["clip"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load(broken)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load("builtin:tiny-clip", device="cuda")


@pytest.mark.parametrize(("field", "value"), [("device", "tpu"), ("dtype", "int8")])
def test_unknown_device_or_dtype_is_a_load_error(field: str, value: str) -> None:
    with pytest.raises(ModelLoadError, match=f"unknown {field}"):
        load("builtin:tiny-clip", **{field: value})


# -- hub models and fingerprints across processes -------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_IN_FRESH_PROCESS = """
import json, sys
from mmprep.models import load_encoder
from mmprep.settings import ModelSettings
local = load_encoder(ModelSettings(name=sys.argv[1]))
hub = load_encoder(ModelSettings(name="mmprep-test/tiny-clip"))
pinned = load_encoder(ModelSettings(name="mmprep-test/tiny-clip", revision=sys.argv[2]))
print(json.dumps({"local": local.fingerprint, "hub": hub.describe(), "pinned": pinned.fingerprint}))
"""


@pytest.mark.slow  # a subprocess loads the model again
def test_hub_model_is_pinned_to_its_commit_and_fingerprints_match_across_processes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """A hub repo in the HF cache (offline) loads pinned to its snapshot's commit, in a fresh process."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--mmprep-test--tiny-clip"
    shutil.copytree(models["clip"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = dict(
        os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1])
    )
    run = subprocess.run(
        [sys.executable, "-c", _IN_FRESH_PROCESS, str(models["clip"]), COMMIT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])

    local = load(models["clip"])
    assert facts["local"] == local.fingerprint  # stable across processes
    assert facts["hub"]["revision"] == COMMIT and facts["hub"]["name"] == "mmprep-test/tiny-clip"
    assert facts["pinned"] == facts["hub"]["fingerprint"]
    assert facts["hub"]["fingerprint"] != local.fingerprint  # weights named by commit, not by file samples
