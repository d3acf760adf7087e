"""The interop tier's tiny Qwen VLMs: directories vLLM's CPU backend serves, weights re-drawn wider.

Qwen2-VL and Qwen3-VL are mmprep's builtins (`builtin:tiny-qwen2-vl`, `builtin:tiny-qwen3-vl`); Qwen2.5-VL
and Qwen3.5 are built here the same way: the builtins' byte-level tokenizer and chat template, text heads
of 32 (vLLM's CPU attention), two text layers. Weights are re-drawn with a larger std than transformers'
default init, so that an image's embedding moves the output visibly (with the default 0.02 a wrong
embedding barely changes a logprob).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmprep.models.builtin import (
    VOCAB_SIZE,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
    redraw_weights,
    save_tokenizer,
    vision_token_ids,
)

WEIGHT_STD = 0.15
# 2 text layers of 2 heads of 32 (1 KV head), hidden 64: the builtins' text side.
_TEXT = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=2048,
)  # fmt: skip
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}


def save_tiny_qwen2_vl(directory: Path, seed: int = 0) -> Path:
    """The builtin Qwen2-VL's architecture, tokenizer and template in `directory`, weights drawn with WEIGHT_STD."""
    return build_tiny_qwen2_vl(directory, seed=seed, weight_std=WEIGHT_STD)


def save_tiny_qwen3_vl(directory: Path, seed: int = 0) -> Path:
    """The builtin Qwen3-VL (deepstack levels after vision blocks 0 and 1), weights drawn with WEIGHT_STD."""
    return build_tiny_qwen3_vl(directory, seed=seed, weight_std=WEIGHT_STD)


def save_tiny_qwen2_5_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: a 2-block tower with windowed attention in block 0 and full attention in block 1 (14-pixel
    patches, output 64), 4..64 merged tokens per image; the builtins' text side, tokenizer and template."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(directory)
    text = dict(
        _TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, **vision_token_ids(ids), tie_word_embeddings=False
    )
    _save(Qwen2_5_VLForConditionalGeneration, config, seed, directory)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(directory)
    return directory


def save_tiny_qwen3_5(directory: Path, seed: int = 0) -> Path:
    """Qwen3.5: a 2-block tower (16-pixel patches, output 64, no deepstack), a hybrid text side (a gated
    delta-net linear-attention layer, then a full-attention layer), 4..64 merged tokens per image."""

    from transformers import Qwen2VLImageProcessor, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(directory)
    text = dict(
        _TEXT, head_dim=32, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=1,
        rope_parameters={**_MROPE, "partial_rotary_factor": 1.0, "mrope_interleaved": True},
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
    )  # fmt: skip
    config = Qwen3_5Config(text_config=text, vision_config=vision, **vision_token_ids(ids), tie_word_embeddings=False)
    _save(Qwen3_5ForConditionalGeneration, config, seed, directory)
    Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(directory)  # fmt: skip
    return directory


def _save(model_class: type, config: object, seed: int, directory: Path) -> None:
    """`model_class(config)` drawn from `seed`, weights re-drawn with WEIGHT_STD, saved in `directory`."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    redraw_weights(model, WEIGHT_STD)
    model.save_pretrained(directory)
