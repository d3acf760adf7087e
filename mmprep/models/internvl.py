"""InternVL (transformers format): pixel-shuffled, projected tokens of every tile of an image."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.models.base import Encoder, ImageOptions, ModelSource, output_of, owned, processor_image_defaults
from mmprep.models.vision_parts import load_vision_model

ARCHITECTURES = ("InternVLForConditionalGeneration",)


class InternVLEncoder(Encoder):
    """Per image "embeddings" [n_tiles * image_seq_length, text_hidden]: `get_image_features` of each
    tile (processor order: the dynamic-resolution tiles, then the thumbnail), flattened: the sequence the
    language model's <IMG_CONTEXT> placeholders receive, and what vLLM's InternVL models produce per image.

    Tiling follows transformers' InternVLProcessor, which passes crop_to_patches=True on every call over
    preprocessor_config.json (whose min_patches / max_patches still apply): an image processor called
    alone would not tile.
    """

    family = "internvl"

    def __init__(self, *, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    @classmethod
    def load(
        cls, source: ModelSource, config: Any, image_processor: Any, architecture: str, device: torch.device, dtype: torch.dtype
    ) -> InternVLEncoder:
        from transformers.models.internvl.modeling_internvl import InternVLModel

        model = load_vision_model(source, config, architecture, dtype, shell=InternVLModel, parts=("multi_modal_projector",))
        return cls(
            model=model.to(device).eval(),
            source=source,
            config=config,
            image_processor=image_processor,
            architecture=architecture,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        kwargs = processor_image_defaults(config)
        return ImageOptions(kwargs, fixed_size=not kwargs.get("crop_to_patches", image_processor.crop_to_patches))

    def input_names(self, processed: Any) -> list[str]:
        return ["pixel_values"]  # [n_tiles, 3, H, W]

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
        return [{"embeddings": owned(image.flatten(0, 1))} for image in torch.split(tokens, tiles)]

    def output_shape(self) -> list[int | str]:
        return ["n_tokens", int(self.config.text_config.hidden_size)]
