"""Gemma 3: the projector's soft tokens of an image (and of its pan-and-scan crops), what the language model sees."""

from __future__ import annotations

import math
from typing import Any

import torch

from mmprep.models.base import output_of, owned
from mmprep.models.preprocess import ImageOptions, processor_image_defaults
from mmprep.models.vision_parts import VisionPartsEncoder

ARCHITECTURES = ("Gemma3ForConditionalGeneration",)

# The pan-and-scan settings of the image processor config that mmprep passes on like serving kwargs.
_PAN_AND_SCAN = (
    "do_pan_and_scan",
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)


class Gemma3Encoder(VisionPartsEncoder):
    """Per image "embeddings" [n_views * mm_tokens_per_image, text_hidden]: `get_image_features` of the
    image and then of each pan-and-scan crop (processor order), flattened: the sequence the language
    model's image placeholders receive (`Gemma3Model.forward` masked_scatter), and what vLLM's
    `Gemma3ForConditionalGeneration._process_image_input` computes per image; and "image_sizes" [1, 2]
    int64 (height, width), from which the number of crops follows (`image_token_count`).

    Pan-and-scan: transformers' Gemma3Processor passes do_pan_and_scan=False (and its crop settings) on
    every call, over preprocessor_config.json; serving turns it on per call (vLLM:
    mm_processor_kwargs={"do_pan_and_scan": True}). mmprep takes the pan_and_scan_* values that are set
    (non-null) in preprocessor_config.json as those call arguments, the processor's defaults otherwise.
    """

    family = "gemma3"

    SHELL = ("gemma3", "Gemma3Model")

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        kwargs = processor_image_defaults(config)
        for name in _PAN_AND_SCAN:
            if getattr(image_processor, name, None) is not None:
                kwargs[name] = getattr(image_processor, name)
        return ImageOptions(kwargs, fixed_size=not kwargs.get("do_pan_and_scan"), record_size=True)

    @classmethod
    def input_names(cls, processed: Any) -> list[str]:
        return ["pixel_values", "image_sizes"]  # [1 + n_crops, 3, H, W]: the image, then its crops; [1, 2]

    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One forward over every view of every image; per image its views' soft tokens, in order (model dtype)."""
        views = [int(item["pixel_values"].shape[0]) for item in items]
        pixel_values = self.to_device([item["pixel_values"] for item in items], self.dtype)
        with torch.inference_mode():
            tokens = output_of(self.model.get_image_features(pixel_values=pixel_values)).to("cpu")
        return [
            {"embeddings": owned(image.flatten(0, 1)), "image_sizes": owned(item["image_sizes"])}
            for image, item in zip(torch.split(tokens, views), items)
        ]

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        return {"image_sizes": {"shape": [1, 2], "dtype": "int64"}}

    def output_shape(self) -> list[int | str]:
        return ["n_tokens", int(self.config.text_config.hidden_size)]


def image_token_count(config: Any, image_processor: Any, height: int, width: int) -> int:
    """The soft tokens of an image of this size: (1 + pan-and-scan crops) * mm_tokens_per_image, as the
    encoder is configured; vLLM reserves as many placeholders (gemma3_mm.py `get_num_image_tokens`)."""
    kwargs = Gemma3Encoder.image_options_for(config, image_processor).call_kwargs
    crops = 0
    if kwargs.get("do_pan_and_scan"):
        crops = pan_and_scan_crops(
            width, height, kwargs["pan_and_scan_min_crop_size"], kwargs["pan_and_scan_max_num_crops"],
            kwargs["pan_and_scan_min_ratio_to_activate"],
        )  # fmt: skip
    return (1 + crops) * int(config.mm_tokens_per_image)


def pan_and_scan_crops(width: int, height: int, min_crop_size: int, max_crops: int, min_ratio: float) -> int:
    """How many crops Gemma3ImageProcessor.pan_and_scan cuts (vLLM: gemma3_mm.py `get_num_crops`)."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < min_ratio:
        return 0
    count = min(int(math.floor(long_side / min_crop_size)), int(math.floor(long_side / short_side + 0.5)))
    count = min(max_crops, max(2, count))
    if min(int(math.ceil(long_side / count)), short_side) < min_crop_size:
        return 0
    return count
