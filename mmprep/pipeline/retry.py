"""Which earlier failures a run tries again (the failure policy of `encode`).

Retryable failures (timeouts, connection errors, 429 and 5xx) are tried again by every run. A permanent
one is skipped, unless
- its kind depends on the run's settings (URL policy, formats, size and pixel limits, redirects) and those
  settings changed since it was recorded, or were never recorded (a failure from an index of schema 1);
- it last failed longer ago than `--retry-permanent-after` (default 7 days): a dead link that comes back
  is picked up, and an old failure stops counting as one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmprep.errors import ErrorKind
from mmprep.settings import LoadSettings
from mmprep.store.index import KeyState

# The LoadSettings fields whose change may turn each kind of failure into a success.
KIND_SETTINGS: dict[str, tuple[str, ...]] = {
    ErrorKind.BAD_SCHEME.value: ("allow_http",),
    ErrorKind.BAD_PATH.value: ("allow_local_dirs",),
    ErrorKind.BLOCKED_URL.value: ("allow_private_network", "allow_hosts", "deny_hosts"),
    ErrorKind.TOO_LARGE.value: ("max_bytes",),
    ErrorKind.IMAGE_TOO_LARGE.value: ("max_pixels", "max_side"),
    ErrorKind.UNSUPPORTED_FORMAT.value: ("formats",),
    ErrorKind.TOO_MANY_REDIRECTS.value: ("max_redirects",),
    ErrorKind.TIMEOUT.value: ("timeout",),
}


def _plain(value: object) -> object:
    """A setting's value as stable JSON: sets of names sorted, paths as text."""
    if isinstance(value, tuple):
        return sorted(str(v) for v in value)
    return str(value) if isinstance(value, Path) else value


def settings_depended_on(load: LoadSettings) -> dict[str, str]:
    """For each settings-dependent kind, the JSON of the settings it depends on in this run (stored with its failures)."""
    return {
        kind: json.dumps({name: _plain(getattr(load, name)) for name in names}, sort_keys=True, separators=(",", ":"))
        for kind, names in KIND_SETTINGS.items()
    }


class FailurePolicy:
    """Decides, from what the index knows of a key's earlier failure, whether this run tries it again."""

    def __init__(self, load: LoadSettings, retry_permanent_after: float | None) -> None:
        self.depends = settings_depended_on(load)
        self.expired_before = None if retry_permanent_after is None else time.time() - retry_permanent_after

    def retries(self, state: KeyState) -> bool:
        """True for a retryable failure, one whose settings changed, and one past --retry-permanent-after."""
        if state.failed_retryable:
            return True
        current = self.depends.get(state.failed_kind or "")
        if current is not None and state.failed_depends != current:
            return True
        return (
            self.expired_before is not None
            and state.failed_seen is not None
            and state.failed_seen <= self.expired_before
        )
