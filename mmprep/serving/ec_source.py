"""The cache as vLLM's encoder-cache source: one image identifier in, a checked tensor (or the reason why not) out.

What `MmprepECConnector` (mmprep.serving.vllm_connector) asks, kept free of vLLM so that it is tested on
its own: an identifier is an mmprep entry key (the `uuid` a request carries, as `mmprep rewrite` writes
it) or vLLM's own identifier of the image bytes (recorded by `encode --vllm-model-id`). The cache is read
in place (index read-only, shards memory-mapped; `EmbeddingCache`), so entries committed after start are
found at once, and a shard that gc moved is looked up again. An entry counts only once it passed every
check: its family has an encoder-cache layout, its rows equal the request's placeholder count, its width
is the served model's, its dtype is floating point (cast to the served dtype when it differs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmprep.serving.formats import EC_LAYOUTS, ServingFormatError, check_rows, vllm_ec_tensor
from mmprep.store.reader import EmbeddingCache

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _same_path(a: str, b: str) -> bool:
    """Whether two model names are paths to the same existing directory."""
    try:
        return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


class ModelMismatchError(ValueError):
    """The cache's model is not the model vLLM serves: no entry of it may fill this model's placeholders."""


@dataclass(frozen=True)
class Verdict:
    """What the cache holds for one image of a request: a checked `tensor` (a hit), or `reason` with
    `found` telling a rejected entry (found, failed a check) from a miss (not in the cache)."""

    identifier: str
    key: str | None
    tensor: torch.Tensor | None
    reason: str | None
    found: bool

    @property
    def hit(self) -> bool:
        return self.tensor is not None


@dataclass(frozen=True)
class ServedModel:
    """What the checks need to know of the model vLLM serves."""

    width: int  # columns of one image's encoder-cache tensor (text hidden, x (1 + deepstack levels) for Qwen3-VL)
    dtype: torch.dtype
    architectures: Sequence[str] = ()  # the served config's `architectures`
    model_id: str | None = None  # the server's --model string (vLLM's identifiers are made with it)


class EcSource:
    """Look image identifiers up in one model of a cache and check each entry against the served model."""

    def __init__(self, root: Path | str, model: str | None, served: ServedModel) -> None:
        self.cache = EmbeddingCache(root, model, memory_bytes=0)  # vLLM's encoder cache keeps what it loads
        self.served = served
        architecture = self.cache.model_info.get("architecture")
        if self.cache.family not in EC_LAYOUTS:
            raise ModelMismatchError(
                f"the cache's model {self.cache.model_name} is a {self.cache.family} model: vLLM has no encoder "
                f"output for it (families served: {', '.join(EC_LAYOUTS)})"
            )
        if served.architectures and architecture and architecture not in served.architectures:
            raise ModelMismatchError(
                f"the cache's model {self.cache.model_name} ({self.cache.fingerprint[:16]}) is a {architecture}; "
                f"vLLM serves a {', '.join(served.architectures)}: choose the cache's model with "
                '"model" in ec_connector_extra_config, or serve the model the cache was encoded with'
            )

    @property
    def identity_note(self) -> str | None:
        """Why the cache's model may not be the served one although their architectures agree (None: same
        name or path): entries are then checked for shape only, so the user should know."""
        name, served = self.cache.model_name, self.served.model_id
        if served is None or name == served or _same_path(name, served):
            return None
        return (
            f"the cache's model is {name} ({self.cache.fingerprint[:16]}) and vLLM serves {served}: entries are "
            "checked for rows, width and dtype only; if these are different weights, choose the cache's model "
            'with "model" in ec_connector_extra_config or serve the weights the cache was encoded with'
        )

    def check(self, identifier: str, rows: int) -> Verdict:
        """The entry for `identifier`, checked against `rows` (the placeholder's embedding count) and the
        served model; never raises for a bad or missing entry (the verdict says why)."""
        key = identifier if _HEX64.fullmatch(identifier) else None
        entry = self.cache.get_key(key) if key is not None else None
        if entry is None:
            key = self.cache.key_of_vllm_identifier(identifier, self.served.model_id)
            entry = self.cache.get_key(key) if key is not None else None
        if entry is None:
            return Verdict(identifier, None, None, "not in the cache", False)
        try:
            check_rows(entry)
            tensor = vllm_ec_tensor(entry)
        except ServingFormatError as exc:
            return Verdict(identifier, entry.key, None, str(exc), True)
        reason = None
        if tensor.ndim != 2:
            reason = f"its tensor has shape {list(tensor.shape)}, not [rows, width]"
        elif tensor.shape[0] != rows:
            reason = f"it has {tensor.shape[0]} rows and the request's placeholder has {rows}"
        elif tensor.shape[1] != self.served.width:
            reason = f"its width is {tensor.shape[1]}, the served model's is {self.served.width}"
        elif not tensor.dtype.is_floating_point:
            reason = f"its dtype is {tensor.dtype}, not floating point"
        if reason is not None:
            return Verdict(identifier, entry.key, None, f"entry {entry.key}: {reason}", True)
        if tensor.dtype != self.served.dtype:
            tensor = tensor.to(self.served.dtype)
        return Verdict(identifier, entry.key, tensor, None, True)

    def close(self) -> None:
        self.cache.close()
