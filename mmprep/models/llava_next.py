"""LLaVA-NeXT: the packed image sequence the language model sees (base tile, anyres grid unpadded, image_newline)."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.models.base import output_of, owned
from mmprep.models.preprocess import ImageOptions, processor_image_defaults
from mmprep.models.vision_parts import VisionPartsEncoder

ARCHITECTURES = ("LlavaNextForConditionalGeneration",)


class LlavaNextEncoder(VisionPartsEncoder):
    """Per image "embeddings" [n_tokens, text_hidden] and "image_sizes" [1, 2] int64 (height, width).

    The embeddings are `get_image_features`' packed sequence: the base tile's tokens, then the anyres
    grid's tokens unpadded to the image's aspect ratio with `image_newline` after each row
    (`LlavaNextModel.pack_image_features`), i.e. what the language model's <image> placeholders receive
    and what vLLM's `_merge_image_patch_embeddings` builds; n_tokens depends on the image size.
    """

    family = "llava_next"

    SHELL = ("llava_next", "LlavaNextModel")
    PARTS = ("multi_modal_projector", "image_newline")

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        # the grid follows the image's aspect ratio and can exceed the base size: no fixed target size
        return ImageOptions(processor_image_defaults(config), fixed_size=False)

    @classmethod
    def input_names(cls, processed: Any) -> list[str]:
        return ["pixel_values", "image_sizes"]  # [1, n_patches, 3, H, W] (base + grid), [1, 2] (H, W)

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One forward over every patch of every image; per image its packed sequence (model dtype)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = [item["image_sizes"].to(torch.int64).reshape(1, 2) for item in items]
        patches = []
        for item, size in zip(items, sizes):  # as get_image_features slices a padded batch
            count = image_size_to_num_patches(
                size[0], self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            patches.append(item["pixel_values"].reshape(-1, *item["pixel_values"].shape[-3:])[:count])
        pixel_values = self.to_device(patches, self.dtype)
        with torch.inference_mode():
            packed = output_of(
                self.model.get_image_features(
                    pixel_values=pixel_values,
                    image_sizes=self.to_device(sizes),
                    vision_feature_layer=self.config.vision_feature_layer,
                    vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                )
            )
        if len(packed) != len(items):
            raise RuntimeError(f"get_image_features returned {len(packed)} sequences for {len(items)} images")
        return [{"embeddings": owned(tokens), "image_sizes": owned(size)} for tokens, size in zip(packed, sizes)]

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        return {"image_sizes": {"shape": [1, 2], "dtype": "int64"}}

    def output_shape(self) -> list[int | str]:
        return ["n_tokens", int(self.config.text_config.hidden_size)]


def image_token_count(config: Any, image_processor: Any, height: int, width: int) -> int:
    """The packed sequence's length for an image of this size: base tile + unpadded grid + one
    image_newline per grid row (vLLM: llava_next.py `get_num_image_tokens`, `_get_num_unpadded_features`)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    rows, columns = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, int(vision.image_size))
    grid_height, grid_width = side * rows, side * columns
    if width / height > grid_width / grid_height:
        grid_height -= 2 * ((grid_height - int(round(height * (grid_width / width), 7))) // 2)
    else:
        grid_width -= 2 * ((grid_width - int(round(width * (grid_height / height), 7))) // 2)
    return base + grid_height * grid_width + grid_height
