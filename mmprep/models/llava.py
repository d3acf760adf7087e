"""LLaVA: vision tower + multi-modal projector, i.e. the image tokens the language model would see."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.models.base import output_of, owned
from mmprep.models.vision_parts import VisionPartsEncoder

ARCHITECTURES = ("LlavaForConditionalGeneration",)


class LlavaEncoder(VisionPartsEncoder):
    """Per image "embeddings" [n_tokens, text_hidden]: `get_image_features` with the config's
    vision_feature_layer and vision_feature_select_strategy.

    Only the vision tower and projector weights are read from a safetensors checkpoint (never the
    language model); a checkpoint in another format is read whole and its language model dropped.
    """

    family = "llava"

    SHELL = ("llava", "LlavaModel")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_layer = self.config.vision_feature_layer
        self.select_strategy = self.config.vision_feature_select_strategy

    @classmethod
    def input_names(cls, processed: Any) -> list[str]:
        return ["pixel_values"]

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One batched forward; per image {"embeddings": [n_tokens, hidden]} in the model dtype."""
        pixel_values = self.to_device([item["pixel_values"] for item in items], self.dtype)
        with torch.inference_mode():
            features = output_of(
                self.model.get_image_features(
                    pixel_values=pixel_values,
                    vision_feature_layer=self.feature_layer,
                    vision_feature_select_strategy=self.select_strategy,
                )
            )
            # [batch, n_tokens, hidden] (older transformers) or a list of [n_tokens, hidden] (v5)
            features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
            features = features.to("cpu")
        return [{"embeddings": owned(tokens)} for tokens in features]

    def output_shape(self) -> list[int | str]:
        return ["n_tokens", int(self.config.text_config.hidden_size)]
