"""Where a model comes from: a builtin, a local directory or a hub id pinned to a commit; its config and image processor.

Every load error becomes a ModelLoadError with a one-paragraph reason (`reason_of`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import ModelLoadError
from mmprep.models.builtin import builtin_model_dir

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
