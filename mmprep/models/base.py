"""The Encoder every model family implements, and the helpers its forward uses.

Each family module (pooled, qwen2_vl, llava, ...) only says how to load its modules and how to run one
batched forward; the name (`source`), the device and dtype (`device`), the image processor
(`preprocess`) and the fingerprint (`fingerprint`) are resolved once, in their own modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from mmprep.models.device import dtype_name
from mmprep.models.fingerprint import OUTPUT_FORMAT_VERSION, fingerprint, weights_identity
from mmprep.models.preprocess import ImageOptions, ImagePreprocessor
from mmprep.models.source import ModelSource


def output_of(result: Any) -> Any:
    """The features from a get_image_features-like call: a tensor (older transformers) or `.pooler_output`."""
    if isinstance(result, torch.Tensor):
        return result
    pooled = getattr(result, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find image features in a {type(result).__name__}")
    return pooled


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its storage (a view of a batch would pin the whole batch in memory)."""
    return tensor.to("cpu").clone(memory_format=torch.contiguous_format)


class Encoder(ABC):
    """A loaded vision model: per-image preprocessing on worker threads, batched encoding on the model thread."""

    family: ClassVar[str]

    def __init__(
        self,
        *,
        source: ModelSource,
        config: Any,
        image_processor: Any,
        architecture: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name = source.name
        self.source = source
        self.config = config
        self.architecture = architecture
        self.device = device
        self.dtype = dtype
        self._image_processor = image_processor
        self.image_options = self.image_options_for(config, image_processor)
        self._preprocessor = self.preprocessor_for(config, image_processor)
        self._weights = weights_identity(source)
        self.set_decode_options({})

    def set_decode_options(self, options: dict[str, object]) -> None:
        """Declare the pixel-changing decode options (`decode.pixel_options`) this encoder's images go
        through: they change the embeddings, so they are part of the fingerprint."""
        self.decode_options = dict(options)
        self.fingerprint, self.base_fingerprint = self.fingerprints_for(
            self.architecture, self.config, self._image_processor, self.dtype, self._weights, self.decode_options
        )

    @classmethod
    def fingerprints_for(
        cls, architecture: str, config: Any, image_processor: Any, dtype: torch.dtype, weights: dict[str, Any],
        decode_options: dict[str, object],
    ) -> tuple[str, str]:  # fmt: skip
        """(fingerprint, base fingerprint) of this family's encoder: known before its weights load (the
        base one is the same model decoded without options, the `pil` profile: what ties decode variants together)."""
        facts = dict(
            family=cls.family,
            architecture=architecture,
            config=config,
            image_processor=image_processor,
            dtype=dtype,
            weights=weights,
            image_call=cls.image_options_for(config, image_processor).call_kwargs,
        )
        return fingerprint(**facts, decode=decode_options), fingerprint(**facts)

    @classmethod
    def preprocessor_for(cls, config: Any, image_processor: Any) -> ImagePreprocessor:
        """The image processor as this family calls it, keeping the inputs its forward takes (no weights needed)."""
        return ImagePreprocessor(image_processor, cls.input_names, cls.image_options_for(config, image_processor))

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        """How this family calls its image processor (default: as configured, fixed size if it has one)."""
        return ImageOptions()

    @classmethod
    def assemble(
        cls, source: ModelSource, config: Any, image_processor: Any, architecture: str, device: torch.device,
        dtype: torch.dtype, **modules: Any,
    ) -> Any:  # fmt: skip
        """This family's encoder around its loaded `modules` (the plumbing every family's `load` shares)."""
        return cls(source=source, config=config, image_processor=image_processor, architecture=architecture,
                   device=device, dtype=dtype, **modules)  # fmt: skip

    # -- worker threads --------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Run the model's image processor on one RGB image (CPU, thread-safe; called from decode worker threads)."""
        return self._preprocessor(image)

    @classmethod
    def input_names(cls, processed: Any) -> Sequence[str]:
        """Which of the processor's outputs the forward needs (default: all of them)."""
        return list(processed.keys())

    def input_size(self) -> tuple[int, int] | None:
        """The (W, H) the processor resizes every image to (bounds --fast-decode); None for dynamic resolution."""
        return self._preprocessor.input_size()

    # -- model thread ----------------------------------------------------------------------------

    @abstractmethod
    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One batched forward under torch.inference_mode(); per image {"embeddings": T, ...} as owned CPU tensors."""

    def to_device(self, tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Concatenate per-image tensors on dim 0 and move them to the model's device (pinned, non-blocking on CUDA)."""
        if self.device.type == "cuda":
            shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
            staged = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
            torch.cat(tensors, out=staged)
            batch = staged.to(self.device, non_blocking=True)
        else:
            batch = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch

    # -- facts -----------------------------------------------------------------------------------

    @abstractmethod
    def output_shape(self) -> list[int | str]:
        """The per-image "embeddings" shape, symbolic where it depends on the image (e.g. ["n_tokens", 3584])."""

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        """The tensors stored per image besides "embeddings": name -> {"shape": symbolic, "dtype": name}."""
        return {}

    def describe(self) -> dict[str, object]:
        """JSON-able facts for the index's models table."""
        facts: dict[str, object] = {
            "name": self.name,
            "family": self.family,
            "architecture": self.architecture,
            "revision": self.source.revision,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "output": {
                "embeddings": {"shape": self.output_shape(), "dtype": dtype_name(self.dtype)},
                **self.extra_outputs(),
            },
            "image_processor": type(self._image_processor).__name__,
            "output_format": OUTPUT_FORMAT_VERSION,
        }
        if self.decode_options:
            facts["decode"] = self.decode_options
            facts["base_fingerprint"] = self.base_fingerprint
        if self.source.builtin:
            facts["note"] = "smoke-test model with random weights"
        return facts
