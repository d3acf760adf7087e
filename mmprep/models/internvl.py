"""InternVL (transformers format): pixel-shuffled, projected tokens of every tile of an image."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.models.base import output_of, owned
from mmprep.models.preprocess import ImageOptions, processor_image_defaults
from mmprep.models.vision_parts import VisionPartsEncoder

ARCHITECTURES = ("InternVLForConditionalGeneration",)


class InternVLEncoder(VisionPartsEncoder):
    """Per image "embeddings" [n_tiles * image_seq_length, text_hidden]: `get_image_features` of each
    tile (processor order: the dynamic-resolution tiles, then the thumbnail), flattened: the sequence the
    language model's <IMG_CONTEXT> placeholders receive, and what vLLM's InternVL models produce per image;
    and "image_sizes" [1, 2] int64 (height, width), from which the tile count follows (`image_token_count`).

    Tiling follows transformers' InternVLProcessor, which passes crop_to_patches=True on every call over
    preprocessor_config.json (whose min_patches / max_patches still apply): an image processor called
    alone would not tile.
    """

    family = "internvl"

    SHELL = ("internvl", "InternVLModel")

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        kwargs = processor_image_defaults(config)
        tiles = kwargs.get("crop_to_patches", image_processor.crop_to_patches)
        return ImageOptions(kwargs, fixed_size=not tiles, record_size=True)

    @classmethod
    def input_names(cls, processed: Any) -> list[str]:
        return ["pixel_values", "image_sizes"]  # [n_tiles, 3, H, W], [1, 2] (recorded by the preprocessor)

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One forward over every tile of every image; per image its tiles' tokens, in order (model dtype)."""
        tiles = [int(item["pixel_values"].shape[0]) for item in items]
        pixel_values = self.to_device([item["pixel_values"] for item in items], self.dtype)
        with torch.inference_mode():
            tokens = output_of(
                self.model.get_image_features(
                    pixel_values=pixel_values,
                    vision_feature_layer=self.config.vision_feature_layer,
                    vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                )
            ).to("cpu")
        return [
            {"embeddings": owned(image.flatten(0, 1)), "image_sizes": owned(item["image_sizes"])}
            for image, item in zip(torch.split(tokens, tiles), items)
        ]

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        return {"image_sizes": {"shape": [1, 2], "dtype": "int64"}}

    def output_shape(self) -> list[int | str]:
        return ["n_tokens", int(self.config.text_config.hidden_size)]


def image_token_count(config: Any, image_processor: Any, height: int, width: int) -> int:
    """The tokens of an image of this size: tiles (the image processor's own count, with the processor's
    call arguments) * tokens per tile; vLLM reserves as many placeholders (interns1.py `get_num_image_tokens`)."""
    kwargs = InternVLEncoder.image_options_for(config, image_processor).call_kwargs
    tiles = int(image_processor.get_number_of_image_patches(height, width, kwargs))
    vision = config.vision_config
    size, patch = _pair(vision.image_size), _pair(vision.patch_size)
    per_tile = (size[0] // patch[0]) * (size[1] // patch[1]) * float(config.downsample_ratio) ** 2
    return tiles * int(per_tile)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))
