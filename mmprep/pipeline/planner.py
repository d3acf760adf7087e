"""What an encode run does with each manifest row, asked by both engines (the local run's loading half
and the Ray driver): cached (skip), failed before (skip unless the failure policy retries it), another
--shard part's (skip), a duplicate within the run (skip), a cached entry to re-validate (a conditional
refresh, or one more fetch for its vLLM identifier), or new (load it).

One batched index query per manifest chunk, made under the claims' lock so that no row can finish
between the query and the check of the claims (it would otherwise be fetched twice).
"""

from __future__ import annotations

import time
from typing import Any

from mmprep.pipeline.core import INFLIGHT, PLAIN, ChunkPlanner, Claims, Plan, RunCounters
from mmprep.pipeline.retry import FailurePolicy
from mmprep.settings import Settings
from mmprep.store.index import CacheIndex
from mmprep.store.layout import CacheLayout
from mmprep.store.lookup import KeyLookup


class EncodePlanner(ChunkPlanner):
    """Plans one encode run's rows from the index's state of each key; `open()` it once the index exists."""

    def __init__(
        self, settings: Settings, layout: CacheLayout, fingerprint: str, run_id: str, counters: RunCounters,
        claims: Claims,
    ) -> None:  # fmt: skip
        super().__init__(settings.load, counters, claims)
        self.settings = settings
        self.layout = layout
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.failures = FailurePolicy(settings.load, settings.retry_permanent_after)
        self.index: CacheIndex | None = None  # read-only, while open
        self._keys: KeyLookup | None = None

    def open(self) -> EncodePlanner:
        """Open the read-only index connection and the run's key lookup (after the run's row is written)."""
        self.index = CacheIndex(self.layout.index, readonly=True)
        # refresh needs each entry's validators; --vllm-model-id may re-fetch an entry to hash its bytes
        detail = self.settings.refresh_older_than is not None or self.settings.vllm_model_id is not None
        self._keys = KeyLookup(self.index, self.fingerprint, self.run_id, detail=detail)
        return self

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None

    def classify(self, keys: list[str | None]) -> list[Any]:
        """INFLIGHT for a key claimed already, else the index's KeyState (None: nothing known)."""
        assert self._keys is not None, "EncodePlanner.open() first"
        with self.claims.lock:
            held = self.claims.held(keys)
            return [INFLIGHT if h else state for h, state in zip(held, self._keys.states(keys))]

    def plan(self, key: str, state: Any) -> Plan | None:
        c = self.counters  # state: None (unknown), INFLIGHT or a KeyState
        if state is INFLIGHT or (state is not None and state.run_id == self.run_id):
            c.duplicates += 1
            return None
        plan = PLAIN
        if state is not None and state.cached:
            age = self.settings.refresh_older_than
            if age is not None and (state.checked is None or time.time() - state.checked >= age):
                plan = Plan(state.etag, state.last_modified, state.content_sha256, refresh=True)
            elif self.needs_vllm_identifier(key):  # fetched once more (not re-encoded) to hash its bytes
                plan = Plan(content_sha256=state.content_sha256, refresh=True)
            else:
                c.cached += 1
                return None
        failed_before = state is not None and state.failed_kind is not None
        if failed_before and not self.failures.retries(state):
            c.skipped_failed += 1
            return None
        if self.settings.retry_failed and not failed_before:
            c.skipped_other += 1
            return None
        if not self.claims.claim(key):  # same URL twice within one chunk
            c.duplicates += 1
            return None
        c.retried += failed_before
        return plan

    def needs_vllm_identifier(self, key: str) -> bool:
        """--vllm-model-id: whether the index lacks vLLM's identifier of this cached entry's bytes."""
        model_id = self.settings.vllm_model_id
        if model_id is None:
            return False
        assert self.index is not None, "EncodePlanner.open() first"
        return not self.index.has_vllm_identifier(self.fingerprint, key, model_id)
