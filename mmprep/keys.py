"""The one key function: how a URL becomes a cache entry key."""

from __future__ import annotations

import hashlib


def cache_key(url: str) -> str:
    """Return the entry key for `url`: the sha256 hex digest of the exact UTF-8 string as given.

    No lowercasing, no normalisation: `/Cat.png` and `/cat.png` are different images.
    """
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def is_data_url(url: str) -> bool:
    """Whether `url` carries its bytes inline (stored in the index by hash, never verbatim)."""
    return url[:5].lower() == "data:"


def stored_url(url: str) -> str:
    """The URL as written to the index and error records: data URLs become `data:sha256=<hex>`."""
    return f"data:sha256={cache_key(url)}" if is_data_url(url) else url


def display_url(url: str, limit: int = 200) -> str:
    """A short, loggable form of `url`: data URLs become `data:<hash>`, long URLs are cut."""
    if is_data_url(url):
        return f"data:sha256={cache_key(url)[:16]}…"
    return url if len(url) <= limit else url[: limit - 1] + "…"
