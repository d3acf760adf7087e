"""Pooled image embeddings, one vector per image, via `get_image_features`: CLIP, SigLIP, SigLIP 2."""

from __future__ import annotations

from typing import Any

import torch

from mmprep.models.base import Encoder, output_of, owned
from mmprep.models.compat import dtype_kwargs
from mmprep.models.source import ModelSource

ARCHITECTURES = ("CLIPModel", "SiglipModel", "Siglip2Model")


class PooledEncoder(Encoder):
    """The contrastive image tower: `get_image_features` → [embed_dim] per image (retrieval-style vectors).

    SigLIP 2 (NaFlex) processors pad every image to `max_num_patches` and return `pixel_attention_mask`
    and `spatial_shapes` alongside `pixel_values`; all processor outputs are stacked and passed through.
    """

    family = "pooled"

    def __init__(self, *, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    @classmethod
    def load(
        cls,
        source: ModelSource,
        config: Any,
        image_processor: Any,
        architecture: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> PooledEncoder:
        import transformers

        model_class = getattr(transformers, architecture)
        model = model_class.from_pretrained(source.location, **source.pretrained_kwargs(), **dtype_kwargs(dtype))
        model = model.to(device).eval()
        return cls.assemble(source, config, image_processor, architecture, device, dtype, model=model)

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One batched forward; per image {"embeddings": [embed_dim]} in the model dtype."""
        inputs = {
            key: self.to_device([item[key] for item in items], self.dtype if key == "pixel_values" else None)
            for key in items[0]
        }
        with torch.inference_mode():
            features = output_of(self.model.get_image_features(**inputs)).to("cpu")
        return [{"embeddings": owned(row)} for row in features]

    def output_shape(self) -> list[int | str]:
        dim = getattr(self.config, "projection_dim", None) or self.config.vision_config.hidden_size
        return [int(dim)]
