"""VLM checkpoints whose language model dominates (large vocab and hidden size), for the vision-only loading figures."""

from __future__ import annotations

from pathlib import Path


def _text(quick: bool) -> dict[str, object]:
    """A text model of ~0.2 B parameters (quick: ~10 M) with a small vision tower beside it."""
    vocab, hidden = (8_000, 256) if quick else (64_000, 1024)
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)  # fmt: skip


def save_big_llava(directory: Path, *, quick: bool = False) -> Path:
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, image_size=224, patch_size=32)  # fmt: skip
    text = dict(_text(quick), model_type="llama")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=int(text["vocab_size"]) - 1)  # type: ignore[arg-type]
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    LlavaForConditionalGeneration(config).save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def save_big_qwen2_vl(directory: Path, *, quick: bool = False) -> Path:
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    text = _text(quick)
    head_dim = int(text["hidden_size"]) // int(text["num_attention_heads"])  # type: ignore[call-overload]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]}
    vocab = int(text["vocab_size"])  # type: ignore[call-overload]
    tokens = dict(
        image_token_id=vocab - 1,
        video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4,
    )
    vision = dict(depth=4, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, embed_dim=256,
                  hidden_size=int(text["hidden_size"]), mlp_ratio=2)  # type: ignore[call-overload]  # fmt: skip
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)).save_pretrained(
        tmp
    )
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 256).save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def save_big_qwen3_vl(directory: Path, *, quick: bool = False) -> Path:
    """Qwen3-VL-shaped, saved in bfloat16 as Qwen3-VL checkpoints are: a 4-block tower with two deepstack levels."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = _text(quick)
    head_dim = int(text["hidden_size"]) // int(text["num_attention_heads"])  # type: ignore[call-overload]
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                                    "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]})  # fmt: skip
    vocab = int(text["vocab_size"])  # type: ignore[call-overload]
    tokens = dict(
        image_token_id=vocab - 1,
        video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4,
    )
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=int(text["hidden_size"]), num_position_embeddings=256,  # type: ignore[call-overload]
                  deepstack_visual_indexes=[1, 2])  # fmt: skip
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **tokens))
    model.to(torch.bfloat16).save_pretrained(tmp)
    Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 256
    ).save_pretrained(tmp)
    tmp.rename(directory)
    return directory
