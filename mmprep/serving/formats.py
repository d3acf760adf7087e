"""Hand cached entries to serving engines: the exact inputs that let them skip the vision encoder.

One function per target format (docs/serving.md#serving-targets); `mmprep.serving` re-exports them:
  `to_vllm(entry)`       offline vLLM: multi_modal_data={"image": to_vllm(entry)}
  `to_vllm_part(entry)`  vLLM's OpenAI server / run-batch: the chat content part that replaces the
                         image's `image_url` part (base64 of torch.save bytes, as vLLM decodes them)
  `to_sglang(entries)`   SGLang: the one `{"format": "precomputed_embedding", ...}` item of a request
  `save_pt(entry, path)` Dynamo's TensorRT-LLM worker: an embedding file given in place of an image URL
  `vllm_ec_layout(...)`  vLLM's encoder-cache connector store (`mmprep export --format vllm-ec`)

`to_vllm` dispatches on the entry's model family through `VLLM_LAYOUTS` (family -> builder); each
builder names the vLLM model file and function that define the layout it produces. A new family adds
one builder and one line in that table; the other formats derive from it or from the entry's tensors.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmprep.store.layout import EMBEDDINGS
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


def _one_image(entry: CachedEmbedding) -> torch.Tensor:
    """[1, n_tokens, hidden]: the entry's token sequence with the image axis vLLM's parser needs
    (vllm/multimodal/parse.py `MultiModalDataParser.is_embeddings`: a 3-D tensor or a list of 2-D ones)."""
    return entry.embeddings.unsqueeze(0)


def _vllm_qwen3_vl(entry: CachedEmbedding) -> dict[str, torch.Tensor]:
    """{"image_embeds": [n_tokens, hidden * (1 + levels)], "image_grid_thw": [1, 3]}: the merged tokens,
    then deepstack level 0, 1, ... concatenated on the last dimension.

    vllm/model_executor/models/qwen3_vl.py: `Qwen3_VisionTransformer.forward` returns
    `torch.cat([hidden_states] + deepstack_feature_lists, dim=1)`, and
    `Qwen3VLForConditionalGeneration._compute_deepstack_embeds` splits it back as
    `[visual_dim, multiscale_dim]`, the latter viewed as (levels, visual_dim) and injected after text
    layer 0, 1, ...; image_embeds given by the user take the same path (`_process_image_input`).
    """
    grid = _need(entry, "image_grid_thw")
    deepstack = entry.tensors.get("deepstack")  # [levels, n_tokens, hidden]; absent when the config has none
    embeds = entry.embeddings if deepstack is None else torch.cat([entry.embeddings, *deepstack], dim=-1)
    return {"image_embeds": embeds, "image_grid_thw": grid}


def _vllm_llava(entry: CachedEmbedding) -> torch.Tensor:
    """[1, n_tokens, text_hidden]: the projected tokens of one image, with the image axis vLLM expects.

    vllm/model_executor/models/llava.py: `LlavaImageEmbeddingInputs` (data: ["bn", "ifs", "hs"]) and
    `LlavaForConditionalGeneration._process_image_input` (embeds are used as given). vLLM's parser
    (vllm/multimodal/parse.py `MultiModalDataParser.is_embeddings`) takes a 3-D tensor or a list of
    2-D tensors as embeddings: a bare 2-D tensor would be read as pixels. For several images, pass
    `torch.cat([to_vllm(e) for e in entries])` (same token count) or `[e.embeddings for e in entries]`.
    """
    return _one_image(entry)


def _vllm_llava_next(entry: CachedEmbedding) -> torch.Tensor:
    """[1, n_tokens, text_hidden]: the PACKED sequence (base tile, anyres grid unpadded, image_newline).

    vllm/model_executor/models/llava_next.py: `LlavaNextImageEmbeddingInputs` (data: ["bn", "ifs", "hs"])
    and `LlavaNextForConditionalGeneration._process_image_input`, which returns image embeds as given: they
    must already be what `_merge_image_patch_embeddings(strategy="spatial_unpad")` builds from pixels, i.e.
    transformers' `pack_image_features`, which is what is stored. vLLM takes no `image_sizes` with embeds
    (the prompt gets one <image> per token: `BaseLlavaMultiModalProcessor._get_prompt_updates`); the stored
    "image_sizes" tensor is for transformers-side use and for checking.
    """
    return _one_image(entry)


def _vllm_internvl(entry: CachedEmbedding) -> torch.Tensor:
    """[1, n_tiles * image_seq_length, text_hidden]: every tile's tokens in processor order, flattened.

    vLLM serves transformers-format `InternVLForConditionalGeneration` with
    vllm/model_executor/models/interns1.py (registry.py): `InternS1ImageEmbeddingInputs` (data: ["ni",
    "tifs", "hs"]), `_parse_and_validate_image_input` and `_process_vision_input` (embeds used as given);
    `get_replacement_interns1_image` expands the image to <img> + one <IMG_CONTEXT> per token + </img>.
    The original-format InternVLChatModel (internvl.py: `InternVLImageEmbeddingInputs`,
    `_process_vision_input`) takes the same layout. Per-tile embeddings are never needed: from pixels,
    vLLM flattens the tiles the same way (`image_embeds.view(-1, hidden)` in `_process_vision_input`).
    """
    return _one_image(entry)


def _vllm_gemma3(entry: CachedEmbedding) -> Any:
    """vLLM 0.32 takes no precomputed image embeddings for Gemma 3: vllm/model_executor/models/gemma3_mm.py
    `Gemma3ForConditionalGeneration._parse_and_validate_image_input` asserts `image_embeds is None`, and
    `Gemma3MultiModalProcessor._get_prompt_updates` needs the image's size (ImageProcessorItems) to lay out
    the prompt. The stored embeddings are what its `_process_image_input` computes per image (every view's
    soft tokens, flattened): vLLM takes them through its encoder-cache connector instead (`mmprep export
    --format vllm-ec`, `_ec_gemma3`), and transformers through `inputs_embeds`."""
    raise ServingFormatError(
        f"entry {entry.key[:16]} is a Gemma 3 entry: vLLM 0.32 has no precomputed-embedding image input for "
        "Gemma 3 (gemma3_mm.py asserts image_embeds is None); serve the cache through vLLM's encoder-cache "
        "connector (mmprep export --format vllm-ec), or use entry.embeddings as transformers' inputs_embeds"
    )


def _vllm_pooled(entry: CachedEmbedding) -> Any:
    raise ServingFormatError(
        f"entry {entry.key[:16]} is a pooled (CLIP/SigLIP) embedding: vLLM has no precomputed-embedding "
        "image input for it (use the vector directly, e.g. for retrieval)"
    )


VLLM_LAYOUTS: dict[str, Callable[[CachedEmbedding], Any]] = {
    "pooled": _vllm_pooled,
    "llava": _vllm_llava,
    "qwen2_vl": _vllm_qwen2_vl,
    "llava_next": _vllm_llava_next,
    "internvl": _vllm_internvl,
    "gemma3": _vllm_gemma3,
    # vllm/model_executor/models/qwen3_5.py: `Qwen3_5ForConditionalGeneration` is a
    # `Qwen3VLForConditionalGeneration` whose tower has no deepstack levels: the Qwen2-VL pair.
    "qwen3_5": _vllm_qwen2_vl,
    "qwen3_vl": _vllm_qwen3_vl,
    # vllm/model_executor/models/glm4_1v.py: `Glm4vImageEmbeddingInputs` (image_embeds ["f", "h"],
    # image_grid_thw ["n", 3]) and `Glm4vForConditionalGeneration._process_image_input`: the same pair.
    # Caveat (vLLM 0.32): `Glm4vProcessingInfo.get_data_parser` is a plain `MultiModalDataParser`
    # without image `embedding_fields`, so its request parser does not take this dict yet.
    "glm4v": _vllm_qwen2_vl,
}
_REFUSED = frozenset({"pooled", "gemma3"})  # families whose builder explains why vLLM takes no embeddings


def has_embedding_input(family: str) -> bool:
    """Whether vLLM takes this family's entries in place of images (pooled CLIP/SigLIP vectors, Gemma 3: no)."""
    return family in VLLM_LAYOUTS and family not in _REFUSED


def to_vllm(entry: CachedEmbedding) -> Any:
    """What vLLM takes as multi_modal_data={"image": to_vllm(entry)} for this one image (needs --enable-mm-embeds)."""
    build = VLLM_LAYOUTS.get(entry.family)
    if build is None:
        raise ServingFormatError(
            f"entry {entry.key[:16]} is of family {entry.family!r}, which has no vLLM layout "
            f"(families with one: {', '.join(f for f in VLLM_LAYOUTS if f not in _REFUSED)})"
        )
    return build(entry)


# -- vLLM encoder-cache connector (ECExampleConnector) layouts: ONE image's element of embed_multimodal() --


@dataclass(frozen=True)
class EcLayout:
    """How an entry of one family becomes the `ec_cache` tensor vLLM's runner caches for that image, and
    how many rows that tensor must have (the placeholder tokens vLLM reserves; a mismatch kills the engine)."""

    family: str
    tensor: Callable[[CachedEmbedding], torch.Tensor]
    rows: Callable[[CachedEmbedding], int]

    def checked(self, entry: CachedEmbedding) -> torch.Tensor:
        """The entry's tensor if it fills the placeholder vLLM reserves for its image; ServingFormatError if not."""
        tensor = self.tensor(entry)
        expected = self.rows(entry)
        if tensor.ndim != 2 or tensor.shape[0] != expected:
            raise ServingFormatError(
                f"entry {entry.key[:16]} has a {list(tensor.shape)} tensor for the {expected} placeholder tokens "
                "vLLM reserves"
            )
        return tensor


def _ec_qwen2_vl(config: Any) -> EcLayout:
    """Qwen2-VL / Qwen2.5-VL: the merged tokens [t*h*w / merge², hidden].

    vllm/model_executor/models/qwen2_vl.py: `Qwen2VLForConditionalGeneration.embed_multimodal` returns
    `_process_image_input`'s split of the merged tokens, one [tokens, hidden] tensor per image.
    """
    merge = int(config.vision_config.spatial_merge_size)
    return EcLayout("qwen2_vl", lambda e: e.embeddings, lambda e: int(_need(e, "image_grid_thw").prod()) // merge**2)


def _ec_merged_grid(family: str, config: Any) -> EcLayout:
    """Qwen3-VL, Qwen3.5, GLM-4.1V: one image's element of embed_multimodal() is `to_vllm`'s
    "image_embeds" — for Qwen3-VL the merged tokens with the deepstack levels concatenated on the last
    dimension (vllm/model_executor/models/qwen3_vl.py: `_process_image_input` returns the tower's
    `cat([hidden] + deepstack)` split per image, and `embed_input_ids` splits the levels back off);
    qwen3_5.py and glm4_1v.py: the merged tokens. Rows: t*h*w / merge² of the image's grid."""
    merge = int(config.vision_config.spatial_merge_size)
    return EcLayout(family, vllm_ec_tensor, lambda e: int(_need(e, "image_grid_thw").prod()) // merge**2)


def _ec_llava(config: Any) -> EcLayout:
    """LLaVA: the projected patch tokens [(image_size / patch_size)², text_hidden] (+1 with the "full"
    strategy, which keeps CLS). vllm/model_executor/models/llava.py: `embed_multimodal` returns the
    projector's [images, tokens, hidden] output, one [tokens, hidden] element per image."""
    vision = config.vision_config
    tokens = (int(vision.image_size) // int(vision.patch_size)) ** 2
    tokens += 1 if config.vision_feature_select_strategy == "full" else 0
    return EcLayout("llava", lambda e: e.embeddings, lambda e: tokens)


def _ec_tiled(family: str, count: Callable[[Any, Any, int, int], int], config: Any, image_processor: Any) -> EcLayout:
    """Gemma 3, InternVL, LLaVA-NeXT: the stored embeddings are already the image's element of
    `embed_multimodal()` (gemma3_mm.py and interns1.py `_process_image_input` / `_process_vision_input`:
    every view's tokens flattened; llava_next.py `_process_image_input`: the packed sequence). The row
    count vLLM reserves follows from the image's size (the stored "image_sizes") and the model's config."""

    def rows(entry: CachedEmbedding) -> int:
        height, width = (int(v) for v in _need(entry, "image_sizes").reshape(2))
        return count(config, image_processor, height, width)

    return EcLayout(family, lambda e: e.embeddings, rows)


def _ec_gemma3(config: Any, image_processor: Any) -> EcLayout:
    from mmprep.models.gemma3 import image_token_count  # (1 + pan-and-scan crops) * mm_tokens_per_image

    return _ec_tiled("gemma3", image_token_count, config, image_processor)


def _ec_internvl(config: Any, image_processor: Any) -> EcLayout:
    from mmprep.models.internvl import image_token_count  # tiles * tokens per tile

    return _ec_tiled("internvl", image_token_count, config, image_processor)


def _ec_llava_next(config: Any, image_processor: Any) -> EcLayout:
    from mmprep.models.llava_next import image_token_count  # base + unpadded grid + a newline per row

    return _ec_tiled("llava_next", image_token_count, config, image_processor)


EC_LAYOUTS: dict[str, Callable[[Any, Any], EcLayout]] = {
    "qwen2_vl": lambda config, _processor: _ec_qwen2_vl(config),
    "llava": lambda config, _processor: _ec_llava(config),
    "gemma3": _ec_gemma3,  # the only way vLLM 0.32 takes Gemma 3 embeddings from outside
    "internvl": _ec_internvl,
    "llava_next": _ec_llava_next,
    "qwen3_vl": lambda config, _processor: _ec_merged_grid("qwen3_vl", config),
    "qwen3_5": lambda config, _processor: _ec_merged_grid("qwen3_5", config),
    "glm4v": lambda config, _processor: _ec_merged_grid("glm4v", config),
}


_EC_EMBEDS_DICT = frozenset({"qwen3_vl", "qwen3_5", "glm4v"})  # families whose EC tensor is to_vllm's "image_embeds"


def vllm_ec_tensor(entry: CachedEmbedding) -> torch.Tensor:
    """The tensor vLLM's runner caches for this one image (its element of `embed_multimodal()`), without
    the model's config: what every EcLayout's `tensor` gives, for the families that have one."""
    if entry.family not in EC_LAYOUTS:
        raise ServingFormatError(
            f"entry {entry.key[:16]} is of family {entry.family!r}, which has no vLLM encoder-cache layout "
            f"(families with one: {', '.join(EC_LAYOUTS)})"
        )
    if entry.family in _EC_EMBEDS_DICT:
        return VLLM_LAYOUTS[entry.family](entry)["image_embeds"]
    return entry.embeddings


# Families whose vLLM request parser takes an image part that carries only the placeholder metadata on an
# encoder-cache consumer (`embedding_fields` with role "metadata" in vllm/model_executor/models/qwen2_vl.py
# `Qwen2VLMultiModalDataParser`: image_grid_thw; qwen3_vl.py and qwen3_5.py reuse it). GLM-4.1V's parser
# publishes none in vLLM 0.32.
METADATA_ONLY_FAMILIES = frozenset({"qwen2_vl", "qwen3_vl", "qwen3_5"})


def to_vllm_ec_part(entry: CachedEmbedding) -> dict[str, Any]:
    """The chat content part that names this cached image to a vLLM serving the cache through
    `MmprepECConnector`, without its pixels: `{"type": "image_embeds", "image_embeds": {"image_grid_thw":
    [t, h, w]}, "uuid": <entry key>}` (the placeholder metadata only; the embedding comes through the
    connector). ServingFormatError for families without placeholder metadata or entries that fail the checks."""
    if entry.family not in METADATA_ONLY_FAMILIES:
        raise ServingFormatError(
            f"entry {entry.key[:16]} ({entry.family}): vLLM takes no metadata-only image part for this family "
            f"(families that have one: {', '.join(sorted(METADATA_ONLY_FAMILIES))}); send the image_url with the uuid"
        )
    check_rows(entry)
    vllm_ec_tensor(entry)
    grid = _need(entry, "image_grid_thw").reshape(-1).tolist()
    return {"type": "image_embeds", "image_embeds": {"image_grid_thw": grid}, "uuid": entry.key}


def vllm_ec_layout(family: str, model_info: dict[str, Any]) -> EcLayout:
    """The EC layout of a cached model (`model_info`: its row in the index's models table); reads the
    model's config (local or hub cache, offline) for the numbers that fix each image's token count."""
    build = EC_LAYOUTS.get(family)
    if build is None:
        raise ServingFormatError(
            f"model {model_info.get('name')} ({family}) has no vLLM encoder-cache layout (families with one: "
            f"{', '.join(EC_LAYOUTS)}); pooled vectors are for retrieval (--format npy or parquet)"
        )
    from mmprep.models.source import load_config, load_image_processor, reason_of, resolve_source

    try:
        source = resolve_source(str(model_info["name"]), model_info.get("revision"))
        config, image_processor = load_config(source), load_image_processor(source)
    except Exception as exc:  # the model is not on this machine any more, or not readable offline
        raise ServingFormatError(
            f"cannot read the config of {model_info.get('name')} to check token counts: {reason_of(exc)}"
        ) from exc
    return build(config, image_processor)


# -- vLLM's OpenAI server (chat completions, run-batch) --------------------------------------------


def tensor_to_base64(tensor: torch.Tensor) -> str:
    """base64 of `torch.save` bytes, as vLLM writes them (`vllm.utils.serial_utils.tensor2base64`) and
    reads them (`ImageEmbeddingMediaIO.load_base64`: `torch.load(weights_only=True)`). The tensor is
    copied first: torch.save writes a view's whole storage, which could be a whole shard's."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format), buffer)
    return base64.b64encode(buffer.getbuffer()).decode("ascii")


def to_vllm_part(entry: CachedEmbedding) -> dict[str, Any]:
    """The chat content part vLLM's server takes in place of this image's `image_url` part (started with
    --enable-mm-embeds): `{"type": "image_embeds", "image_embeds": ..., "uuid": <entry key>}`.

    One part carries one image (vllm/renderers/chat_utils.py `parse_image_embeds`, `_get_embeds_data`):
    a dict layout (Qwen-VL) becomes a dict of base64 tensors with `image_grid_thw` as a 1-D `[3]` (a
    `[1, 3]` is refused: "size_per_item should be a 1-D tensor"); a tensor layout becomes the image's
    `[n_tokens, hidden]` (a `[1, n_tokens, hidden]` part is vLLM's deprecated batched form). The uuid
    lets vLLM's own caches key the item by the entry. vLLM refuses a request that mixes `image_url` and
    `image_embeds` parts ("Mixing raw image and embedding inputs is not allowed")."""
    check_rows(entry)
    offline = to_vllm(entry)
    payload: str | dict[str, str]
    if isinstance(offline, dict):
        payload = {name: tensor_to_base64(_one_item(name, tensor)) for name, tensor in offline.items()}
    else:
        payload = tensor_to_base64(offline[0])  # [1, n_tokens, hidden] -> this image's [n_tokens, hidden]
    return {"type": "image_embeds", "image_embeds": payload, "uuid": entry.key}


def _one_item(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A per-image metadata tensor as a chat part carries it: a grid `[1, 3]` becomes `[3]`."""
    return tensor.reshape(-1) if name.endswith("grid_thw") else tensor


def check_rows(entry: CachedEmbedding) -> None:
    """Refuse an entry whose embedding rows cannot fill its grid (rows x merge^2 = t*h*w for a whole
    merge size): servers do not check it, and a short tensor fills the image's placeholders wrongly."""
    grid = entry.tensors.get("image_grid_thw")
    if grid is None:
        return
    rows, patches = entry.embeddings.shape[0], int(torch.prod(grid.reshape(-1)))
    ratio, rest = divmod(patches, rows) if rows else (0, 1)
    if rest or ratio < 1 or math.isqrt(ratio) ** 2 != ratio:
        raise ServingFormatError(
            f"entry {entry.key[:16]} has {rows} embedding rows for a grid of {patches} patches "
            f"({grid.reshape(-1).tolist()}): not a whole number of merged patches"
        )


# -- SGLang --------------------------------------------------------------------------------------


def to_sglang(entries: CachedEmbedding | Sequence[CachedEmbedding]) -> dict[str, Any]:
    """SGLang's precomputed-embedding item for a request's images, in prompt order:
    `Engine.generate(input_ids=..., image_data=[to_sglang(entries)])`.

    sglang/srt/multimodal/processors/base_processor.py `process_and_combine_mm_data`: a dict with
    `format == "precomputed_embedding"` becomes one item whose `feature` is the embeddings and whose
    other keys (here `image_grid_thw`, `[n_images, 3]`, used for Qwen-VL's M-RoPE positions) are kept as
    model data. SGLang takes one such item per request (`validate_mm_data`), so several images are
    concatenated: `feature` `[sum of n_tokens, hidden]`. `input_ids` must hold each image's placeholder
    tokens expanded to its row count."""
    items = [entries] if hasattr(entries, "tensors") else list(entries)
    if not items:
        raise ServingFormatError("to_sglang needs at least one entry")
    if len({e.fingerprint for e in items}) > 1:
        raise ServingFormatError("to_sglang: entries of different models cannot share a request")
    for entry in items:
        to_vllm(entry)  # the same families have an embedding input (pooled ones raise here)
        check_rows(entry)
    item: dict[str, Any] = {"format": "precomputed_embedding", "feature": torch.cat([e.embeddings for e in items])}
    grids = [e.tensors.get("image_grid_thw") for e in items]
    if grids[0] is not None:
        item["image_grid_thw"] = torch.cat([g.reshape(1, -1) for g in grids])  # type: ignore[union-attr]  # grids[0] is not None: the family stores a grid for every entry
    return item


# -- Dynamo / TensorRT-LLM -------------------------------------------------------------------------

EMBEDDING_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")


def save_pt(entry: CachedEmbedding, path: Path | str) -> Path:
    """Write the file Dynamo's TensorRT-LLM worker takes in place of an image URL (an `image_url` part
    whose url is the file's path), atomically. The suffix picks the format: `.safetensors` (what
    current Dynamo accepts), `.pt` / `.pth` (older Dynamo: `torch.load(weights_only=True)`).

    Layout (Dynamo docs/features/multimodal/multimodal_trtllm.md, "Embedding File Formats"): the image's
    embeddings as `[1, n_tokens, hidden]`; alone when that is all the entry holds (a single-tensor file
    is read as the tensor), else with the entry's other tensors under their names and the embeddings
    under `mm_embeddings` (the key the worker takes from a multi-tensor file)."""
    path = Path(path)
    if path.suffix not in EMBEDDING_FILE_SUFFIXES:
        raise ServingFormatError(f"{path.name}: the suffix must be one of {', '.join(EMBEDDING_FILE_SUFFIXES)}")
    to_vllm(entry)  # pooled entries have no embedding input anywhere
    check_rows(entry)
    tensors = {"mm_embeddings": entry.embeddings.unsqueeze(0)}
    tensors.update((name, t) for name, t in entry.tensors.items() if name != EMBEDDINGS)
    tensors = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for name, t in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors["mm_embeddings"] if len(tensors) == 1 else tensors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
