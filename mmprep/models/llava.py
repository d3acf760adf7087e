"""LLaVA: vision tower + multi-modal projector, i.e. the image tokens the language model would see."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mmprep.errors import ModelLoadError
from mmprep.models.base import Encoder, ModelSource, dtype_kwargs, output_of, owned, quiet_transformers

ARCHITECTURES = ("LlavaForConditionalGeneration",)

# Checkpoints name the parts "vision_tower.*" / "multi_modal_projector.*" (hub format) or with a "model." prefix (v5).
_TOWER_KEYS = {r"^(?:model\.)?vision_tower\.": ""}
_PROJECTOR_KEY = re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$")


class LlavaEncoder(Encoder):
    """Per image "embeddings" [n_tokens, text_hidden]: `get_image_features` with the config's
    vision_feature_layer and vision_feature_select_strategy.

    Only the vision tower and projector weights are read from a safetensors checkpoint (never the
    language model); a checkpoint in another format is read whole and its language model dropped.
    """

    family = "llava"

    def __init__(self, *, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.feature_layer = self.config.vision_feature_layer
        self.select_strategy = self.config.vision_feature_select_strategy

    @classmethod
    def load(
        cls, source: ModelSource, config: Any, image_processor: Any, architecture: str, device: torch.device, dtype: torch.dtype
    ) -> LlavaEncoder:
        files = _safetensors_files(source)
        if files:
            model = load_vision_parts(source, config, files, dtype)
        else:
            import transformers

            model = getattr(transformers, architecture).from_pretrained(
                source.location, **source.pretrained_kwargs(), **dtype_kwargs(dtype)
            )
            _drop_language_model(model)
        return cls(
            model=model.to(device).eval(),
            source=source,
            config=config,
            image_processor=image_processor,
            architecture=architecture,
            device=device,
            dtype=dtype,
        )

    def input_names(self, processed: Any) -> list[str]:
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


def load_vision_parts(source: ModelSource, config: Any, files: list[Path], dtype: torch.dtype) -> torch.nn.Module:
    """A LlavaModel whose vision tower and projector hold the checkpoint's weights and whose language model was never built."""
    from transformers import AutoModel
    from transformers.models.llava.modeling_llava import LlavaModel, LlavaMultiModalProjector

    with quiet_transformers():  # the language model's weights are "unexpected" here, by design
        tower, info = AutoModel.from_pretrained(
            source.location, config=config.vision_config, key_mapping=_TOWER_KEYS, output_loading_info=True,
            **source.pretrained_kwargs(), **dtype_kwargs(dtype),
        )  # fmt: skip
    missing = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    projector = LlavaMultiModalProjector(config).to(dtype)
    weights = _projector_weights(files)
    missing += sorted(set(projector.state_dict()) - set(weights))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source.name!r}: the checkpoint lacks vision-tower or projector weights: {shown}")
    projector.load_state_dict(weights, strict=True)
    with torch.device("meta"):  # the shell only: get_image_features, config and the two real parts
        model = LlavaModel(config)
    model.vision_tower = tower
    model.multi_modal_projector = projector
    _drop_language_model(model)
    return model


def _projector_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """The multi-modal projector's tensors, read by name from the safetensors files (nothing else is read)."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                match = _PROJECTOR_KEY.match(name)
                if match:
                    weights[match[1]] = f.get_tensor(name)
    return weights


def _safetensors_files(source: ModelSource) -> list[Path]:
    """The checkpoint's safetensors files (sharded via its index, or the single file); [] if it has none."""
    from transformers.utils import cached_file

    kwargs: dict[str, Any] = dict(source.pretrained_kwargs(), _raise_exceptions_for_missing_entries=False)
    index = cached_file(source.location, "model.safetensors.index.json", **kwargs)
    if index is not None:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [Path(cached_file(source.location, name, **source.pretrained_kwargs())) for name in names]
    single = cached_file(source.location, "model.safetensors", **kwargs)
    return [] if single is None else [Path(single)]


def _drop_language_model(model: torch.nn.Module) -> None:
    """Free the language model and LM head: only the tower and projector are used (v5 nests them in `.model`)."""
    for owner in (model, getattr(model, "model", None)):
        if owner is None:
            continue
        for name in ("language_model", "lm_head"):
            if owner._modules.get(name) is not None:  # a registered submodule, not a forwarding property
                owner._modules[name] = None
