"""Per-run key lookups: what the index knows about each manifest row's key, asked chunk by chunk.

A short manifest probes SQLite (the narrow `entries_lookup` index: about 10 µs a key). Once a run has
looked up a sixteenth as many keys as the model has entries (a long manifest: most likely a rerun),
reading those entries once (about 1 µs each) is the cheaper plan: `KeySnapshot` holds the 128-bit
prefixes of the keys earlier runs cached, sorted, 16 bytes a key (at most 64 MiB), and answers a
whole chunk with one vectorised binary search. Keys it does not hold still go to SQLite, so failures,
new rows and this run's own entries are answered exactly as before; a false "cached" would need two
sha256 keys to share their first 128 bits.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import torch

from mmprep.store.index import CacheIndex, KeyState

SNAPSHOT_AFTER = 65_536  # keys looked up before a snapshot is considered (short runs never pay for one)
SNAPSHOT_RATIO = 16  # ... and then built once keys looked up * SNAPSHOT_RATIO >= the model's entries
SNAPSHOT_MAX_KEYS = 4 * 1024 * 1024  # 16 bytes a key: at most 64 MiB of memory
SNAPSHOT_READ = 65_536  # keys read from the index per query while building

EARLIER = KeyState(True, None)  # cached by an earlier run (the snapshot knows no more than that)


class KeySnapshot:
    """The 128-bit prefixes of a model's cached keys as two sorted int64 tensors (first and second halves)."""

    def __init__(self, high: torch.Tensor, low: torch.Tensor) -> None:
        self.high = high  # ascending; `low` ascending within equal `high`
        self.low = low

    def __len__(self) -> int:
        return len(self.high)

    @classmethod
    def read(cls, index: CacheIndex, fingerprint: str, exclude_run: str) -> KeySnapshot:
        """Every key of `fingerprint` not written by `exclude_run`, read in key order (already sorted: hex order is
        numeric order) a batch at a time into preallocated tensors, so memory peaks at 16 bytes a key."""
        (count,) = index.conn.execute(
            "SELECT count(*) FROM entries WHERE fingerprint=? AND run_id!=?", (fingerprint, exclude_run)
        ).fetchone()
        high, low = torch.empty(count, dtype=torch.int64), torch.empty(count, dtype=torch.int64)
        filled, after = 0, ""
        while filled < count:
            hexes, last = index.conn.execute(
                "SELECT group_concat(prefix, ''), max(key) FROM (SELECT substr(key, 1, 32) AS prefix, key FROM entries"
                " WHERE fingerprint=? AND key>? AND run_id!=? ORDER BY key LIMIT ?)",
                (fingerprint, after, exclude_run, min(SNAPSHOT_READ, count - filled)),
            ).fetchone()
            if hexes is None:
                break  # entries deleted meanwhile (not possible under the writer lock, but never overrun)
            batch = prefix_halves(hexes)
            high[filled : filled + len(batch)] = batch[:, 0]
            low[filled : filled + len(batch)] = batch[:, 1]
            filled += len(batch)
            after = last
        return cls(high[:filled], low[:filled])

    def contains(self, keys: Sequence[str | None]) -> list[bool]:
        """Whether each key's 128-bit prefix is in the snapshot (False for None), in one vectorised search."""
        if not len(self):
            return [False] * len(keys)
        query = prefix_halves("".join([key[:32] if key is not None else NO_KEY for key in keys]))
        high, low = query[:, 0].contiguous(), query[:, 1]
        at = torch.searchsorted(self.high, high).clamp_(max=len(self) - 1)
        # Cached keys sharing a first half (odds ~n²/2^65) put the one with the smallest second half at `at`;
        # the others then read as absent and go to SQLite, which is slower but still exact.
        found: list[bool] = ((self.high[at] == high) & (self.low[at] == low)).tolist()
        return [hit and key is not None for hit, key in zip(found, keys)]


NO_KEY = "0" * 32  # stands in for a bad line's missing key (answered False whatever it matches)
_SIGN = -(2**63)


def prefix_halves(hexes: str) -> torch.Tensor:
    """Concatenated 32-hex-digit key prefixes → (n, 2) int64 whose signed order is the hex strings' order
    (big-endian halves with the sign bit flipped), so SQLite's key order is already sorted."""
    values = array("q", bytes.fromhex(hexes))
    if sys.byteorder == "little":
        values.byteswap()
    if not values:
        return torch.empty((0, 2), dtype=torch.int64)
    return (torch.frombuffer(values, dtype=torch.int64) ^ _SIGN).view(-1, 2)  # `^` copies: `values` may go


class KeyLookup:
    """Answers one run's lookups for one model, choosing between SQLite probes and a `KeySnapshot`."""

    def __init__(self, index: CacheIndex, fingerprint: str, run_id: str, *, detail: bool) -> None:
        self.index = index
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.detail = detail  # refresh needs each entry's validators: always ask SQLite
        self.snapshot: KeySnapshot | None = None
        self._looked_up = 0
        self._entries: int | None = None  # the model's entry count, read once when it starts to matter

    def states(self, keys: Sequence[str | None]) -> list[KeyState | None]:
        """The state of each key (None: nothing known, or no key), in order."""
        if self.snapshot is None and not self.detail:
            self._looked_up += len(keys)
            self._consider_snapshot()
        if self.snapshot is None:
            known = self.index.key_states(
                self.fingerprint, [key for key in keys if key is not None], detail=self.detail
            )
            return [None if key is None else known.get(key) for key in keys]
        hits = self.snapshot.contains(keys)
        misses = [key for key, hit in zip(keys, hits) if not hit and key is not None]
        known = self.index.key_states(self.fingerprint, misses, detail=False) if misses else {}
        return [EARLIER if hit else None if key is None else known.get(key) for key, hit in zip(keys, hits)]

    def _consider_snapshot(self) -> None:
        if self._looked_up < SNAPSHOT_AFTER:
            return
        if self._entries is None:
            (self._entries,) = self.index.conn.execute(  # counting stops past the cap: huge caches pay nothing
                "SELECT count(*) FROM (SELECT 1 FROM entries WHERE fingerprint=? LIMIT ?)",
                (self.fingerprint, SNAPSHOT_MAX_KEYS + 1),
            ).fetchone()
        if 0 < self._entries <= SNAPSHOT_MAX_KEYS and self._looked_up * SNAPSHOT_RATIO >= self._entries:
            try:
                self.snapshot = KeySnapshot.read(self.index, self.fingerprint, self.run_id)
            except ValueError:  # a key that is not a sha256 hex digest (not written by mmprep): keep probing
                self._entries = 0
