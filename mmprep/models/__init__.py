"""Vision encoders: load a model by name and turn preprocessed images into embeddings.

One module per model family; the registry below maps a checkpoint's architecture to its family.
"""

from __future__ import annotations

import logging
from typing import Any

from mmprep.errors import ModelLoadError
from mmprep.models import gemma3, glm4v, internvl, llava, llava_next, pooled, qwen2_vl, qwen3_5, qwen3_vl
from mmprep.models.base import Encoder
from mmprep.models.device import resolve_device, resolve_dtype
from mmprep.models.fingerprint import OUTPUT_FORMAT_VERSION
from mmprep.models.preprocess import ImagePreprocessor
from mmprep.models.source import load_config, load_image_processor, reason_of, resolve_source
from mmprep.models.builtin import BUILTIN_MODELS, NOTE, builtin_model_dir
from mmprep.models.handle import EncoderHandle
from mmprep.settings import ModelSettings

__all__ = [
    "ImagePreprocessor",
    "load_preprocessor",
    "BUILTIN_MODELS",
    "FAMILIES",
    "OUTPUT_FORMAT_VERSION",
    "Encoder",
    "EncoderHandle",
    "open_encoder",
    "builtin_model_dir",
    "load_encoder",
    "supported_architectures",
]

logger = logging.getLogger("mmprep.models")

# architecture (config.architectures[0]) -> encoder class
FAMILIES: dict[str, type[Any]] = {
    **{arch: pooled.PooledEncoder for arch in pooled.ARCHITECTURES},
    **{arch: qwen2_vl.Qwen2VLEncoder for arch in qwen2_vl.ARCHITECTURES},
    **{arch: llava.LlavaEncoder for arch in llava.ARCHITECTURES},
    **{arch: llava_next.LlavaNextEncoder for arch in llava_next.ARCHITECTURES},
    **{arch: gemma3.Gemma3Encoder for arch in gemma3.ARCHITECTURES},
    **{arch: internvl.InternVLEncoder for arch in internvl.ARCHITECTURES},
    **{arch: qwen3_vl.Qwen3VLEncoder for arch in qwen3_vl.ARCHITECTURES},
    **{arch: qwen3_5.Qwen3_5Encoder for arch in qwen3_5.ARCHITECTURES},
    **{arch: glm4v.Glm4vEncoder for arch in glm4v.ARCHITECTURES},
}
# config.model_type -> architecture, for configs saved without `architectures`
_BY_MODEL_TYPE = {
    "clip": "CLIPModel",
    "siglip": "SiglipModel",
    "siglip2": "Siglip2Model",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
    "glm4v_moe": "Glm4vMoeForConditionalGeneration",
}


def supported_architectures() -> list[str]:
    return list(FAMILIES)


def load_preprocessor(settings: ModelSettings) -> ImagePreprocessor:
    """Only the image processor of the model named by `settings`, called as its family's encoder calls it
    (for `mmprep check` and the Ray engine's CPU tasks); no weights are read."""
    source = resolve_source(settings.name, settings.revision)
    image_processor = load_image_processor(source)
    try:
        config = load_config(source)
    except ModelLoadError:  # an image processor without a model config: preprocess as configured
        return ImagePreprocessor(image_processor)
    family = FAMILIES.get(_architecture_of(config))
    return (
        family.preprocessor_for(config, image_processor) if family is not None else ImagePreprocessor(image_processor)
    )


def open_encoder(settings: ModelSettings, decode_options: dict[str, object] | None = None) -> EncoderHandle:
    """The model named by settings.name (hub id + revision, local directory, or builtin:<name>) up to its
    weights: config, image processor and fingerprint, which `EncoderHandle.start` or `.load` complete;
    raise ModelLoadError. `decode_options`: the pixel-changing decode options its images go through."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        source = resolve_source(settings.name, settings.revision)
        if source.builtin:
            logger.warning("%s is a %s: its embeddings are meaningless", settings.name, NOTE)
        config = load_config(source)
        architecture = _architecture_of(config)
        family = FAMILIES.get(architecture)
        if family is None:
            raise ModelLoadError(
                f"{settings.name!r} is a {architecture}, which mmprep does not support; "
                f"supported architectures: {', '.join(FAMILIES)}"
            )
        image_processor = load_image_processor(source)
        return EncoderHandle(family, source, config, image_processor, architecture, device, dtype, decode_options or {})
    except ModelLoadError:
        raise
    except Exception as exc:  # an unreadable config or processor, ...
        raise ModelLoadError(f"cannot load model {settings.name!r}: {reason_of(exc)}") from exc


def load_encoder(settings: ModelSettings, decode_options: dict[str, object] | None = None) -> Encoder:
    """Load the model named by settings.name, weights included, on this thread; raise ModelLoadError."""
    return open_encoder(settings, decode_options).load()


def _architecture_of(config: Any) -> str:
    """The checkpoint's architecture: config.architectures[0], else guessed from model_type."""
    for architecture in getattr(config, "architectures", None) or ():
        if architecture in FAMILIES:
            return architecture
    architectures = getattr(config, "architectures", None) or ()
    if architectures:
        return architectures[0]
    model_type = getattr(config, "model_type", "")
    return _BY_MODEL_TYPE.get(model_type, model_type or "model without architectures or model_type")
