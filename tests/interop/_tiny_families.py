"""The interop tier's tiny non-Qwen VLMs (LLaVA, LLaVA-NeXT, Gemma 3): model directories vLLM's CPU backend
serves, for the connector proof (test_vllm_connector_image_url.py).

Each is a real transformers checkpoint with random weights re-drawn wider than the default init (so that a
wrong image embedding moves the logprobs), two text layers (a one-layer pre-norm model cannot see an
embedding scaled by a constant), text heads of 32 (vLLM's CPU attention), and mmprep's builtin byte-level
tokenizer with its chat template: the image placeholder the template writes is `<|image_pad|>`, which each
config names as its image token (Gemma 3: `<start_of_image>`, which vLLM expands to its soft tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmprep.models.builtin import CHAT_TEMPLATE, VOCAB_SIZE, save_tokenizer

WEIGHT_STD = 0.15
IMAGE_TOKEN = "<|image_pad|>"


def _redraw(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight matrix N(0, WEIGHT_STD), biases N(0, WEIGHT_STD / 3); norms stay at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=g) * WEIGHT_STD)
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=g) * WEIGHT_STD / 3)
    return model


def _hub_layout(directory: Path, renames: dict[str, str]) -> None:
    """Rename checkpoint keys by prefix to the hub layout vLLM 0.32 loads: transformers >= 5.2x saves its own
    module tree (e.g. a CLIP tower without `vision_model`), and reads the hub layout back itself."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in renames.items():
            if name.startswith(old) and not name.startswith(new):
                name = new + name[len(old) :]
                break
        renamed[name] = tensor
    save_file(renamed, str(path), metadata={"format": "pt"})


def _text(ids: dict[str, int], **extra: Any) -> dict[str, Any]:
    """A 2-layer text side, hidden 64 in 2 heads of 32 (1 KV head)."""
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **extra,
    )  # fmt: skip


def _processor_config(directory: Path, **fields: Any) -> None:
    """processor_config.json: what the family's transformers processor needs beyond the tokenizer."""
    (directory / "processor_config.json").write_text(json.dumps(fields, indent=1))


def save_tiny_llava(directory: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 style: a 2-layer CLIP tower (56 px, 14 px patches: 16 tokens per image, "default" strategy,
    layer -2), a 2-layer MLP projector, a Llama text side."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(directory)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", **_text(ids)),
        image_token_index=ids[IMAGE_TOKEN], vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    _redraw(LlavaForConditionalGeneration(config).eval(), seed).save_pretrained(directory)
    _hub_layout(directory, {"vision_tower.": "vision_tower.vision_model."})
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(directory)
    _processor_config(
        directory, processor_class="LlavaProcessor", image_token=IMAGE_TOKEN, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return directory


LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def save_tiny_llava_next(directory: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: the LLaVA tower (16 tokens per 56 px tile), anyres grids of up to 3 tiles, image_newline;
    each image's token count depends on its size and aspect."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(directory)
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", **_text(ids)),
        image_token_index=ids[IMAGE_TOKEN], image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _redraw(model, seed)
    with torch.no_grad():  # a 1-D parameter _redraw leaves alone; zeros would hide a wrong newline row
        model.model.image_newline.copy_(torch.randn(64, generator=torch.Generator().manual_seed(seed)) * WEIGHT_STD)
    model.save_pretrained(directory)
    _hub_layout(directory, {"vision_tower.": "vision_tower.vision_model."})
    LlavaNextImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    ).save_pretrained(directory)
    _processor_config(
        directory, processor_class="LlavaNextProcessor", image_token=IMAGE_TOKEN, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return directory


GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# mmprep's builtin template, with Gemma 3's image placeholder: vLLM (gemma3_mm.py) replaces each
# <start_of_image> with the image's full sequence ("\n\n<start_of_image>", its soft tokens, "<end_of_image>\n\n").
GEMMA3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", GEMMA3_TOKENS["boi_token"])
GEMMA3_PAN_AND_SCAN = dict(
    do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=3,
    pan_and_scan_min_ratio_to_activate=1.2,
)  # fmt: skip


def _save_gemma3_tokenizer(directory: Path) -> dict[str, int]:
    """mmprep's builtin byte-level tokenizer plus Gemma 3's three image tokens, which Gemma3Processor reads
    as the tokenizer's boi_token / eoi_token / image_token, and runs of 1 to 4 newlines as single tokens, as in
    Gemma's vocabulary (gemma3_mm.py merges the "\n\n" around each image with its neighbours by those ids);
    the special tokens' ids."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    save_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, extra_special_tokens=dict(GEMMA3_TOKENS))
    tokenizer.add_tokens([AddedToken("\n" * n, normalized=False, special=False) for n in range(1, 5)])
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    newlines = tokenizer.convert_tokens_to_ids(["\n" * n for n in range(1, 5)])
    assert all(0 <= i < VOCAB_SIZE for i in [*ids.values(), *newlines]), (ids, newlines)
    return ids


def save_tiny_gemma3(directory: Path, seed: int = 0) -> Path:
    """Gemma 3: a 2-layer SigLIP tower (32 px, 8 px patches), the projector's 2x2 average pool and norm (4 soft
    tokens per view), a 2-layer Gemma 3 text side (one sliding, one full attention layer); pan-and-scan crops
    of at least 16 px, at most 3 (`GEMMA3_PAN_AND_SCAN`: vLLM needs them as mm_processor_kwargs)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    ids = _save_gemma3_tokenizer(directory)
    config = Gemma3Config(
        text_config=dict(model_type="gemma3_text", **_text(ids), sliding_window=64,
                         layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=ids[GEMMA3_TOKENS["boi_token"]],
        eoi_token_index=ids[GEMMA3_TOKENS["eoi_token"]], image_token_index=ids[GEMMA3_TOKENS["image_token"]],
        tie_word_embeddings=False,  # tied (Gemma's default), the tiny model's logprobs barely see the image
    )  # fmt: skip
    torch.manual_seed(seed)
    _redraw(Gemma3ForConditionalGeneration(config).eval(), seed).save_pretrained(directory)
    _hub_layout(directory, {"vision_tower.": "vision_tower.vision_model."})
    Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **GEMMA3_PAN_AND_SCAN).save_pretrained(directory)
    _processor_config(directory, processor_class="Gemma3Processor", image_seq_length=4)
    return directory
