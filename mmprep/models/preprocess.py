"""A model's image processor as its family calls it: per image, from many threads, via the exact fast path when one exists."""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from mmprep.errors import ErrorKind, RowError
from mmprep.imaging.fastprep import fast_path_for


def processor_input_size(processor: Any) -> tuple[int, int] | None:
    """The (W, H) a processor resizes every image to; None when it depends on the image (dynamic resolution)."""
    size = getattr(processor, "size", None)
    if size is None or not getattr(processor, "do_resize", True):
        return None
    get = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
    height, width, shortest, longest = get("height"), get("width"), get("shortest_edge"), get("longest_edge")
    if height and width:
        return int(width), int(height)
    if shortest and not longest:
        return int(shortest), int(shortest)
    return None  # longest_edge / pixel budgets (Qwen2-VL) / patch budgets (SigLIP 2 NaFlex)


def processor_image_defaults(config: Any) -> dict[str, Any]:
    """The image-processor arguments the model's full transformers processor passes on every call, e.g.
    InternVLProcessor's crop_to_patches=True: its class-level `images_kwargs` (transformers >= 5.2x) and
    the `_defaults["images_kwargs"]` of its `<Processor>Kwargs` (earlier versions). They override the image
    processor's own config (preprocessor_config.json) in `ProcessorMixin._merge_kwargs`, so an encoder that
    calls the image processor alone must pass them to see the pixels serving (transformers, vLLM) sees."""
    import importlib

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    processor_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if processor_class is None:
        return {}
    defaults = dict(getattr(processor_class, "images_kwargs", None) or {})
    with warnings.catch_warnings():  # newer transformers keep `<Processor>Kwargs` as a deprecated alias
        warnings.simplefilter("ignore", FutureWarning)
        kwargs_class = getattr(
            importlib.import_module(processor_class.__module__), f"{processor_class.__name__}Kwargs", None
        )
    defaults.update(
        (getattr(kwargs_class, "_defaults", None) or {}).get("images_kwargs", {})
    )  # applied after, as there
    defaults.pop("return_tensors", None)  # we ask for "pt" ourselves
    return defaults


@dataclass(frozen=True)
class ImageOptions:
    """How a family calls its image processor: extra arguments, and whether every image ends up one fixed size."""

    call_kwargs: dict[str, Any] = field(default_factory=dict)  # part of the fingerprint
    fixed_size: bool = True  # False: tiles / crops / grids follow the image, so --fast-decode has no target size
    record_size: bool = False  # add "image_sizes" [[height, width]] (what a tiling family's token count follows)


class ImagePreprocessor:
    """A model's image processor applied to one image at a time, safely from many threads."""

    def __init__(
        self,
        processor: Any,
        select: Callable[[Any], Sequence[str]] | None = None,
        options: ImageOptions | None = None,
        *,
        fast: bool = True,
    ) -> None:
        self._processor = processor
        self._select = select
        self._options = options or ImageOptions()
        self._local = threading.local()
        # The exact fast path when one mirrors this processor (bit-identical outputs, so the fingerprint,
        # which names the processor's class and config, stays as it is); else the processor itself.
        self._fast = fast_path_for(processor, self._options.call_kwargs) if fast else None

    @property
    def fast_path(self) -> str | None:
        """The name of the exact fast path in use, or None when the transformers processor runs."""
        return type(self._fast).__name__ if self._fast is not None else None

    def input_size(self) -> tuple[int, int] | None:
        """The (W, H) every image is resized to, for --fast-decode; None for dynamic resolution."""
        return processor_input_size(self._processor) if self._options.fixed_size else None

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        try:
            batch = dict(self._fast(image) if self._fast is not None else self._transformers(image))
            if self._options.record_size and "image_sizes" not in batch:
                batch["image_sizes"] = torch.tensor([[image.height, image.width]], dtype=torch.int64)
            names = self._select(batch) if self._select is not None else list(batch.keys())
            return {key: batch[key] for key in names}
        except Exception as exc:
            raise RowError(ErrorKind.PREPROCESS_ERROR, f"{type(exc).__name__}: {exc}") from exc

    def _transformers(self, image: Image.Image) -> Any:
        processor = getattr(self._local, "processor", None)
        if processor is None:  # each thread gets its own copy: processors are not documented thread-safe
            processor = self._local.processor = copy.deepcopy(self._processor)
        return processor(images=image, return_tensors="pt", **self._options.call_kwargs)
