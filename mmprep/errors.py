"""Error kinds and exception classes.

Every row that cannot be turned into an embedding ends as a `RowError` with a stable `ErrorKind`;
the run records it and carries on. Problems that stop a run before any work are `UsageError`s.
"""

from __future__ import annotations

from enum import Enum

# The commands' exit codes (docs/cli.md#exit-codes), in one place.
EXIT_OK, EXIT_ROWS_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 130, 143
EXIT_USAGE = 2  # a usage error, or a model that cannot load (also when its weights fail once the run has started)
EXIT_RUN_FAILED = 70  # EX_SOFTWARE: the run gave up before its end (what was committed stays)
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the cache; try again later
EXIT_EMPTY = 66  # EX_NOINPUT: the manifests hold no row (an empty or truncated file); --allow-empty makes it 0


class ErrorKind(str, Enum):
    """The documented, stable set of per-row error kinds (docs/operations.md#error-kinds)."""

    BAD_MANIFEST_LINE = "bad_manifest_line"  # invalid JSON, no URL, wrong types
    BAD_SCHEME = "bad_scheme"  # not https/http/data/allowed local file
    BAD_DATA_URL = "bad_data_url"  # data: URL that is not image/*;base64 or not valid base64
    BAD_PATH = "bad_path"  # local path missing, unreadable, or outside --allow-local-dir
    BLOCKED_URL = "blocked_url"  # the URL policy refused the destination (SSRF guard)
    HTTP_STATUS = "http_status"  # the server answered with an error status
    NOT_AN_IMAGE = "not_an_image"  # the body is HTML/JSON/text (e.g. an error page)
    TIMEOUT = "timeout"  # connect/read timeout or the per-row deadline passed
    CONNECTION_ERROR = "connection_error"  # DNS failure, refused, reset, TLS error
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"  # body larger than --max-bytes
    BAD_ENCODING = "bad_encoding"  # Content-Encoding unknown or stacked too deep, or a body that does not decode
    IMAGE_TOO_LARGE = "image_too_large"  # pixels over --max-pixels / --max-side, or a decompression bomb
    UNSUPPORTED_FORMAT = "unsupported_format"  # bytes are not one of the allowed --formats
    DECODE_ERROR = "decode_error"  # truncated or corrupt image data
    PREPROCESS_ERROR = "preprocess_error"  # the model's image processor rejected the image
    ENCODE_ERROR = "encode_error"  # the model forward failed for this image
    INTERNAL_ERROR = "internal_error"  # a bug in mmprep; please report it

    @property
    def retryable(self) -> bool:
        """Whether a later run may succeed on the same input (network weather, not bad data)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION_ERROR, ErrorKind.INTERNAL_ERROR})


class MmprepError(Exception):
    """Base class of every error mmprep raises on purpose."""


class RowError(MmprepError):
    """One row failed; the run records `kind` and `message` and goes on.

    `retryable` overrides the kind's default (e.g. HTTP 429/5xx are retryable `http_status`).
    `status` carries the HTTP status code for `http_status`.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.retryable = kind.retryable if retryable is None else retryable
        self.status = status
        self.attempts = attempts


class UsageError(MmprepError):
    """The run cannot start: bad flag, unreadable manifest, unloadable model (exit code 2)."""


class CacheVersionError(UsageError):
    """The cache's index was written by a newer mmprep, whose tables this version cannot vouch for."""


class IndexUnreadableError(UsageError):
    """The cache's index.sqlite is not a readable SQLite database (`mmprep index rebuild` recreates it)."""


class ModelLoadError(UsageError):
    """The model could not be loaded or its family is not supported."""


class CacheWriteError(MmprepError):
    """The cache directory cannot be written (disk full, I/O error) before the run could start (exit code 70)."""


class EmptyManifestError(MmprepError):
    """The manifests hold no row at all, so a nightly run would be green while doing nothing (exit code 66)."""


class CacheLockedError(MmprepError):
    """Another process holds the cache directory's writer lock (exit code 75)."""


class MissingExtraError(UsageError):
    """An optional dependency is not installed; the message names the extra that brings it (exit code 2)."""


class ExportFormatError(UsageError):
    """The model's entries do not fit the export format asked for (e.g. token sequences as one vector per row)."""
