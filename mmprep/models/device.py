"""Where and in which precision a model runs: `--device` and `--dtype` resolved once, before any work."""

from __future__ import annotations

import re

import torch

from mmprep.errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda'/'cuda:N' must exist, so a typo fails before any work."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", spec):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {spec!r} requested but CUDA is not available (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise ModelLoadError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU, bfloat16 on CUDA where supported, else float16."""
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise ModelLoadError(f"unknown dtype {spec!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
