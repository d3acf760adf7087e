"""Orchestration: the loading half shared by encode and check (core), the full encode run, the check run."""

from mmprep.pipeline.check import CheckRun, CheckSummary
from mmprep.pipeline.core import RunCounters
from mmprep.pipeline.encode import EncodeRun, RunSummary

__all__ = ["CheckRun", "CheckSummary", "EncodeRun", "RunCounters", "RunSummary"]
