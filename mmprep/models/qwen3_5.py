"""Qwen3.5 (dense and MoE; natively multimodal): the vision tower's merged tokens and `image_grid_thw`.

transformers' Qwen3.5 tower has no deepstack mergers (its `Qwen3_5VisionModel.forward` returns only the
merged tokens), and vLLM's Qwen3.5 (qwen3_5.py, via `Qwen3VLForConditionalGeneration`) uses deepstack
only when `vision_config.deepstack_visual_indexes` exists; a config that has it is refused rather than
cached without the levels vLLM would then expect.
"""

from __future__ import annotations

from typing import Any

import torch

from mmprep.errors import ModelLoadError
from mmprep.models.grid import GridTowerEncoder
from mmprep.models.source import ModelSource


class Qwen3_5Encoder(GridTowerEncoder):
    """Per image: "embeddings" [n_tokens, hidden] and "image_grid_thw" [1, 3] int64."""

    family = "qwen3_5"
    VISION_TOWERS = {
        "Qwen3_5ForConditionalGeneration": ("qwen3_5", "Qwen3_5VisionModel"),
        "Qwen3_5MoeForConditionalGeneration": ("qwen3_5_moe", "Qwen3_5MoeVisionModel"),
    }

    @classmethod
    def load(
        cls,
        source: ModelSource,
        config: Any,
        image_processor: Any,
        architecture: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> GridTowerEncoder:
        if getattr(config.vision_config, "deepstack_visual_indexes", None):
            raise ModelLoadError(
                f"{source.name!r}: a {architecture} whose vision_config has deepstack_visual_indexes; "
                "transformers' Qwen3.5 vision tower computes no deepstack levels, so mmprep cannot cache them"
            )
        return super().load(source, config, image_processor, architecture, device, dtype)


ARCHITECTURES = tuple(Qwen3_5Encoder.VISION_TOWERS)
