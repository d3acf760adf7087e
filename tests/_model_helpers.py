"""Tiny real transformers models with fixed random weights, saved like hub checkpoints, for model tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

TINY_TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def save_clip(directory: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config=TINY_TEXT, vision_config=dict(TINY_VIT, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def save_siglip(directory: Path, seed: int = 0) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    config = SiglipConfig(text_config=TINY_TEXT, vision_config=dict(TINY_VIT, image_size=32, patch_size=8))
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def save_siglip2(directory: Path, seed: int = 0) -> Path:
    """SigLIP 2 NaFlex: variable patch grids padded to 16 patches, with attention mask and spatial shapes."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    config = Siglip2Config(text_config=TINY_TEXT, vision_config=dict(TINY_VIT, patch_size=8, num_patches=16))
    torch.manual_seed(seed)
    Siglip2Model(config).save_pretrained(directory)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(directory)
    return directory


def save_qwen2_vl(directory: Path, seed: int = 0, *, v2_5: bool = False) -> Path:
    """Qwen2-VL (or Qwen2.5-VL with windowed attention) with a 2-block tower; 4..64 merged tokens per image."""
    from transformers import Qwen2VLImageProcessor

    text = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )
    tokens = dict(image_token_id=127, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124)
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if v2_5:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    torch.manual_seed(seed)
    Model(Config(text_config=text, vision_config=vision, **tokens)).save_pretrained(directory)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(directory)
    return directory


def save_llava(directory: Path, seed: int = 0, *, feature_layer: int = -2, strategy: str = "default") -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(TINY_VIT, model_type="clip_vision_model", image_size=32, patch_size=8),
        text_config=dict(
            model_type="llama", vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        image_token_index=99,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def save_bert(directory: Path) -> Path:
    """A real model of an architecture mmprep does not encode images with."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(directory)
    return directory


def pattern_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A deterministic non-uniform RGB image of `size` (width, height)."""
    base = Image.linear_gradient("L").resize(size).rotate(seed * 41 % 360)
    return Image.merge(
        "RGB", (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.point(lambda v: (v * 5 + seed * 29) % 256))
    )


def features_of(result: object) -> object:
    """get_image_features' result: a tensor (older transformers) or its `.pooler_output` (v5)."""
    return result if isinstance(result, torch.Tensor) else result.pooler_output  # type: ignore[attr-defined]
