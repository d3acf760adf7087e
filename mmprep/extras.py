"""Optional dependencies: import one, or fail with the `pip install 'mmprep[extra]'` line that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from mmprep.errors import MissingExtraError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, imported; MissingExtraError naming `extra` when it is not installed (`purpose`: what needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.partition(".")[0]
        raise MissingExtraError(f"{purpose} needs {top}: pip install 'mmprep[{extra}]'") from None
