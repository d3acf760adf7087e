"""The interop tier's tiny Qwen2-VL: mmprep's `builtin:tiny-qwen2-vl` architecture, weights re-drawn wider.

The builtin is already a directory vLLM's CPU backend serves (tokenizer, chat template, text heads of
32); its weights are re-drawn here with a larger std than transformers' default init, so that an
image's embedding moves the output visibly (with the default 0.02 a wrong embedding barely changes a
logprob).
"""

from __future__ import annotations

from pathlib import Path

from mmprep.models.builtin import build_tiny_qwen2_vl

WEIGHT_STD = 0.15


def save_tiny_qwen2_vl(directory: Path, seed: int = 0) -> Path:
    """The builtin Qwen2-VL's architecture, tokenizer and template in `directory`, weights drawn with WEIGHT_STD."""
    return build_tiny_qwen2_vl(directory, seed=seed, weight_std=WEIGHT_STD)
