"""Vision-only loading for VLMs built as `vision_tower` + projector (+ parameters) + `language_model`.

LLaVA, LLaVA-NeXT, Gemma 3 and InternVL share this layout in transformers. The vision tower and the
named parts are read from the checkpoint's safetensors files by tensor name; the language model is never
built (the model is a meta-device shell around the real parts) and its tensors are never read. A
checkpoint without safetensors is read whole and its language model dropped.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmprep.errors import ModelLoadError
from mmprep.models.base import Encoder
from mmprep.models.compat import dtype_kwargs, transformers_errors_only
from mmprep.models.source import ModelSource

# Checkpoints name the parts "vision_tower.*" (hub format) or with a "model." prefix (transformers v5).
_TOWER_KEYS = {r"^(?:model\.)?vision_tower\.": ""}


def load_vision_model(
    source: ModelSource,
    config: Any,
    architecture: str,
    dtype: torch.dtype,
    *,
    shell: type[torch.nn.Module],
    parts: Sequence[str],
) -> torch.nn.Module:
    """`shell(config)` (e.g. LlavaModel) whose vision tower and `parts` (submodules or parameters of the
    shell, e.g. "multi_modal_projector", "image_newline") hold the checkpoint's weights; its language model
    is never built. Any missing vision weight is a ModelLoadError naming the tensors."""
    files = _safetensors_files(source)
    if not files:
        import transformers

        model = getattr(transformers, architecture).from_pretrained(
            source.location, **source.pretrained_kwargs(), **dtype_kwargs(dtype)
        )
        drop_language_model(model)
        return model
    from transformers import AutoModel

    with transformers_errors_only():  # the language model's weights are "unexpected" here, by design
        tower, info = AutoModel.from_pretrained(
            source.location, config=config.vision_config, key_mapping=_TOWER_KEYS, output_loading_info=True,
            **source.pretrained_kwargs(), **dtype_kwargs(dtype),
        )  # fmt: skip
    missing = [f"vision_tower.{k}" for k in sorted(info.get("missing_keys", ()))]
    missing += [f"vision_tower.{k}" for k in sorted(str(k) for k in info.get("mismatched_keys", ()))]
    with torch.device("meta"):  # the shell only: get_image_features, config and the real parts
        model = shell(config)
    weights = _part_weights(files, parts)
    loaded: dict[str, torch.nn.Module | torch.nn.Parameter] = {}
    for name in parts:
        placeholder = getattr(model, name)
        if isinstance(placeholder, torch.nn.Parameter):
            if name not in weights:
                missing.append(name)
            elif weights[name].shape != placeholder.shape:
                missing.append(f"{name} (shape {list(weights[name].shape)}, expected {list(placeholder.shape)})")
            else:
                loaded[name] = torch.nn.Parameter(weights[name].to(dtype), requires_grad=False)
            continue
        # A fresh instance of the shell's own class (projectors take the model config), built for real so
        # that any non-persistent buffer is initialised, then filled strictly from the checkpoint.
        module = type(placeholder)(config).to(dtype)
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        absent = sorted(set(module.state_dict()) - set(own))
        if absent:
            missing += [prefix + k for k in absent]
        else:
            module.load_state_dict(own, strict=True)
            loaded[name] = module
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source.name!r}: the checkpoint lacks vision-tower or projector weights: {shown}")
    model.vision_tower = tower
    for name, part in loaded.items():
        setattr(model, name, part)
    drop_language_model(model)
    return model


def _part_weights(files: list[Path], parts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of `parts`, by name without the "model." prefix, read from the safetensors files (nothing else is read)."""
    from safetensors import safe_open

    pattern = re.compile(rf"^(?:model\.)?((?:{'|'.join(map(re.escape, parts))})(?:\..+)?)$")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                match = pattern.match(name)
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


def drop_language_model(model: torch.nn.Module) -> None:
    """Free the language model and LM head: only the vision parts are used (v5 nests them in `.model`)."""
    for owner in (model, getattr(model, "model", None)):
        if owner is None:
            continue
        for name in ("language_model", "lm_head"):
            if owner._modules.get(name) is not None:  # a registered submodule, not a forwarding property
                owner._modules[name] = None


class VisionPartsEncoder(Encoder):
    """A family whose encoder is a transformers `<Family>Model` shell holding only the vision tower and
    `PARTS` (LLaVA, LLaVA-NeXT, Gemma 3, InternVL): loading is the same for all of them, once, here."""

    SHELL: ClassVar[tuple[str, str]]  # (transformers.models.<module>, shell class), e.g. ("llava", "LlavaModel")
    PARTS: ClassVar[tuple[str, ...]] = ("multi_modal_projector",)

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
    ) -> VisionPartsEncoder:
        module, name = cls.SHELL
        shell = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        model = load_vision_model(source, config, architecture, dtype, shell=shell, parts=cls.PARTS)
        return cls.assemble(source, config, image_processor, architecture, device, dtype, model=model.to(device).eval())
