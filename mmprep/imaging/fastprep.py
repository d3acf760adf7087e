"""Exact fast image preprocessing: transformers' PIL-backend processors, same pixels, a fraction of the work.

transformers' PIL backend turns each image into a CHW uint8 array, back into a PIL image to resize, then
rescales in float64 (`uint8 -> float64 * rescale_factor -> float32`) and normalizes in float32
(`(x - mean) / std`), all through a generic, validating call path. Every step after the resize maps one
uint8 value of one channel to one float32 value, so those steps are computed once, for the 256 possible
values of each channel, by the very same numpy operations in the very same dtypes (a lookup table), and an
image is then one table lookup per pixel. Resizing is Pillow's resize of the same RGB image, computed
only for the pixels the center crop keeps (`imaging.resample`: a C mirror of Pillow's resampler, checked
against Pillow at run time, else Pillow itself); cropping and patchifying move the same values. The
result is bit-identical to the transformers processor
(tests/test_fastprep.py checks that over many sizes, aspect ratios and modes), which is why neither
this path nor a version of it is part of the fingerprint: the stored tensors are the same whichever
path made them, so entries written before it existed stay valid and the two paths share a cache. A
change here that could move a single value must instead add a fact to `models.fingerprint.fingerprint`.

Covered: any `PilBackend` processor that keeps the backend's own resize / center-crop / rescale / normalize
steps (CLIP, SigLIP and the like), and `Qwen2VLImageProcessorPil` (Qwen2-VL, Qwen2.5-VL: smart resize and
patchify). Anything else (a torchvision backend, an overridden step, padding, an unusual size rule, extra
call arguments) gets None from `fast_path_for` and keeps the transformers processor; so does a path that
does not reproduce the processor's tensors on a probe image when it is built (a guard against a
transformers release that changes a step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmprep.imaging.resample import Window, resized_window, value_planes

_PIL_FILTERS = {int(f) for f in Image.Resampling}
# Resolved processor options that do not change a PIL-backend processor's pixels for a PIL input.
_INERT_OPTIONS = frozenset({"device", "return_tensors", "disable_grouping", "image_seq_length"})


class FastPath(ABC):
    """A mirror of one transformers image processor: an RGB-convertible PIL image in, the same tensors out."""

    @abstractmethod
    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The processor's outputs for one image, as `processor(images=image, return_tensors="pt")` gives them."""


def fast_path_for(processor: Any, call_kwargs: dict[str, Any] | None = None) -> FastPath | None:
    """The exact fast path for `processor` called with `call_kwargs`, or None when it is not one this module mirrors."""
    if call_kwargs:
        return None
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # transformers before the backend split: keep its processor
        return None
    if not isinstance(processor, PilBackend):
        return None
    try:
        options = _resolved_options(processor)
    except (AttributeError, KeyError, TypeError, ValueError):  # options that do not resolve the standard way
        return None
    qwen = _qwen2_vl_class()
    path: FastPath | None = None
    if qwen is not None and type(processor) is qwen:
        path = QwenPatchPath.from_options(options)
    elif _keeps_backend_steps(type(processor), PilBackend):
        path = ResizeCropPath.from_options(options)
    return path if path is not None and agrees(processor, path) else None


def agrees(processor: Any, path: FastPath) -> bool:
    """A guard against a transformers release that changes a step: both give the same tensors for a probe image."""
    rng = np.random.default_rng(0)
    probe = Image.fromarray(rng.integers(0, 256, (45, 67, 3), dtype=np.uint8))
    try:
        expected = processor(images=probe, return_tensors="pt")
        got = path(probe)
    except Exception:  # noqa: BLE001 (any failure means: do not take the fast path)
        return False
    return set(got) == set(expected.keys()) and all(
        got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]) for key in got
    )


def _resolved_options(processor: Any) -> dict[str, Any]:
    """The options a call without arguments runs with, resolved by the processor's own code (as `preprocess` does)."""
    names = processor._valid_kwargs_names
    return processor._standardize_kwargs(**{name: getattr(processor, name, None) for name in names})


def _qwen2_vl_class() -> type | None:
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
    except ImportError:
        return None
    return Qwen2VLImageProcessorPil


_BACKEND_STEPS = (
    "preprocess",
    "_standardize_kwargs",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "_prepare_images_structure",
    "process_image",
    "convert_to_rgb",
    "_preprocess",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
)


def _keeps_backend_steps(cls: type, backend: type) -> bool:
    """True when `cls` runs the backend's own steps (a subclass that only sets defaults, like CLIP's)."""
    for name in _BACKEND_STEPS:
        own = getattr(cls, name, None)
        base = getattr(backend, name, None)
        if own is None or base is None or own is not base:
            return False
    return True


def _common_options(options: dict[str, Any], extra: frozenset[str]) -> dict[str, Any] | None:
    """Checks shared by both paths; the options each path reads, or None when one is not mirrored."""
    known = _INERT_OPTIONS | extra | {
        "do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
        "image_mean", "image_std", "do_pad", "pad_size", "data_format", "input_data_format", "size",
        "do_center_crop", "crop_size",
    }  # fmt: skip
    if set(options) - known:
        return None  # an option this module does not know could change the pixels
    if not options.get("do_convert_rgb") or options.get("do_pad"):
        return None
    if options.get("data_format") is not None or options.get("input_data_format") is not None:
        return None
    if not (options.get("do_rescale") or options.get("do_normalize")):
        return None  # uint8 output: rare, left to transformers
    resample = options.get("resample")
    if options.get("do_resize") and (
        resample is None or not isinstance(resample, int) or int(resample) not in _PIL_FILTERS
    ):
        return None
    return options


class ValueTable:
    """uint8 channel value -> float32 after rescale and normalize, computed by transformers' own numpy ops."""

    def __init__(self, options: dict[str, Any]) -> None:
        values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)  # [channel, value], like a CHW image
        if options.get("do_rescale"):
            # transformers.image_transforms.rescale: upcast to float64, multiply, downcast to float32
            values = (values.astype(np.float64) * options["rescale_factor"]).astype(np.float32)
        if options.get("do_normalize"):
            # transformers.image_transforms.normalize, channels first: float32 (x - mean) / std per channel
            if not np.issubdtype(values.dtype, np.floating):
                values = values.astype(np.float32)
            mean = _per_channel(options["image_mean"], values.dtype)
            std = _per_channel(options["image_std"], values.dtype)
            values = ((values.T - mean) / std).T
        self.table = np.ascontiguousarray(values, dtype=np.float32)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> CHW float32, one lookup per value."""
        return value_planes(pixels, self.table)


def _per_channel(value: Any, dtype: np.dtype) -> np.ndarray:
    """mean/std as transformers' normalize builds them: a scalar repeated per channel, else exactly 3 values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {len(values)}")
    return np.array(values, dtype=dtype)


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for a PIL image: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of an RGB image is a copy


class ResizeCropPath(FastPath):
    """`PilBackend._preprocess`: resize (fixed size or shortest edge), center crop, rescale, normalize."""

    def __init__(self, options: dict[str, Any], target: Callable[[int, int], tuple[int, int]] | None) -> None:
        self._target = target  # (height, width) -> resized (height, width); None: no resize
        self._resample = int(options["resample"]) if target is not None else 0
        crop = options.get("crop_size") if options.get("do_center_crop") else None
        self._crop = (int(crop.height), int(crop.width)) if crop is not None else None
        self._values = ValueTable(options)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ResizeCropPath | None:
        if _common_options(options, frozenset()) is None:
            return None
        if options.get("do_center_crop"):
            crop = options.get("crop_size")
            if crop is None or not (crop.height and crop.width):
                return None
        if not options.get("do_resize"):
            return cls(options, None)
        size = options.get("size")
        if size is None:
            return None
        others = [key for key, value in dict(size).items() if value and key not in ("height", "width", "shortest_edge")]
        if others:
            return None
        if size.shortest_edge and not (size.height or size.width):
            return cls(options, _shortest_edge_rule(int(size.shortest_edge)))
        if size.height and size.width and not size.shortest_edge:
            fixed = (int(size.height), int(size.width))
            return cls(options, lambda height, width: fixed)
        return None

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        rgb = to_rgb(image)
        if self._target is None:
            pixels = np.asarray(rgb)
            window = None
        else:
            # transformers.image_transforms.resize: the same Pillow resize (PIL takes (width, height)),
            # computed only inside the crop when the crop fits; center_crop pads when it does not
            height, width = self._target(rgb.height, rgb.width)
            window = self._crop_window(height, width)
            pixels = resized_window(rgb, (width, height), self._resample, window)
        if self._crop is not None and window is None:
            pixels = center_crop(pixels, *self._crop)
        return {"pixel_values": torch.from_numpy(self._values.apply(pixels)[None])}

    def _crop_window(self, height: int, width: int) -> Window | None:
        """center_crop's box inside a height x width image, or None without a crop or when it needs padding."""
        if self._crop is None:
            return None
        crop_height, crop_width = self._crop
        if crop_height > height or crop_width > width:
            return None
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        return (left, top, left + crop_width, top + crop_height)


def _shortest_edge_rule(size: int) -> Callable[[int, int], tuple[int, int]]:
    """transformers' get_resize_output_image_size(size, default_to_square=False): shorter edge to `size`."""

    def target(height: int, width: int) -> tuple[int, int]:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    return target


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers.image_transforms.center_crop on an HWC array, zero padding included when the image is smaller."""
    height, width = pixels.shape[:2]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    if top >= 0 and left >= 0 and top + crop_height <= height and left + crop_width <= width:
        return pixels[top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((new_height, new_width, pixels.shape[2]), dtype=pixels.dtype)
    top_pad = -(-(new_height - height) // 2)  # ceil
    left_pad = -(-(new_width - width) // 2)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top += top_pad
    left += left_pad
    bottom, right = top + crop_height, left + crop_width
    return canvas[max(0, top) : min(new_height, bottom), max(0, left) : min(new_width, right)]


class QwenPatchPath(FastPath):
    """`Qwen2VLImageProcessorPil._preprocess`: smart resize, rescale, normalize, patchify; grid as [1, 3] int64."""

    def __init__(self, options: dict[str, Any]) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize,
        )

        self._smart_resize = smart_resize  # transformers' own function: the same grid, the same errors
        self._resize = bool(options.get("do_resize"))
        self._resample = int(options["resample"]) if self._resize else 0
        size = options["size"]  # do_resize needs it: transformers' processor reads the same two fields
        self._min_pixels = int(size.shortest_edge) if self._resize else 0
        self._max_pixels = int(size.longest_edge) if self._resize else 0
        self._patch = int(options["patch_size"])
        self._merge = int(options["merge_size"])
        self._temporal = int(options["temporal_patch_size"])
        self._values = ValueTable(options)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> QwenPatchPath | None:
        extra = frozenset({"patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"})
        if _common_options(options, extra) is None or options.get("do_center_crop"):
            return None
        if options.get("min_pixels") is not None or options.get("max_pixels") is not None:
            return None
        size = options.get("size")
        if options.get("do_resize") and (size is None or not size.shortest_edge or not size.longest_edge):
            return None
        return cls(options)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        rgb = to_rgb(image)
        if self._resize:
            height, width = self._smart_resize(
                rgb.height, rgb.width, factor=self._patch * self._merge,
                min_pixels=self._min_pixels, max_pixels=self._max_pixels,
            )  # fmt: skip
            pixels = resized_window(rgb, (width, height), self._resample)
        else:
            pixels = np.asarray(rgb)
        chw = self._values.apply(pixels)
        patches, grid_h, grid_w = self._patchify(chw)
        return {
            "pixel_values": torch.from_numpy(patches),
            "image_grid_thw": torch.tensor([[1, grid_h, grid_w]], dtype=torch.int64),
        }

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Qwen2VLImageProcessorPil.patchify: the same reshape, transpose and temporal repeat."""
        channel, height, width = image.shape
        patch, merge, temporal = self._patch, self._merge, self._temporal
        grid_h, grid_w = height // patch, width // patch
        patches = image.reshape(channel, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal, *patches.shape[5:]))
        flat = np.ascontiguousarray(patches.reshape(grid_h * grid_w, channel * temporal * patch * patch))
        return flat, grid_h, grid_w
