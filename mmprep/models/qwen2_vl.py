"""Qwen2-VL / Qwen2.5-VL: the vision tower's merged patch tokens, what vLLM takes as `image_embeds`."""

from __future__ import annotations

from mmprep.models.grid import GridTowerEncoder


class Qwen2VLEncoder(GridTowerEncoder):
    """Per image: "embeddings" [n_tokens, hidden] (merged patch tokens) and "image_grid_thw" [1, 3] int64:
    what vLLM accepts as {"image_embeds": ..., "image_grid_thw": ...} to skip its vision encoder."""

    family = "qwen2_vl"
    VISION_TOWERS = {
        "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
        "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    }


ARCHITECTURES = tuple(Qwen2VLEncoder.VISION_TOWERS)
