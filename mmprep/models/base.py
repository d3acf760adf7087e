"""What every model family shares: the Encoder interface, where a model comes from, device/dtype, fingerprint.

Each family module (pooled, qwen2_vl, llava) only says how to load its modules and how to run one
batched forward; resolving the name, the device, the dtype, the image processor and the fingerprint
happens here, once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from mmprep.errors import ErrorKind, ModelLoadError, RowError
from mmprep.imaging.fastprep import fast_path_for

logger = logging.getLogger("mmprep.models")

# Bump when the tensors an encoder stores change for the same model (keys, shapes, post-processing),
# so entries written by an older mmprep are not mistaken for current ones.
OUTPUT_FORMAT_VERSION = 1

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Config keys that say where/when/how a model was saved or loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "_experts_implementation",
    }
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SAMPLE_BYTES = 1024 * 1024
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a local directory, or a hub repo pinned to one commit."""

    name: str  # as the user gave it
    location: str  # what from_pretrained gets: a directory path or a hub repo id
    revision: str | None  # hub commit hash; None for a local directory
    builtin: bool = False  # one of mmprep's random-weight smoke-test models

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Arguments that make every from_pretrained call read the very same files."""
        return {} if self.revision is None else {"revision": self.revision}


def resolve_source(name: str, revision: str | None = None) -> ModelSource:
    """Turn a model name into a local directory or a hub id pinned to the commit its config came from."""
    if name.startswith("builtin:"):
        from mmprep.models.builtin import builtin_model_dir

        if revision is not None:
            raise ModelLoadError(f"--revision applies to hub models only; {name!r} is a builtin model")
        return ModelSource(name, str(builtin_model_dir(name.removeprefix("builtin:"))), None, builtin=True)
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ModelLoadError(f"--revision applies to hub models only; {name!r} is a local directory")
        return ModelSource(name, str(path.resolve()), None)
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise ModelLoadError(f"model directory not found: {name}")
    from transformers.utils import cached_file

    try:
        config_file = cached_file(name, "config.json", revision=revision)
    except Exception as exc:  # offline and not cached, unknown repo, bad revision, network down
        raise ModelLoadError(f"cannot load model {name!r}: {reason_of(exc)}") from exc
    if config_file is None:
        raise ModelLoadError(f"cannot load model {name!r}: the repository has no config.json")
    snapshot = Path(config_file).parent
    commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
    if commit is None or not _COMMIT_RE.match(commit):
        raise ModelLoadError(f"cannot pin model {name!r} to a commit (config at {config_file})")
    return ModelSource(name, name, commit)


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda'/'cuda:N' must exist, so a typo fails before any work."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", spec):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {spec!r} requested but CUDA is not available (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise ModelLoadError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU, bfloat16 on CUDA where supported, else float16."""
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise ModelLoadError(f"unknown dtype {spec!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_config(source: ModelSource) -> Any:
    """The model's transformers config, or ModelLoadError with the reason."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.pretrained_kwargs())
    except Exception as exc:
        raise ModelLoadError(f"cannot load model config of {source.name!r}: {reason_of(exc)}") from exc


def load_image_processor(source: ModelSource) -> Any:
    """The model's image processor via AutoImageProcessor, as transformers itself would pick it.

    Without torchvision transformers v5 falls back to the PIL backend anyway; asking for it explicitly
    only silences the fallback warning. With torchvision the default (torchvision) backend is used, like
    a direct `AutoImageProcessor.from_pretrained` would; its class name is part of the fingerprint.
    """
    import transformers
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    kwargs = source.pretrained_kwargs()
    if int(transformers.__version__.split(".")[0]) >= 5 and not is_torchvision_available():
        kwargs["backend"] = "pil"
    try:
        return AutoImageProcessor.from_pretrained(source.location, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the image processor of {source.name!r}: {reason_of(exc)}") from exc


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading a part of a checkpoint (we check missing keys ourselves)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def canonical_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that say where/when it was saved; nested sub-configs too."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(config_dict)


def weights_identity(source: ModelSource) -> dict[str, Any]:
    """What names the weights: the hub commit, or for a directory a sampled hash of each weight file.

    The sampled hash covers, per weight file (sorted by name): its name, its size, its safetensors
    header (the JSON with every tensor's name, dtype, shape and offsets) and the sha256 of its first
    and last 1 MiB. Reading whole multi-GB files on every start would cost seconds to minutes; the
    sample still changes with any retraining, re-export, dtype change or truncation, though an edit
    confined to the middle of a file that keeps the size and header would go unnoticed.
    """
    if source.revision is not None:
        return {"hub": source.location, "commit": source.revision}
    files = []
    for path in sorted(Path(source.location).iterdir()):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            files.append(_sampled_file_hash(path))
    if not files:
        raise ModelLoadError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {source.location}")
    return {"files": files}


def _sampled_file_hash(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size - 8)))
            f.seek(0)
        digest.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return {"name": path.name, "size": size, "sha256_sampled": digest.hexdigest()}


def fingerprint(
    *,
    family: str,
    architecture: str,
    config: Any,
    image_processor: Any,
    dtype: torch.dtype,
    weights: dict[str, Any],
    decode: dict[str, object] | None = None,
    image_call: dict[str, Any] | None = None,
) -> str:
    """sha256 of everything that determines the stored tensors, so a cache never mixes two models' outputs.
    `decode`: the pixel-changing decode options in use (`decode.pixel_options`); `image_call`: the arguments
    the image processor is called with (`ImageOptions.call_kwargs`); empty ones leave the hash as is."""
    facts = {
        "output_format": OUTPUT_FORMAT_VERSION,
        "family": family,
        "architecture": architecture,
        "config": canonical_config(config.to_dict()),
        "image_processor_class": type(image_processor).__name__,
        "image_processor": canonical_config(image_processor.to_dict()),
        "dtype": dtype_name(dtype),
        "weights": weights,
    }
    if decode:
        facts["decode"] = decode
    if image_call:
        facts["image_call"] = image_call
    blob = json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def output_of(result: Any) -> Any:
    """The features from a get_image_features-like call: a tensor (older transformers) or `.pooler_output`."""
    if isinstance(result, torch.Tensor):
        return result
    pooled = getattr(result, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find image features in a {type(result).__name__}")
    return pooled


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its storage (a view of a batch would pin the whole batch in memory)."""
    return tensor.to("cpu").clone(memory_format=torch.contiguous_format)


def processor_input_size(processor: Any) -> tuple[int, int] | None:
    """The (W, H) a processor resizes every image to; None when it depends on the image (dynamic resolution)."""
    size = getattr(processor, "size", None)
    if size is None or not getattr(processor, "do_resize", True):
        return None
    get = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
    if get("height") and get("width"):
        return int(get("width")), int(get("height"))
    if get("shortest_edge") and not get("longest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    return None  # longest_edge / pixel budgets (Qwen2-VL) / patch budgets (SigLIP 2 NaFlex)


def processor_image_defaults(config: Any) -> dict[str, Any]:
    """The image-processor arguments the model's full transformers processor passes on every call, e.g.
    InternVLProcessor's crop_to_patches=True: its class-level `images_kwargs` (transformers >= 5.2x) and
    the `_defaults["images_kwargs"]` of its `<Processor>Kwargs` (earlier versions). They override the image
    processor's own config (preprocessor_config.json) in `ProcessorMixin._merge_kwargs`, so an encoder that
    calls the image processor alone must pass them to see the pixels serving (transformers, vLLM) sees."""
    import importlib

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    processor_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if processor_class is None:
        return {}
    defaults = dict(getattr(processor_class, "images_kwargs", None) or {})
    with warnings.catch_warnings():  # newer transformers keep `<Processor>Kwargs` as a deprecated alias
        warnings.simplefilter("ignore", FutureWarning)
        kwargs_class = getattr(importlib.import_module(processor_class.__module__), f"{processor_class.__name__}Kwargs", None)
    defaults.update((getattr(kwargs_class, "_defaults", None) or {}).get("images_kwargs", {}))  # applied after, as there
    defaults.pop("return_tensors", None)  # we ask for "pt" ourselves
    return defaults


@dataclass(frozen=True)
class ImageOptions:
    """How a family calls its image processor: extra arguments, and whether every image ends up one fixed size."""

    call_kwargs: dict[str, Any] = field(default_factory=dict)  # part of the fingerprint
    fixed_size: bool = True  # False: tiles / crops / grids follow the image, so --fast-decode has no target size
    record_size: bool = False  # add "image_sizes" [[height, width]] (what a tiling family's token count follows)


class ImagePreprocessor:
    """A model's image processor applied to one image at a time, safely from many threads."""

    def __init__(
        self,
        processor: Any,
        select: Callable[[Any], Sequence[str]] | None = None,
        options: ImageOptions | None = None,
        *,
        fast: bool = True,
    ) -> None:
        self._processor = processor
        self._select = select
        self._options = options or ImageOptions()
        self._local = threading.local()
        # The exact fast path when one mirrors this processor (bit-identical outputs, so the fingerprint,
        # which names the processor's class and config, stays as it is); else the processor itself.
        self._fast = fast_path_for(processor, self._options.call_kwargs) if fast else None

    @property
    def fast_path(self) -> str | None:
        """The name of the exact fast path in use, or None when the transformers processor runs."""
        return type(self._fast).__name__ if self._fast is not None else None

    def input_size(self) -> tuple[int, int] | None:
        """The (W, H) every image is resized to, for --fast-decode; None for dynamic resolution."""
        return processor_input_size(self._processor) if self._options.fixed_size else None

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        try:
            batch = dict(self._fast(image) if self._fast is not None else self._transformers(image))
            if self._options.record_size and "image_sizes" not in batch:
                batch["image_sizes"] = torch.tensor([[image.height, image.width]], dtype=torch.int64)
            names = self._select(batch) if self._select is not None else list(batch.keys())
            return {key: batch[key] for key in names}
        except Exception as exc:
            raise RowError(ErrorKind.PREPROCESS_ERROR, f"{type(exc).__name__}: {exc}") from exc

    def _transformers(self, image: Image.Image) -> Any:
        processor = getattr(self._local, "processor", None)
        if processor is None:  # each thread gets its own copy: processors are not documented thread-safe
            processor = self._local.processor = copy.deepcopy(self._processor)
        return processor(images=image, return_tensors="pt", **self._options.call_kwargs)


class Encoder(ABC):
    """A loaded vision model: per-image preprocessing on worker threads, batched encoding on the model thread."""

    family: ClassVar[str]

    def __init__(
        self,
        *,
        source: ModelSource,
        config: Any,
        image_processor: Any,
        architecture: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name = source.name
        self.source = source
        self.config = config
        self.architecture = architecture
        self.device = device
        self.dtype = dtype
        self._image_processor = image_processor
        self.image_options = self.image_options_for(config, image_processor)
        self._preprocessor = self.preprocessor_for(config, image_processor)
        self._weights = weights_identity(source)
        self.set_decode_options({})

    def set_decode_options(self, options: dict[str, object]) -> None:
        """Declare the pixel-changing decode options (`decode.pixel_options`) this encoder's images go
        through: they change the embeddings, so they are part of the fingerprint."""
        self.decode_options = dict(options)
        self.fingerprint, self.base_fingerprint = self.fingerprints_for(
            self.architecture, self.config, self._image_processor, self.dtype, self._weights, self.decode_options
        )

    @classmethod
    def fingerprints_for(
        cls, architecture: str, config: Any, image_processor: Any, dtype: torch.dtype, weights: dict[str, Any],
        decode_options: dict[str, object],
    ) -> tuple[str, str]:  # fmt: skip
        """(fingerprint, base fingerprint) of this family's encoder: known before its weights load (the
        base one is the same model decoded without options, the `pil` profile: what ties decode variants together)."""
        facts = dict(
            family=cls.family,
            architecture=architecture,
            config=config,
            image_processor=image_processor,
            dtype=dtype,
            weights=weights,
            image_call=cls.image_options_for(config, image_processor).call_kwargs,
        )
        return fingerprint(**facts, decode=decode_options), fingerprint(**facts)

    @classmethod
    def preprocessor_for(cls, config: Any, image_processor: Any) -> ImagePreprocessor:
        """The image processor as this family calls it, keeping the inputs its forward takes (no weights needed)."""
        return ImagePreprocessor(image_processor, cls.input_names, cls.image_options_for(config, image_processor))

    @classmethod
    def image_options_for(cls, config: Any, image_processor: Any) -> ImageOptions:
        """How this family calls its image processor (default: as configured, fixed size if it has one)."""
        return ImageOptions()

    @classmethod
    def assemble(
        cls, source: ModelSource, config: Any, image_processor: Any, architecture: str, device: torch.device,
        dtype: torch.dtype, **modules: Any,
    ) -> Any:  # fmt: skip
        """This family's encoder around its loaded `modules` (the plumbing every family's `load` shares)."""
        return cls(source=source, config=config, image_processor=image_processor, architecture=architecture,
                   device=device, dtype=dtype, **modules)  # fmt: skip

    # -- worker threads --------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Run the model's image processor on one RGB image (CPU, thread-safe; called from decode worker threads)."""
        return self._preprocessor(image)

    @classmethod
    def input_names(cls, processed: Any) -> Sequence[str]:
        """Which of the processor's outputs the forward needs (default: all of them)."""
        return list(processed.keys())

    def input_size(self) -> tuple[int, int] | None:
        """The (W, H) the processor resizes every image to (bounds --fast-decode); None for dynamic resolution."""
        return self._preprocessor.input_size()

    # -- model thread ----------------------------------------------------------------------------

    @abstractmethod
    def encode(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One batched forward under torch.inference_mode(); per image {"embeddings": T, ...} as owned CPU tensors."""

    def to_device(self, tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Concatenate per-image tensors on dim 0 and move them to the model's device (pinned, non-blocking on CUDA)."""
        if self.device.type == "cuda":
            shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
            staged = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
            torch.cat(tensors, out=staged)
            batch = staged.to(self.device, non_blocking=True)
        else:
            batch = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch

    # -- facts -----------------------------------------------------------------------------------

    @abstractmethod
    def output_shape(self) -> list[int | str]:
        """The per-image "embeddings" shape, symbolic where it depends on the image (e.g. ["n_tokens", 3584])."""

    def extra_outputs(self) -> dict[str, dict[str, object]]:
        """The tensors stored per image besides "embeddings": name -> {"shape": symbolic, "dtype": name}."""
        return {}

    def describe(self) -> dict[str, object]:
        """JSON-able facts for the index's models table."""
        facts: dict[str, object] = {
            "name": self.name,
            "family": self.family,
            "architecture": self.architecture,
            "revision": self.source.revision,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "output": {
                "embeddings": {"shape": self.output_shape(), "dtype": dtype_name(self.dtype)},
                **self.extra_outputs(),
            },
            "image_processor": type(self._image_processor).__name__,
            "output_format": OUTPUT_FORMAT_VERSION,
        }
        if self.decode_options:
            facts["decode"] = self.decode_options
            facts["base_fingerprint"] = self.base_fingerprint
        if self.source.builtin:
            facts["note"] = "smoke-test model with random weights"
        return facts


def reason_of(exc: BaseException) -> str:
    """A one-paragraph reason from an exception (hub errors carry long multi-line texts)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"
