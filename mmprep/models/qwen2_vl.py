"""Qwen2-VL / Qwen2.5-VL: the vision tower's merged patch tokens, what vLLM takes as `image_embeds`."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.errors import ModelLoadError
from mmprep.models.base import Encoder, ModelSource, dtype_kwargs, output_of, owned, quiet_transformers

# architecture -> (modeling module, vision tower class)
VISION_TOWERS = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
}
ARCHITECTURES = tuple(VISION_TOWERS)

# Checkpoints name the tower "visual.*" (hub format) or "model.visual.*"; the tower alone wants neither.
_TOWER_KEYS = {r"^(?:model\.)?visual\.": ""}


class Qwen2VLEncoder(Encoder):
    """Per image: "embeddings" [n_tokens, hidden] (merged patch tokens) and "image_grid_thw" [1, 3] int64.

    n_tokens = t*h*w / spatial_merge_size**2 of that image's grid; the pair is exactly what
    vLLM accepts as {"image_embeds": ..., "image_grid_thw": ...} to skip its vision encoder.
    Only the vision tower is loaded; the language model's weights are never read.
    """

    family = "qwen2_vl"

    def __init__(self, *, visual: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.visual = visual
        self.merge_size = int(self.config.vision_config.spatial_merge_size)

    @classmethod
    def load(
        cls, source: ModelSource, config: Any, image_processor: Any, architecture: str, device: torch.device, dtype: torch.dtype
    ) -> Qwen2VLEncoder:
        visual = load_vision_tower(source, config, architecture, dtype).to(device).eval()
        return cls(
            visual=visual,
            source=source,
            config=config,
            image_processor=image_processor,
            architecture=architecture,
            device=device,
            dtype=dtype,
        )

    def input_names(self, processed: Any) -> list[str]:
        return ["pixel_values", "image_grid_thw"]

    def input_size(self) -> tuple[int, int] | None:
        """Dynamic resolution (the grid follows each image): no fixed size for --fast-decode to aim at."""
        return None

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One forward over the concatenated patches of all images, split back per image by its grid (model dtype)."""
        grids = [item["image_grid_thw"].to(torch.int64) for item in items]
        sizes = [int(grid.prod()) // self.merge_size**2 for grid in grids]
        pixel_values = self.to_device([item["pixel_values"] for item in items], self.dtype)
        grid_thw = self.to_device(grids)
        with torch.inference_mode():
            merged = output_of(self.visual(pixel_values, grid_thw=grid_thw)).to("cpu")
        if merged.shape[0] != sum(sizes):
            raise RuntimeError(f"vision tower returned {merged.shape[0]} tokens for grids totalling {sum(sizes)}")
        return [
            {"embeddings": owned(tokens), "image_grid_thw": owned(grid)}
            for tokens, grid in zip(torch.split(merged, sizes), grids)
        ]

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        return {"image_grid_thw": {"shape": [1, 3], "dtype": "int64"}}

    def output_shape(self) -> list[int | str]:
        vision = self.config.vision_config
        return ["n_tokens", int(getattr(vision, "out_hidden_size", None) or vision.hidden_size)]


def load_vision_tower(source: ModelSource, config: Any, architecture: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load just the vision tower's weights from the full checkpoint; any missing tower weight is an error."""
    import importlib

    module_name, class_name = VISION_TOWERS[architecture]
    tower_class = getattr(importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}"), class_name)
    with quiet_transformers():  # the language model's weights are "unexpected" here, by design
        tower, info = tower_class.from_pretrained(
            source.location,
            config=config.vision_config,
            key_mapping=_TOWER_KEYS,
            output_loading_info=True,
            **source.pretrained_kwargs(),
            **dtype_kwargs(dtype),
        )
    missing = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source.name!r}: the checkpoint lacks vision-tower weights: {shown}")
    return tower
