"""Vision towers with dynamic resolution (the Qwen2-VL lineage): patches and `image_grid_thw` in,
merged tokens out. Qwen2-VL, Qwen3-VL, Qwen3.5 and GLM-4.1V each declare their towers and any extra
per-image features in their own module; loading and the batched forward live here, once."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch

from mmprep.errors import ModelLoadError
from mmprep.models.base import Encoder, output_of, owned
from mmprep.models.compat import dtype_kwargs, transformers_errors_only
from mmprep.models.preprocess import ImageOptions, processor_image_defaults
from mmprep.models.source import ModelSource

# Checkpoints name the tower "visual.*" (hub format) or "model.visual.*"; the tower alone wants neither.
_TOWER_KEYS = {r"^(?:model\.)?visual\.": ""}


class GridTowerEncoder(Encoder):
    """Per image: "embeddings" [n_tokens, hidden] (merged patch tokens), "image_grid_thw" [1, 3] int64,
    and the family's `extra_features` (e.g. Qwen3-VL's deepstack levels), each split per image.

    n_tokens = t*h*w / spatial_merge_size**2 of that image's grid. Only the vision tower is loaded;
    the language model's weights are never read.
    """

    # architecture -> (transformers modeling module, vision tower class)
    VISION_TOWERS: ClassVar[dict[str, tuple[str, str]]]

    def __init__(self, *, visual: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.visual = visual
        self.merge_size = int(self.config.vision_config.spatial_merge_size)

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
        visual = load_vision_tower(source, config, cls.VISION_TOWERS[architecture], dtype).to(device).eval()
        return cls.assemble(source, config, image_processor, architecture, device, dtype, visual=visual)

    @classmethod
    def input_names(cls, processed: Any) -> list[str]:
        return ["pixel_values", "image_grid_thw"]

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        """Dynamic resolution (the grid follows each image): no fixed size for --fast-decode to aim at;
        the full processor's per-call image arguments, if its class has any, as serving passes them."""
        return ImageOptions(processor_image_defaults(config), fixed_size=False)

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One forward over the concatenated patches of all images, split back per image by its grid (model dtype)."""
        grids = [item["image_grid_thw"].to(torch.int64) for item in items]
        sizes = [int(grid.prod()) // self.merge_size**2 for grid in grids]
        pixel_values = self.to_device([item["pixel_values"] for item in items], self.dtype)
        grid_thw = self.to_device(grids)
        with torch.inference_mode():
            result = self.visual(pixel_values, grid_thw=grid_thw)
            merged = output_of(result).to("cpu")
            extras = {name: tensor.to("cpu") for name, tensor in self.extra_features(result).items()}
        if merged.shape[0] != sum(sizes):
            raise RuntimeError(f"vision tower returned {merged.shape[0]} tokens for grids totalling {sum(sizes)}")
        per_image: list[dict[str, torch.Tensor]] = [
            {"embeddings": owned(tokens), "image_grid_thw": owned(grid)}
            for tokens, grid in zip(torch.split(merged, sizes), grids)
        ]
        for name, tensor in extras.items():  # the token axis is the second to last
            for out, part in zip(per_image, torch.split(tensor, sizes, dim=-2)):
                out[name] = owned(part)
        return per_image

    def extra_features(self, result: Any) -> dict[str, torch.Tensor]:
        """Per-token features besides the merged tokens, name -> [..., total_tokens, hidden] (default: none)."""
        return {}

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        return {"image_grid_thw": {"shape": [1, 3], "dtype": "int64"}}

    def output_shape(self) -> list[int | str]:
        return ["n_tokens", self.hidden_size]

    @property
    def hidden_size(self) -> int:
        vision = self.config.vision_config
        return int(getattr(vision, "out_hidden_size", None) or vision.hidden_size)


def load_vision_tower(source: ModelSource, config: Any, tower: tuple[str, str], dtype: torch.dtype) -> torch.nn.Module:
    """Load just the vision tower's weights from the full checkpoint; any missing tower weight is an error."""
    module_name, class_name = tower
    tower_class = getattr(
        importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}"), class_name
    )
    with transformers_errors_only():  # the language model's weights are "unexpected" here, by design
        visual, info = tower_class.from_pretrained(
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
    return visual
