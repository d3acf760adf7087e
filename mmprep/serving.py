"""Hand cached entries to serving engines: the exact inputs that let them skip the vision encoder.

`to_vllm(entry)` dispatches on the entry's model family through `VLLM_LAYOUTS` (family -> builder);
each builder names the vLLM model file and function that define the layout it produces. A new family
adds one builder and one line in that table; a new engine or wire format adds its own function next
to `to_vllm` (same dispatch on `entry.family`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the reader imports this module (for its `to_vllm` alias)
    from mmprep.store.reader import CachedEmbedding


class ServingFormatError(ValueError):
    """The entry cannot be given to that serving engine (its family has no precomputed-embedding input there)."""


def _need(entry: CachedEmbedding, name: str) -> torch.Tensor:
    tensor = entry.tensors.get(name)
    if tensor is None:
        raise ServingFormatError(
            f"entry {entry.key[:16]} ({entry.family}) has no {name!r} tensor (it has {', '.join(entry.tensors)})"
        )
    return tensor


# -- vLLM layouts, one per family: what goes in multi_modal_data={"image": ...} for ONE image -----------


def _vllm_qwen2_vl(entry: CachedEmbedding) -> dict[str, torch.Tensor]:
    """{"image_embeds": [n_tokens, hidden], "image_grid_thw": [1, 3]}.

    vllm/model_executor/models/qwen2_vl.py: `Qwen2VLImageEmbeddingInputs` and
    `_create_qwen2vl_field_factory` (image_embeds flat_from_sizes by grid, image_grid_thw batched);
    `Qwen2VLForConditionalGeneration._process_image_input` splits the embeds per image by the grid.
    """
    return {"image_embeds": entry.embeddings, "image_grid_thw": _need(entry, "image_grid_thw")}


def _vllm_llava(entry: CachedEmbedding) -> torch.Tensor:
    """[1, n_tokens, text_hidden]: the projected tokens of one image, with the image axis vLLM expects.

    vllm/model_executor/models/llava.py: `LlavaImageEmbeddingInputs` (data: ["bn", "ifs", "hs"]) and
    `LlavaForConditionalGeneration._process_image_input` (embeds are used as given). vLLM's parser
    (vllm/multimodal/parse.py `MultiModalDataParser.is_embeddings`) takes a 3-D tensor or a list of
    2-D tensors as embeddings: a bare 2-D tensor would be read as pixels. For several images, pass
    `torch.cat([to_vllm(e) for e in entries])` (same token count) or `[e.embeddings for e in entries]`.
    """
    return entry.embeddings.unsqueeze(0)


def _vllm_pooled(entry: CachedEmbedding) -> Any:
    raise ServingFormatError(
        f"entry {entry.key[:16]} is a pooled (CLIP/SigLIP) embedding: vLLM has no precomputed-embedding "
        "image input for it (use the vector directly, e.g. for retrieval)"
    )


VLLM_LAYOUTS: dict[str, Callable[[CachedEmbedding], Any]] = {
    "pooled": _vllm_pooled,
    "llava": _vllm_llava,
    "qwen2_vl": _vllm_qwen2_vl,
}


def to_vllm(entry: CachedEmbedding) -> Any:
    """What vLLM takes as multi_modal_data={"image": to_vllm(entry)} for this one image (needs --enable-mm-embeds)."""
    build = VLLM_LAYOUTS.get(entry.family)
    if build is None:
        raise ServingFormatError(
            f"entry {entry.key[:16]} is of family {entry.family!r}, which has no vLLM layout "
            f"(families with one: {', '.join(f for f in VLLM_LAYOUTS if f != 'pooled')})"
        )
    return build(entry)
