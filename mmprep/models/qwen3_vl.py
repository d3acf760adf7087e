"""Qwen3-VL (dense and MoE): merged tokens plus every deepstack level, which the language model adds
to its first hidden states; serving cannot skip the vision encoder without them."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.models.device import dtype_name
from mmprep.models.grid import GridTowerEncoder


class Qwen3VLEncoder(GridTowerEncoder):
    """Per image: "embeddings" [n_tokens, hidden], "image_grid_thw" [1, 3] int64 and "deepstack"
    [levels, n_tokens, hidden]: level i is the tower's `deepstack_merger_list[i]` output at block
    `deepstack_visual_indexes[i]`, the one transformers adds after text layer i (stored only when the
    config has deepstack levels)."""

    family = "qwen3_vl"
    VISION_TOWERS = {
        "Qwen3VLForConditionalGeneration": ("qwen3_vl", "Qwen3VLVisionModel"),
        "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl_moe", "Qwen3VLMoeVisionModel"),
    }

    @property
    def levels(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    def extra_features(self, result: Any) -> dict[str, torch.Tensor]:
        if not self.levels:
            return {}
        levels = list(result.deepstack_features)
        if len(levels) != self.levels:
            raise RuntimeError(f"vision tower returned {len(levels)} deepstack levels, the config says {self.levels}")
        return {"deepstack": torch.stack(levels)}

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        outputs = super().extra_outputs()
        if self.levels:
            outputs["deepstack"] = {
                "shape": [self.levels, "n_tokens", self.hidden_size],
                "dtype": dtype_name(self.dtype),
            }
        return outputs


ARCHITECTURES = tuple(Qwen3VLEncoder.VISION_TOWERS)
