"""The exact fast preprocessing path gives transformers' own pixel_values, bit for bit, or is not taken."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from mmprep.errors import RowError
from mmprep.models import ImagePreprocessor, load_preprocessor
from mmprep.imaging import resample
from mmprep.imaging.fastprep import QwenPatchPath, ResizeCropPath, agrees, fast_path_for
from mmprep.settings import ModelSettings

SIZES = [(640, 480), (480, 640), (224, 224), (225, 223), (1, 1), (2, 300), (300, 2), (33, 17), (1000, 10), (57, 999)]
MODES = ["RGB", "L", "RGBA", "LA", "P", "P-transparent", "RGB-transparent", "CMYK", "1", "I;16"]


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise, so resampling filters see both edges and flat areas."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    rgb = Image.fromarray(photo(width, height, seed))
    if mode == "RGBA" or mode == "LA":
        alpha = Image.fromarray(np.random.default_rng(seed + 1).integers(0, 256, (height, width), dtype=np.uint8))
        out = rgb.convert(mode[:-1])
        out.putalpha(alpha)
        return out
    if mode == "P-transparent":
        out = rgb.convert("P")
        out.info["transparency"] = 3
        return out
    if mode == "RGB-transparent":  # a PNG with a tRNS colour: transformers composites it onto white
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG", transparency=tuple(int(v) for v in photo(width, height, seed)[0, 0]))
        return Image.open(io.BytesIO(buffer.getvalue()))
    if mode == "I;16":
        return rgb.convert("L").convert("I;16")
    return rgb.convert(mode)


def same(processor, fast, img) -> None:
    expected = processor(images=img, return_tensors="pt")
    got = fast(img)
    assert set(got) == set(expected.keys())
    for key, tensor in got.items():
        assert tensor.dtype == expected[key].dtype and tensor.shape == expected[key].shape, key
        assert torch.equal(tensor, expected[key]), f"{key}: max abs diff {(tensor - expected[key]).abs().max()}"


CLIP_CONFIGS = [
    {},
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    {"size": {"shortest_edge": 20}, "crop_size": {"height": 32, "width": 24}},  # crop larger than the image: padding
    {"size": {"shortest_edge": 48}, "do_center_crop": False},
    {"size": {"height": 40, "width": 56}, "do_center_crop": False},
    {"resample": Image.Resampling.BILINEAR, "size": {"shortest_edge": 64}, "crop_size": {"height": 60, "width": 60}},
    {"resample": Image.Resampling.LANCZOS},
    {"resample": Image.Resampling.NEAREST, "do_normalize": False},
    {"do_rescale": False, "image_mean": 127.0, "image_std": 50.0},
    {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 0.9, 1.1], "image_std": [0.7, 1.3, 1.0]},
    {"do_resize": False, "crop_size": {"height": 30, "width": 30}},
]
SIGLIP_CONFIGS = [{}, {"size": {"height": 32, "width": 32}}, {"size": 48}]
QWEN_CONFIGS = [
    {},
    {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64},
    {"patch_size": 16, "merge_size": 2, "min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 100},
    {"temporal_patch_size": 1, "resample": Image.Resampling.BILINEAR, "max_pixels": 28 * 28 * 30},
]


@pytest.fixture(params=["native", "pillow"])
def resampler(request, monkeypatch) -> str:
    """Each comparison runs with the native resampler and with MMPREP_NATIVE_RESAMPLE=0 (Pillow's own resize)."""
    if request.param == "native":
        if not resample.native_built():
            pytest.skip("mmprep.imaging._resample is not built (`pip install -e .` with a C compiler builds it)")
        monkeypatch.delenv(resample.NATIVE_SWITCH, raising=False)
    else:
        monkeypatch.setenv(resample.NATIVE_SWITCH, "0")
    return request.param


def assert_resampler_in_use(fast, resampler: str) -> None:
    """The native resampler really runs for every mirrored filter when it is on, and never when it is off."""
    filter_used = getattr(fast, "_resample", None)
    if filter_used is not None and int(filter_used) in resample.MIRRORED_FILTERS:
        assert resample.native_enabled(filter_used) is (resampler == "native")


PROCESSORS = (
    [("clip", CLIPImageProcessorPil, c, ResizeCropPath) for c in CLIP_CONFIGS]
    + [("siglip", SiglipImageProcessorPil, c, ResizeCropPath) for c in SIGLIP_CONFIGS]
    + [("qwen2_vl", Qwen2VLImageProcessorPil, c, QwenPatchPath) for c in QWEN_CONFIGS]
)


@pytest.mark.parametrize(
    ("name", "cls", "config", "path"), PROCESSORS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PROCESSORS)]
)
def test_bit_identical_over_sizes_and_modes(name, cls, config, path, resampler) -> None:
    """Every size (incl. 1x1 and 1:150 strips) and mode (alpha, palette transparency, CMYK, 16-bit) matches exactly."""
    processor = cls(**config)
    fast = fast_path_for(processor)
    assert isinstance(fast, path)
    assert_resampler_in_use(fast, resampler)
    for index, (width, height) in enumerate(SIZES):
        mode = MODES[index % len(MODES)]
        if name == "qwen2_vl" and max(width, height) / min(width, height) > 200:
            continue  # covered by test_errors_are_transformers_errors
        same(processor, fast, image(width, height, mode, seed=index))
    for mode in MODES:  # every mode at one photo-like size
        same(processor, fast, image(97, 61, mode, seed=7))


def test_qwen_at_its_default_pixel_budget(resampler) -> None:
    """A full-size photo at Qwen2-VL's default budget: hundreds of patches, the grid as transformers computes it."""
    processor = Qwen2VLImageProcessorPil()
    fast = fast_path_for(processor)
    assert_resampler_in_use(fast, resampler)
    img = image(1280, 720, "RGB", seed=3)
    same(processor, fast, img)
    assert fast(img)["image_grid_thw"].tolist() == [[1, 52, 92]]


@pytest.mark.skipif(not resample.native_built(), reason="mmprep.imaging._resample is not built")
def test_resize_and_center_crop_compute_only_the_crop(monkeypatch) -> None:
    """CLIP's 640x480 -> 298x224 resize is computed for the 224x224 crop only; a crop larger than the image pads."""
    monkeypatch.delenv(resample.NATIVE_SWITCH, raising=False)
    windows = []
    native = resample._native

    def recording(image, size, resample_filter, window):
        windows.append((size, window))
        return native(image, size, resample_filter, window)

    monkeypatch.setattr(resample, "_native", recording)
    processor = CLIPImageProcessorPil()
    same(processor, fast_path_for(processor), image(640, 480, "RGB"))
    assert windows[-1] == ((298, 224), (37, 0, 261, 224))
    padded = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 32, "width": 24})
    same(padded, fast_path_for(padded), image(40, 30, "RGB"))
    assert windows[-1] == ((26, 20), None)  # the whole resize, then center_crop pads it


def test_comparison_detects_a_one_ulp_change() -> None:
    """The check can fail: a processor whose std differs in the last float32 bit gives different pixel_values."""
    processor = CLIPImageProcessorPil()
    std = list(processor.image_std)
    std[1] = float(np.nextafter(np.float32(std[1]), np.float32(1)))
    other = fast_path_for(CLIPImageProcessorPil(image_std=std))
    with pytest.raises(AssertionError):
        same(processor, other, image(300, 200, "RGB"))


def test_errors_are_transformers_errors() -> None:
    """An image Qwen2-VL refuses (aspect ratio over 200) fails the same way on both paths, as a preprocess error."""
    processor = Qwen2VLImageProcessorPil()
    strip = image(1000, 4, "RGB")
    with pytest.raises(ValueError) as slow:
        processor(images=strip, return_tensors="pt")
    with pytest.raises(RowError) as fast:
        ImagePreprocessor(processor)(strip)
    assert fast.value.kind.value == "preprocess_error"
    assert str(slow.value) in fast.value.message


@pytest.mark.parametrize(
    ("processor", "call_kwargs"),
    [
        (LlavaNextImageProcessorPil(), {}),  # overrides _preprocess (tiles): not mirrored
        (CLIPImageProcessorPil(), {"crop_to_patches": True}),  # call arguments: not mirrored
        (CLIPImageProcessorPil(do_pad=True, pad_size={"height": 300, "width": 300}), {}),
        (CLIPImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64}), {}),
        (CLIPImageProcessorPil(do_convert_rgb=False), {}),
        (CLIPImageProcessorPil(do_rescale=False, do_normalize=False), {}),
    ],
)
def test_falls_back_to_transformers(processor, call_kwargs) -> None:
    """Configs the fast path does not mirror keep the transformers processor, with its outputs."""
    assert fast_path_for(processor, call_kwargs) is None
    if not call_kwargs:
        preprocess = ImagePreprocessor(processor)
        assert preprocess.fast_path is None
        img = image(120, 90, "RGB")
        expected = processor(images=img, return_tensors="pt")
        assert all(torch.equal(preprocess(img)[k], expected[k]) for k in expected)


@pytest.mark.parametrize("model", ["builtin:tiny-clip", "builtin:tiny-qwen2-vl"])
def test_builtin_models_take_the_fast_path(model, tmp_path, monkeypatch) -> None:
    """The shipped smoke-test models' processors are covered, and give what the transformers processor gives."""
    monkeypatch.setenv("MMPREP_HOME", str(tmp_path))
    fast = load_preprocessor(ModelSettings(name=model))
    assert fast.fast_path is not None
    slow = ImagePreprocessor(fast._processor, options=fast._options, fast=False)
    assert slow.fast_path is None
    for width, height in [(640, 480), (31, 97)]:
        img = image(width, height, "RGB")
        a, b = fast(img), slow(img)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert a["pixel_values"].std() > 0.1  # not a constant image


def test_a_path_that_disagrees_on_the_probe_is_not_taken(monkeypatch) -> None:
    """The build-time probe: if transformers changed a step (here: normalize), the fast path is refused."""
    processor = CLIPImageProcessorPil()
    fast = fast_path_for(processor)
    assert fast is not None and agrees(processor, fast)
    changed = CLIPImageProcessorPil()
    monkeypatch.setattr(type(changed), "normalize", lambda self, image, mean, std, **kw: image * 0.5)
    assert not agrees(changed, fast)
