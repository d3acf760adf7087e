"""Tiny real transformers models with fixed random weights, saved like hub checkpoints, for model tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

TINY_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def save_clip(directory: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=TINY_TEXT, vision_config=dict(TINY_VIT, image_size=32, patch_size=8), projection_dim=16
    )
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
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )
    tokens = dict(image_token_id=127, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124)
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if v2_5:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]
        )
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    torch.manual_seed(seed)
    Model(Config(text_config=text, vision_config=vision, **tokens)).save_pretrained(directory)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(directory)
    return directory


# Shared by the Qwen3-VL / Qwen3.5 / GLM-4.1V checkpoints: a 2-layer mrope text side (head_dim 16).
_GRID_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)
GRID_TOKENS = dict(image_token_id=127, video_token_id=126)  # + start/end ids per family below


def redraw(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every weight matrix with a larger std: default init of tiny configs leaves outputs near zero
    (and some projections at exactly zero), which would let comparisons pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_tokens" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_qwen3_vl(directory: Path, seed: int = 0, *, moe: bool = False, deepstack: tuple[int, ...] = (0, 1)) -> Path:
    """Qwen3-VL (or its MoE variant) with a 3-block tower (16-pixel patches) and deepstack levels at `deepstack`."""
    from transformers import Qwen2VLImageProcessor

    text = dict(
        _GRID_TEXT,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    if moe:
        from transformers import Qwen3VLMoeConfig as Config
        from transformers import Qwen3VLMoeForConditionalGeneration as Model

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=list(deepstack))  # fmt: skip
    config = Config(
        text_config=text, vision_config=vision, vision_start_token_id=125, vision_end_token_id=124, **GRID_TOKENS
    )
    torch.manual_seed(seed)
    redraw(Model(config), seed).eval().save_pretrained(directory)
    Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)  # fmt: skip
    return directory


def save_qwen3_5(directory: Path, seed: int = 0) -> Path:
    """Qwen3.5 with a 2-block tower and a hybrid text side (one linear-attention, one full-attention layer)."""
    from transformers import Qwen2VLImageProcessor, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(
        _GRID_TEXT, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    )  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)  # fmt: skip
    config = Qwen3_5Config(
        text_config=text, vision_config=vision, vision_start_token_id=125, vision_end_token_id=124, **GRID_TOKENS
    )
    torch.manual_seed(seed)
    redraw(Qwen3_5ForConditionalGeneration(config), seed).eval().save_pretrained(directory)
    Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)  # fmt: skip
    return directory


def save_glm4v(directory: Path, seed: int = 0) -> Path:
    """GLM-4.1V with a 2-block tower (14-pixel patches, image_size 56) and a 2-layer text side."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    text = dict(
        _GRID_TEXT,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 2],
        },
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14, image_size=56,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    config = Glm4vConfig(text_config=text, vision_config=vision, image_start_token_id=125, image_end_token_id=124,
                         video_start_token_id=123, video_end_token_id=122, **GRID_TOKENS)  # fmt: skip
    torch.manual_seed(seed)
    redraw(Glm4vForConditionalGeneration(config), seed).eval().save_pretrained(directory)
    Glm4vImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}, patch_size=14, merge_size=2,
                           temporal_patch_size=2).save_pretrained(directory)  # fmt: skip
    return directory


def save_llava(directory: Path, seed: int = 0, *, feature_layer: int = -2, strategy: str = "default") -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(TINY_VIT, model_type="clip_vision_model", image_size=32, patch_size=8),
        text_config=dict(
            model_type="llama",
            vocab_size=100,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=99,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


# Language model of the tiny VLMs below: small, but with real attention and an LM head, for logits tests.
TINY_LM = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
IMAGE_TOKEN = 127  # the image placeholder id of the tiny VLMs


def redraw_vision_weights(model: torch.nn.Module, std: float = 0.2) -> None:
    """Add N(0, std) noise to every vision-tower / projector / image_newline weight: default init leaves
    some projectors at zero (Gemma 3), which would make every image's tokens equal."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("vision_tower", "multi_modal_projector", "image_newline")):
                param.add_(torch.randn_like(param) * std)


def save_gemma3(directory: Path, seed: int = 0, *, pan_and_scan: bool = True) -> Path:
    """Gemma 3 with a 32 px SigLIP tower and 4 soft tokens per view; pan-and-scan crops (min 16 px, at
    most 3) when `pan_and_scan`, else the hub default (pan-and-scan settings null)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    config = Gemma3Config(
        text_config=dict(TINY_LM, model_type="gemma3_text", sliding_window=64),
        vision_config=dict(TINY_TOWER, model_type="siglip_vision_model", image_size=32, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126, image_token_index=IMAGE_TOKEN,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    redraw_vision_weights(model)
    model.save_pretrained(directory)
    crops = dict(
        do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=3,
        pan_and_scan_min_ratio_to_activate=1.2,
    ) if pan_and_scan else {}  # fmt: skip
    Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **crops).save_pretrained(directory)
    return directory


def save_internvl(directory: Path, seed: int = 0) -> Path:
    """InternVL (HF format) with 32 px tiles of 4 tokens each (pixel shuffle 0.5), 1..6 tiles + thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    config = InternVLConfig(
        text_config=dict(TINY_LM, model_type="qwen2"),
        vision_config=dict(TINY_TOWER, image_size=[32, 32], patch_size=[8, 8]),
        image_token_id=IMAGE_TOKEN, downsample_ratio=0.5,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    redraw_vision_weights(model)
    model.save_pretrained(directory)
    # crop_to_patches left false, as hub checkpoints ship it: the InternVL processor turns tiling on per call
    GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, min_patches=1, max_patches=6).save_pretrained(directory)
    return directory


LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def save_llava_next(directory: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT with a 32 px CLIP tower (16 patch tokens per tile) and anyres grids up to 3 tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = LlavaNextConfig(
        vision_config=dict(TINY_TOWER, model_type="clip_vision_model", image_size=32, patch_size=8),
        text_config=dict(TINY_LM, model_type="llama"),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    redraw_vision_weights(model)
    model.save_pretrained(directory)
    LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    ).save_pretrained(directory)
    return directory


def tiny_tokenizer(**special_tokens: str) -> object:
    """A real fast tokenizer over the tiny VLMs' 128-token vocabulary (whitespace-split words "w0".."w116"),
    with the placeholders where the tiny configs expect them: <start_of_image> 125, <end_of_image> 126,
    <image> 127 (IMAGE_TOKEN). `special_tokens` names them for a processor, e.g. image_token="<image>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", *(f"w{i}" for i in range(117)), "\n\n", "<img>", "</img>", "<video>", "w117"]
    words += ["<start_of_image>", "<end_of_image>", "<image>"]
    assert len(words) == 128 and words[IMAGE_TOKEN] == "<image>"
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens=special_tokens,
    )


def save_bert(directory: Path) -> Path:
    """A real model of an architecture mmprep does not encode images with."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(directory)
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
