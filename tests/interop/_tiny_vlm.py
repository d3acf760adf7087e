"""A tiny random Qwen2-VL that both transformers (mmprep) and vLLM's CPU backend load: weights, tokenizer, template.

vLLM's CPU attention wants head sizes of 32 or 64 (text: hidden 64 / 2 heads); weights are re-drawn
with a larger std than transformers' default init, so that an image's embedding moves the output
visibly (with the default 0.02 a wrong embedding barely changes a logprob).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
VOCAB_SIZE = 272  # 256 byte tokens + the special tokens, rounded up
WEIGHT_STD = 0.15

# Qwen2-VL's own chat template, reduced to text and images (what vLLM's chat path renders for LLM.chat).
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


def save_tokenizer(directory: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer without merges (every byte one token) plus Qwen's special tokens; their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert max(ids.values()) < VOCAB_SIZE, ids
    return ids


def save_tiny_qwen2_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen2-VL: text hidden 64 (2 heads of 32, 1 KV head), 2 layers; a 2-block vision tower; 4..64 tokens per image.

    Two text layers, not one: with pre-norm decoder layers, a one-layer model cannot see an image
    embedding scaled by a constant (the layer normalises it; later positions read only K and V of
    the normalised input), so a scaled entry would pass every comparison.
    """
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
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:  # linear and embedding weights; norms stay at 1
                param.normal_(0.0, WEIGHT_STD)
            elif name.endswith(".bias"):
                param.normal_(0.0, WEIGHT_STD / 3)
    model.save_pretrained(directory)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(directory)
    return directory
