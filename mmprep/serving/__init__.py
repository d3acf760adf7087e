"""Serving: hand cached entries to inference engines, so that they skip the vision encoder.

- `formats`: the exact inputs each engine takes (vLLM offline and chat parts, SGLang, Dynamo files,
  vLLM encoder-cache layouts); its public names are re-exported here.
- `vllm_connector`: `MmprepECConnector`, a vLLM encoder-cache connector that reads the cache in place.
- `rewrite`: `mmprep rewrite`, request files whose cached images go to the server as embeddings or ids.
- `vllm_hash`: vLLM's own identifier of an image (what `encode --vllm-model-id` records).
- `vllm_ec`: `mmprep export --format vllm-ec`, a portable store for vLLM's ECExampleConnector.
"""

from __future__ import annotations

from mmprep.serving.formats import (
    EC_LAYOUTS,
    EMBEDDING_FILE_SUFFIXES,
    METADATA_ONLY_FAMILIES,
    VLLM_LAYOUTS,
    EcLayout,
    ServingFormatError,
    check_rows,
    has_embedding_input,
    save_pt,
    tensor_to_base64,
    to_sglang,
    to_vllm,
    to_vllm_ec_part,
    to_vllm_part,
    vllm_ec_layout,
    vllm_ec_tensor,
)

__all__ = [
    "EC_LAYOUTS", "EMBEDDING_FILE_SUFFIXES", "METADATA_ONLY_FAMILIES", "VLLM_LAYOUTS", "EcLayout", "ServingFormatError", "check_rows",
    "has_embedding_input", "save_pt", "tensor_to_base64", "to_sglang", "to_vllm", "to_vllm_ec_part", "to_vllm_part", "vllm_ec_layout",
    "vllm_ec_tensor",
]  # fmt: skip
