"""Orchestration: the loading half shared by encode and check (core), the full encode run, the check run.

The names are imported on first use (PEP 562), so `mmprep check --size` loads the check run without the
encode run's torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmprep.pipeline.check import CheckRun, CheckSummary
    from mmprep.pipeline.core import RunCounters
    from mmprep.pipeline.encode import EncodeRun
    from mmprep.pipeline.writer import RunSummary

_HOMES = {
    "CheckRun": "check",
    "CheckSummary": "check",
    "RunCounters": "core",
    "EncodeRun": "encode",
    "RunSummary": "writer",
}
__all__ = ["CheckRun", "CheckSummary", "EncodeRun", "RunCounters", "RunSummary"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmprep.pipeline.{home}"), name)
