"""Where a model comes from: a builtin, a local directory or a hub id pinned to a commit; its config and image processor.

Every load error becomes a ModelLoadError with a one-paragraph reason (`reason_of`). A hub id is
probed with one request, without the hub client's retries (minutes of backoff under cron when the hub
is unreachable): an unreachable hub or an unknown id fails in seconds with what to do instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import ModelLoadError
from mmprep.models.builtin import builtin_model_dir

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
HUB_PROBE_TIMEOUT_S = 10.0  # the one request that asks the hub whether a model exists
_USE_A_DIRECTORY = "pass a local model directory with --model DIR"


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

    _probe_hub(name, revision)
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


def model_directory(name: str, revision: str | None = None) -> Path:
    """The directory a model name resolves to: a builtin's (built on first use), a local directory, or a
    hub id's snapshot in the local hub cache (never downloaded here); ModelLoadError otherwise."""
    if name.startswith("builtin:") or Path(name).expanduser().is_dir():
        return Path(resolve_source(name, revision).location)
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or Path(name).exists():
        raise ModelLoadError(f"model directory not found: {name}")
    from huggingface_hub import try_to_load_from_cache

    try:
        config_file = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception as exc:  # a malformed repo id
        raise ModelLoadError(f"not a model name: {name!r}: {reason_of(exc)}") from exc
    if not isinstance(config_file, str):
        raise ModelLoadError(
            f"{name!r} is not in the local hub cache; download it first (hf download {name}) or {_USE_A_DIRECTORY}"
        )
    return Path(config_file).parent


def _probe_hub(name: str, revision: str | None) -> None:
    """Ask the hub once, without retries, whether `name` has a config.json; raise ModelLoadError saying
    what to do when it has none, is unknown or the hub cannot be reached and the model is not cached."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HFValidationError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )  # fmt: skip

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelLoadError(
                f"cannot load model {name!r}: it is not in the local hub cache and HF_HUB_OFFLINE is set; "
                f"unset HF_HUB_OFFLINE to download it, or {_USE_A_DIRECTORY}"
            )
        return
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"cannot load model {name!r}: it is gated; accept its terms on the hub and set HF_TOKEN "
            f"(or run `hf auth login`), or {_USE_A_DIRECTORY}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"cannot load model {name!r}: no such model on the hub (a private one needs HF_TOKEN or "
            f"`hf auth login`); check the name, or {_USE_A_DIRECTORY}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: the hub has no revision {revision!r}") from exc
    except EntryNotFoundError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: the repository has no config.json") from exc
    except HFValidationError as exc:
        raise ModelLoadError(f"not a model name or directory: {name!r}") from exc
    except Exception as exc:  # no network, DNS, a timeout, hub down (its HTTP client's own error types vary)
        if cached:
            return  # as the hub client does: the cached snapshot serves when the hub cannot be reached
        raise ModelLoadError(
            f"cannot load model {name!r}: the model hub cannot be reached ({type(exc).__name__}) and the model "
            f"is not in the local hub cache; {_USE_A_DIRECTORY}, download it where the hub is reachable, "
            f"or set HF_HUB_OFFLINE=1 to use cached models only"
        ) from exc


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


def reason_of(exc: BaseException) -> str:
    """A one-paragraph reason from an exception (hub errors carry long multi-line texts)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"
