"""`MmprepECConnector`: a vLLM encoder-cache connector that serves image embeddings straight from an mmprep cache.

A stock vLLM loads it by module path (vllm/distributed/ec_transfer/ec_connector/factory.py):

    vllm serve MODEL --ec-transfer-config '{"ec_connector": "MmprepECConnector",
      "ec_connector_module_path": "mmprep.serving.vllm_connector", "ec_role": "ec_consumer",
      "ec_connector_extra_config": {"cache_dir": "/data/mmprep-cache", "model": "<name or fingerprint prefix>"}}'

(`model` is optional when the cache holds one model; `log_interval_s`, default 10, spaces the INFO
line `mmprep connector: <H> hits, <M> misses, <R> rejected`.) mmprep must be importable by vLLM's
python (installed there, or on its PYTHONPATH); this module imports nothing heavier than torch and
the cache reader.

Scheduler side: the first time the scheduler asks about a request (`ensure_cache_available`), each of
its images is looked up (by the request's uuid, an mmprep entry key, or by vLLM's own identifier as
`encode --vllm-model-id` recorded it) and checked against the placeholder vLLM reserved and the served
model (`EcSource`); a checked tensor is held for the request's lifetime, so what was checked is what
is loaded, whatever gc does meanwhile. An image that misses or fails a check runs vLLM's encoder, as
without a connector (a rejected entry logs one WARNING naming its key). A metadata-only image part
(no pixels to fall back on) that misses or fails fails its request alone (`take_unavailable_requests`),
with an ERROR naming the uuid; the engine carries on. Worker side: the held tensors come with the
step's metadata and are put in the runner's encoder cache. User guide:
docs/serving.md#serve-straight-from-the-cache-mmprepecconnector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorStats
from vllm.logger import init_logger
from vllm.platforms import current_platform

from mmprep.serving.ec_source import EcSource, ServedModel, Verdict

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.multimodal.inputs import MultiModalFeatureSpec
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["PROVEN_FAMILIES", "PROVEN_VLLM_VERSIONS", "MmprepECConnector", "MmprepECMetadata", "MmprepECStats"]

PROVEN_VLLM_VERSIONS = ("0.32.0",)  # the interop tier (tests/interop/test_vllm_connector*.py) ran on these
# Families the interop tier serves through this connector on a real vLLM (docs/serving.md has the table);
# InternVL and GLM-4.1V have layouts but vLLM's CPU build cannot start them without torchvision.
PROVEN_FAMILIES = frozenset({"qwen2_vl", "qwen3_vl", "qwen3_5", "llava", "llava_next", "gemma3"})
LOG_INTERVAL_S = 10.0

# Under "vllm": vLLM configures that logger tree (handler, format, VLLM_LOGGING_LEVEL); a logger named after
# this module would have no handler, and its INFO lines would be lost.
logger = init_logger("vllm.mmprep.connector")


@dataclass
class MmprepECMetadata(ECConnectorMetadata):
    """One step's loads, scheduler -> worker: identifier -> the checked tensor (CPU, served dtype)."""

    loads: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MmprepECStats(ECConnectorStats):
    """Hits, misses and rejected entries since the last report, in vLLM's EC connector stats."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: ECConnectorStats) -> ECConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {f"mmprep_{name}": value for name, value in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.values())


def served_model(vllm_config: VllmConfig) -> ServedModel:
    """The served model as the checks see it: one image's encoder-output width, dtype, architecture, --model."""
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    width = model_config.get_hidden_size()
    vision = getattr(hf_config, "vision_config", None)
    deepstack = getattr(vision, "deepstack_visual_indexes", None) or ()
    width *= 1 + len(deepstack)  # Qwen3-VL: merged tokens and each deepstack level, side by side
    return ServedModel(
        width, model_config.dtype, tuple(getattr(hf_config, "architectures", None) or ()), model_config.model
    )


def _carries_image(feature: MultiModalFeatureSpec) -> bool:
    """Whether vLLM could encode this item itself: it has pixels or inline embeddings (not metadata only)."""
    data = feature.data
    if data is None:  # not filled in: assume the image is there (vLLM's own behaviour without a connector)
        return True
    return any(name.startswith("pixel_values") or name.endswith("_embeds") for name in data)


def _warn_unproven_version() -> None:
    version = str(getattr(vllm, "__version__", "unknown"))
    if version.split("+")[0] not in PROVEN_VLLM_VERSIONS:
        logger.warning(
            "mmprep connector: proven with vLLM %s only; this is vLLM %s. Its encoder-cache connector API may "
            "differ: check a few requests against the encoder before relying on it.",
            ", ".join(PROVEN_VLLM_VERSIONS), version,
        )  # fmt: skip


class MmprepECConnector(ECConnectorBase):
    """vLLM encoder-cache consumer reading an mmprep cache in place (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        transfer = vllm_config.ec_transfer_config
        extra: dict[str, Any] = dict(transfer.ec_connector_extra_config or {}) if transfer is not None else {}
        if not extra.get("cache_dir"):
            raise ValueError(
                'MmprepECConnector needs "cache_dir" (the mmprep cache directory) in ec_connector_extra_config'
            )
        _warn_unproven_version()
        self._log_interval = float(extra.get("log_interval_s", LOG_INTERVAL_S))
        self._source: EcSource | None = None
        self._held: dict[str, tuple[torch.Tensor, int]] = {}  # identifier -> (checked tensor, requests holding it)
        self._requests: dict[str, list[str]] = {}  # request id -> the identifiers it holds
        self._loads: dict[str, torch.Tensor] = {}  # this step's loads, for build_connector_meta
        self._failed: set[str] = set()  # requests that cannot be served (until they finish)
        self._to_fail: set[str] = set()  # ... not yet handed to the scheduler
        self._totals = {"hits": 0, "misses": 0, "rejected": 0}
        self._unreported = dict.fromkeys(self._totals, 0)  # for get_ec_connector_stats
        self._logged: tuple[int, int, int] | None = None
        self._last_log = 0.0
        if role == ECConnectorRole.SCHEDULER:  # the worker only receives checked tensors
            self._source = EcSource(extra["cache_dir"], extra.get("model"), served_model(vllm_config))
            cache = self._source.cache
            logger.info(
                "mmprep connector: serving %s (%s, %s) from %s", cache.model_name, cache.fingerprint[:16],
                cache.family, extra["cache_dir"],
            )  # fmt: skip
            if (note := self._source.identity_note) is not None:
                logger.warning("mmprep connector: %s", note)
            if cache.family not in PROVEN_FAMILIES:
                logger.warning(
                    "mmprep connector: %s entries are not proven on a real vLLM by mmprep's tests (proven: %s); "
                    "check a few requests against the encoder before relying on it.",
                    cache.family, ", ".join(sorted(PROVEN_FAMILIES)),
                )  # fmt: skip

    # -- scheduler side ------------------------------------------------------------------------

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        """Check the request's images once; False (never scheduled, then failed) when it cannot be served."""
        request_id = request.request_id
        if request_id not in self._requests and request_id not in self._failed:
            self._check(request)
        return request_id not in self._failed

    def has_cache_item(self, identifier: str) -> bool:
        return identifier in self._held

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        identifier = request.mm_features[index].identifier
        held = self._held.get(identifier)
        if held is not None:
            self._loads[identifier] = held[0]

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        meta = MmprepECMetadata(self._loads)
        self._loads = {}
        return meta

    def take_unavailable_requests(self) -> set[str]:
        failed, self._to_fail = self._to_fail, set()
        return failed

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        self._failed.discard(request.request_id)
        for identifier in self._requests.pop(request.request_id, ()):
            tensor, holders = self._held[identifier]
            if holders > 1:
                self._held[identifier] = (tensor, holders - 1)
            else:
                del self._held[identifier]
        return False, None

    def get_ec_connector_stats(self) -> ECConnectorStats | None:
        if not any(self._unreported.values()):
            return None
        stats, self._unreported = MmprepECStats(data=dict(self._unreported)), dict.fromkeys(self._totals, 0)
        return stats

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECConnectorStats | None:
        return MmprepECStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._source is not None:  # the scheduler side: the final totals, then the cache
            self._log_totals(force=True)
            self._source.close()

    def _check(self, request: Request) -> None:
        """Look up and check each image of a request seen for the first time; hold the hits."""
        assert self._source is not None, "the scheduler-side connector checks requests"
        held: list[str] = []
        failure: str | None = None
        for index, feature in enumerate(request.mm_features):
            if feature.modality != "image":
                continue
            verdict = self._verdict(feature.identifier, request.get_num_encoder_embeds(index))
            held_by_others = self._held.get(feature.identifier)
            if held_by_others is not None and (
                verdict.tensor is None or held_by_others[0].shape != verdict.tensor.shape
            ):
                # Another request holds a different tensor under this identifier (a uuid reused for other
                # content, or an entry re-encoded meanwhile): vLLM would load that one for this image.
                self._count("rejected")
                failure = failure or (
                    f"mmprep connector: request {request.request_id} fails: its image uuid {feature.identifier} names "
                    "another image's embedding in a request still running (a uuid reused for different content)"
                )
                continue
            if verdict.tensor is not None:
                self._count("hits")
                tensor, holders = held_by_others or (verdict.tensor, 0)
                self._held[feature.identifier] = (tensor, holders + 1)
                held.append(feature.identifier)
                logger.debug(
                    "mmprep connector: hit %s (entry %s) for request %s",
                    feature.identifier,
                    verdict.key,
                    request.request_id,
                )
                continue
            self._count("rejected" if verdict.found else "misses")
            if not _carries_image(feature):
                failure = failure or (
                    f"mmprep connector: request {request.request_id} fails: its image uuid {feature.identifier} is "
                    f"metadata-only (no pixels for vLLM's encoder) and {verdict.reason}"
                )
            elif verdict.found:
                logger.warning(
                    "mmprep connector: entry %s rejected (%s); vLLM encodes this image itself",
                    verdict.key,
                    verdict.reason,
                )
        self._requests[request.request_id] = held
        if failure is not None:
            logger.error(failure)
            self._failed.add(request.request_id)
            self._to_fail.add(request.request_id)
        self._log_totals()

    def _verdict(self, identifier: str, rows: int) -> Verdict:
        assert self._source is not None
        try:
            return self._source.check(identifier, rows)
        except Exception as exc:  # an unreadable index or shard: a miss, never a dead engine
            logger.warning(
                "mmprep connector: cannot read the cache for %s: %s: %s", identifier, type(exc).__name__, exc
            )
            return Verdict(identifier, None, None, f"the cache could not be read ({type(exc).__name__})", False)

    def _count(self, name: str) -> None:
        self._totals[name] += 1
        self._unreported[name] += 1

    def _log_totals(self, *, force: bool = False) -> None:
        """The running totals at INFO, at most every log_interval_s (and once more at shutdown)."""
        totals = (self._totals["hits"], self._totals["misses"], self._totals["rejected"])
        now = time.monotonic()
        if totals == self._logged or not (force or now - self._last_log >= self._log_interval):
            return
        logger.info("mmprep connector: %d hits, %d misses, %d rejected", *totals)
        self._logged, self._last_log = totals, now

    # -- worker side ---------------------------------------------------------------------------

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Put this step's checked tensors in the runner's encoder cache, on its device."""
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, MmprepECMetadata)
        device = current_platform.device_type
        if current_platform.is_cuda_alike():  # a bare "cuda" is cuda:0: stay on this worker's device
            device = f"{device}:{current_platform.current_device()}"
        for identifier, tensor in metadata.loads.items():
            if identifier not in encoder_cache:
                encoder_cache[identifier] = tensor.to(device)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        """A consumer only: nothing is ever written to the cache from vLLM."""
        return None
