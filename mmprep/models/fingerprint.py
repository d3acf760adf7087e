"""What names a model's outputs: a sha256 over everything that determines the stored tensors.

The config and image processor (without the keys that say where/when they were saved), the dtype, the
weights' identity (a hub commit, or a sampled hash of a directory's weight files), the decode options and
the image processor's call arguments, and OUTPUT_FORMAT_VERSION. A cache never mixes two models' outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from mmprep.errors import ModelLoadError
from mmprep.models.device import dtype_name
from mmprep.models.source import ModelSource

# Bump when the tensors an encoder stores change for the same model (keys, shapes, post-processing),
# so entries written by an older mmprep are not mistaken for current ones.
OUTPUT_FORMAT_VERSION = 1


# Config keys that say where/when/how a model was saved or loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "_experts_implementation",
    }
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SAMPLE_BYTES = 1024 * 1024


def canonical_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that say where/when it was saved; nested sub-configs too."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(config_dict)


def weights_identity(source: ModelSource) -> dict[str, Any]:
    """What names the weights: the hub commit, or for a directory a sampled hash of each weight file.

    The sampled hash covers, per weight file (sorted by name): its name, its size, its safetensors
    header (the JSON with every tensor's name, dtype, shape and offsets) and the sha256 of its first
    and last 1 MiB. Reading whole multi-GB files on every start would cost seconds to minutes; the
    sample still changes with any retraining, re-export, dtype change or truncation, though an edit
    confined to the middle of a file that keeps the size and header would go unnoticed.
    """
    if source.revision is not None:
        return {"hub": source.location, "commit": source.revision}
    files = []
    for path in sorted(Path(source.location).iterdir()):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            files.append(_sampled_file_hash(path))
    if not files:
        raise ModelLoadError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {source.location}")
    return {"files": files}


def _sampled_file_hash(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size - 8)))
            f.seek(0)
        digest.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return {"name": path.name, "size": size, "sha256_sampled": digest.hexdigest()}


def fingerprint(
    *,
    family: str,
    architecture: str,
    config: Any,
    image_processor: Any,
    dtype: torch.dtype,
    weights: dict[str, Any],
    decode: dict[str, object] | None = None,
    image_call: dict[str, Any] | None = None,
) -> str:
    """sha256 of everything that determines the stored tensors, so a cache never mixes two models' outputs.
    `decode`: the pixel-changing decode options in use (`decode.pixel_options`); `image_call`: the arguments
    the image processor is called with (`ImageOptions.call_kwargs`); empty ones leave the hash as is."""
    facts = {
        "output_format": OUTPUT_FORMAT_VERSION,
        "family": family,
        "architecture": architecture,
        "config": canonical_config(config.to_dict()),
        "image_processor_class": type(image_processor).__name__,
        "image_processor": canonical_config(image_processor.to_dict()),
        "dtype": dtype_name(dtype),
        "weights": weights,
    }
    if decode:
        facts["decode"] = decode
    if image_call:
        facts["image_call"] = image_call
    blob = json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
