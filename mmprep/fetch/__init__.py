"""The FETCH stage: turn a manifest URL into bytes, safely.

`Fetcher.fetch` loads https (http with allow_http), data:image/...;base64 URLs and files under the
allowed local directories. `UrlPolicy` decides what may be loaded (default deny, checked again on
every address actually connected to). Every failure is a `RowError` with a specific kind.
"""

from __future__ import annotations

from mmprep.fetch.fetcher import Fetched, Fetcher
from mmprep.fetch.policy import DataTarget, FileTarget, HttpTarget, Target, UrlPolicy

__all__ = ["DataTarget", "Fetched", "Fetcher", "FileTarget", "HttpTarget", "Target", "UrlPolicy"]
