"""Builtin smoke-test models: tiny real architectures with random weights, for offline runs and tests.

`builtin:tiny-clip`, `builtin:tiny-qwen2-vl` and `builtin:tiny-qwen3-vl` are created on first use under
`$MMPREP_HOME/builtin/<name>` (MMPREP_HOME defaults to ~/.cache/mmprep) with save_pretrained, then
loaded back like any local model directory. Their embeddings are meaningless: they exist to exercise
the whole pipeline without downloading weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mmprep.errors import ModelLoadError
from mmprep.models.compat import transformers_errors_only

SEED = 0
MARKER = "mmprep-builtin.json"  # written into each builtin model directory
NOTE = "smoke-test model with random weights"


def mmprep_home() -> Path:
    """mmprep's per-user data folder: $MMPREP_HOME, else ~/.cache/mmprep."""
    return Path(os.environ.get("MMPREP_HOME") or "~/.cache/mmprep").expanduser()


def builtin_model_dir(name: str) -> Path:
    """The directory of builtin model `name`, created (atomically, race-free) if it does not exist yet."""
    build = BUILDERS.get(name)
    if build is None:
        raise ModelLoadError(f"unknown builtin model {name!r}; builtins: {', '.join(BUILTIN_MODELS)}")
    target = mmprep_home() / "builtin" / name
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        with transformers_errors_only():  # e.g. "falling back to the PIL backend" while constructing the processor
            build(staging)
        (staging / MARKER).write_text(json.dumps({"name": f"builtin:{name}", "note": NOTE, "seed": SEED}) + "\n")
        try:
            os.rename(staging, target)  # atomic; fails if a concurrent first use already renamed its copy
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tiny_clip(directory: Path) -> None:
    """CLIP with 32x32 images, 8-pixel patches, hidden 32, 2 vision layers, 16-dim projection."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    CLIPModel(config).eval().save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)


def _build_tiny_qwen2_vl(directory: Path) -> None:
    """Qwen2-VL with a 2-block vision tower (embed 32, output 64), a 1-layer text side, 4..64 merged tokens per image."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=127, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124,
    )
    torch.manual_seed(SEED)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(directory)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(directory)


def _build_tiny_qwen3_vl(directory: Path) -> None:
    """Qwen3-VL with a 3-block vision tower (16-pixel patches, output 64) and deepstack levels after
    blocks 0 and 1, a 2-layer text side, 4..64 merged tokens per image."""
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=127, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124,
    )
    torch.manual_seed(SEED)
    Qwen3VLForConditionalGeneration(config).eval().save_pretrained(directory)
    Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(directory)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-clip": _build_tiny_clip,
    "tiny-qwen2-vl": _build_tiny_qwen2_vl,
    "tiny-qwen3-vl": _build_tiny_qwen3_vl,
}
BUILTIN_MODELS: tuple[str, ...] = tuple(BUILDERS)
