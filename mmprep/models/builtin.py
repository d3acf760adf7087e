"""Builtin smoke-test models: tiny real architectures with random weights, for offline runs and tests.

`builtin:tiny-clip`, `builtin:tiny-qwen2-vl` and `builtin:tiny-qwen3-vl` are created on first use under
`$MMPREP_HOME/builtin/<name>` (MMPREP_HOME defaults to ~/.cache/mmprep; `mmprep models path NAME` prints
the directory) with save_pretrained, then loaded back like any local model directory. Their embeddings
are meaningless: they exist to exercise the whole pipeline without downloading weights. The two VLMs
are complete model directories a stock vLLM serves (a byte-level tokenizer built offline, a chat
template, text heads of 32 for vLLM's CPU attention), so the serving walkthrough runs offline too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmprep.errors import ModelLoadError
from mmprep.models.compat import transformers_errors_only
from mmprep.settings import BUILTIN_MODELS

SEED = 0
MARKER = "mmprep-builtin.json"  # written into each builtin model directory
NOTE = "smoke-test model with random weights"
# Bump when a builder writes a different directory: an older one (its marker names another version) is rebuilt.
# 2: the VLMs gained a tokenizer and a chat template, and vLLM-sized text heads.
BUILD_VERSION = 2

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
VOCAB_SIZE = 272  # 256 byte tokens + the special tokens, rounded up
# Qwen2-VL's own chat template, reduced to text and images (what vLLM's chat path renders).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def mmprep_home() -> Path:
    """mmprep's per-user data folder: $MMPREP_HOME, else ~/.cache/mmprep."""
    return Path(os.environ.get("MMPREP_HOME") or "~/.cache/mmprep").expanduser()


def builtin_model_dir(name: str) -> Path:
    """The directory of builtin model `name`, created (atomically, race-free) if it does not exist yet."""
    build = BUILDERS.get(name)
    if build is None:
        raise ModelLoadError(f"unknown builtin model {name!r}; builtins: {', '.join(BUILTIN_MODELS)}")
    target = mmprep_home() / "builtin" / name
    if _current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        with transformers_errors_only():  # e.g. "falling back to the PIL backend" while constructing the processor
            build(staging)
        marker = {"name": f"builtin:{name}", "note": NOTE, "seed": SEED, "version": BUILD_VERSION}
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
        if target.is_dir() and not _current(target):  # built by an older mmprep: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale.", dir=target.parent))
            try:
                os.rename(target, stale / name)
            except OSError:
                pass  # a concurrent first use moved it already
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, target)  # atomic; fails if a concurrent first use already renamed its copy
        except OSError:
            if not _current(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _current(directory: Path) -> bool:
    """Whether `directory` is a complete builtin model written by this version's builder."""
    try:
        return json.loads((directory / MARKER).read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def save_tokenizer(directory: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer without merges (every byte one token) plus Qwen's special tokens and the
    chat template, built offline; the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tok.token_to_id(token)
        if token_id is None or token_id >= VOCAB_SIZE:
            raise AssertionError(f"special token {token} has id {token_id}, outside the vocabulary of {VOCAB_SIZE}")
        ids[token] = token_id
    return ids


def vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The config's image/video/vision-boundary token ids from the tokenizer's special tokens."""
    return dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip


def redraw_weights(model: Any, std: float) -> None:
    """Re-draw linear and embedding weights with `std` (biases with std/3; norms stay at 1)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
            elif name.endswith(".bias"):
                param.normal_(0.0, std / 3)


def _build_tiny_clip(directory: Path) -> None:
    """CLIP with 32x32 images, 8-pixel patches, hidden 32, 2 vision layers, 16-dim projection."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    CLIPModel(config).eval().save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)


def build_tiny_qwen2_vl(directory: Path, seed: int = SEED, weight_std: float | None = None) -> Path:
    """Qwen2-VL with a 2-block vision tower (embed 32, output 64), a 2-layer text side (hidden 64: 2 heads
    of 32, 1 KV head), 4..64 merged tokens per image; tokenizer and chat template. `weight_std`: re-draw
    the weights wider (the interop tests, so that a wrong image embedding visibly moves the output).

    Two text layers, not one: with pre-norm decoder layers, a one-layer model cannot see an image
    embedding scaled by a constant (the layer normalises it), so a scaled entry would pass a comparison.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(directory)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        **vision_token_ids(ids), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    if weight_std is not None:
        redraw_weights(model, weight_std)
    model.save_pretrained(directory)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(directory)
    return directory


def build_tiny_qwen3_vl(directory: Path, seed: int = SEED, weight_std: float | None = None) -> Path:
    """Qwen3-VL with a 3-block vision tower (16-pixel patches, output 64) and deepstack levels after
    blocks 0 and 1, a 2-layer text side (2 heads of 32, 1 KV head), 4..64 merged tokens per image;
    tokenizer and chat template. `weight_std`: as for `build_tiny_qwen2_vl`."""
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(directory)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=2048,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        **vision_token_ids(ids),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if weight_std is not None:
        redraw_weights(model, weight_std)
    model.save_pretrained(directory)
    Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=32 * 32 * 4,
        max_pixels=32 * 32 * 64,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(directory)
    return directory


# Named in settings.BUILTIN_MODELS too (so that --help lists them without importing torch); a test keeps both equal.
BUILDERS: dict[str, Callable[[Path], object]] = {
    "tiny-clip": _build_tiny_clip,
    "tiny-qwen2-vl": build_tiny_qwen2_vl,
    "tiny-qwen3-vl": build_tiny_qwen3_vl,
}
