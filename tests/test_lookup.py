"""Per-run key lookups: the in-memory snapshot answers exactly what SQLite probes answer."""

from __future__ import annotations

import json
import random


from conftest import image_bytes
from mmprep.store import lookup
from mmprep.store.index import CacheIndex, FailureRecord
from mmprep.store.lookup import EARLIER, KeyLookup, KeySnapshot, prefix_halves
from _cli import NET, encode_json, write_manifest

FP, OTHER = "f" * 64, "e" * 64


def add_entries(index: CacheIndex, fingerprint: str, run_id: str, keys: list[str]) -> None:
    """Index rows for `keys` (the lookup reads only the index; shards do not matter here)."""
    rows = [
        (fingerprint, k, f"https://h/{k[:8]}", None, "s.safetensors", '["x"]', "float32", "[4]", "c" * 64, None,
         None, run_id, 1.0)
        for k in keys
    ]  # fmt: skip
    index.commit_rows(f"{run_id}-{len(keys)}.safetensors", fingerprint, run_id, 0, "0" * 64, rows)


def fail(index: CacheIndex, key: str, retryable: bool) -> None:
    record = FailureRecord(key, "https://h/x", None, "m.jsonl", 1, "timeout" if retryable else "http_status",
                           "x", retryable, 1)  # fmt: skip
    index.record_failures(FP, "r0", [record])


def random_keys(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(n)]


def test_prefix_halves_keep_the_hex_order_across_the_sign_bit():
    edges = ["0" * 64, "7" + "f" * 63, "8" + "0" * 63, "f" * 64, "ffffffffffffffff" + "0" * 48]
    keys = sorted(edges + random_keys(2000, 1))
    halves = [tuple(pair) for pair in prefix_halves("".join(k[:32] for k in keys)).tolist()]
    assert halves == sorted(halves) and len(set(halves)) == len(keys)


def test_snapshot_holds_earlier_runs_keys_of_one_model(tmp_path):
    index = CacheIndex(tmp_path / "index.sqlite")
    earlier, current, other_model = random_keys(300, 2), random_keys(5, 3), random_keys(5, 4)
    add_entries(index, FP, "r1", earlier[:150])
    add_entries(index, FP, "r2", earlier[150:])
    add_entries(index, FP, "now", current)
    add_entries(index, OTHER, "r1", other_model)
    snapshot = KeySnapshot.read(index, FP, exclude_run="now")
    assert len(snapshot) == 300
    unknown = random_keys(50, 5)
    asked = earlier + current + other_model + unknown + [None]
    assert snapshot.contains(asked) == [True] * 300 + [False] * 61


def test_snapshot_reads_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(lookup, "SNAPSHOT_READ", 7)
    index = CacheIndex(tmp_path / "index.sqlite")
    keys = random_keys(100, 6)
    add_entries(index, FP, "r1", keys)
    snapshot = KeySnapshot.read(index, FP, exclude_run="now")
    assert len(snapshot) == 100 and all(snapshot.contains(keys))


def test_keys_sharing_a_first_half_are_still_answered_exactly(tmp_path, monkeypatch):
    """Two cached keys with equal first 64 bits: the snapshot finds one, SQLite answers for the other."""
    monkeypatch.setattr(lookup, "SNAPSHOT_AFTER", 1)
    index = CacheIndex(tmp_path / "index.sqlite")
    head = "0123456789abcdef"
    twins = [head + "1" * 48, head + "2" * 48]
    near_miss = head + "3" * 48  # same first half, not cached
    add_entries(index, FP, "r1", twins + random_keys(20, 7))
    keys = KeyLookup(index, FP, "now", detail=False)
    states = keys.states(twins + [near_miss])
    assert keys.snapshot is not None
    assert [s is not None and s.cached for s in states] == [True, True, False]


def test_snapshot_and_probes_agree_on_every_kind_of_key(tmp_path, monkeypatch):
    index = CacheIndex(tmp_path / "index.sqlite")
    cached, mine, other = random_keys(200, 8), random_keys(10, 9), random_keys(10, 10)
    permanent, retryable, unknown = random_keys(10, 11), random_keys(10, 12), random_keys(30, 13)
    add_entries(index, FP, "r1", cached)
    add_entries(index, FP, "now", mine)  # encoded earlier in this very run
    add_entries(index, OTHER, "r1", other)
    for key in permanent:
        fail(index, key, retryable=False)
    for key in retryable:
        fail(index, key, retryable=True)
    asked = cached + mine + other + permanent + retryable + unknown + [None]
    random.Random(14).shuffle(asked)

    def summary(states):  # what plan() reads of a state
        return [None if s is None else (s.cached, s.run_id == "now", s.failed_kind, s.failed_retryable) for s in states]

    probed = KeyLookup(index, FP, "now", detail=False)
    from_probes = probed.states(asked)
    assert probed.snapshot is None  # 281 keys: below SNAPSHOT_AFTER
    monkeypatch.setattr(lookup, "SNAPSHOT_AFTER", 1)
    snapped = KeyLookup(index, FP, "now", detail=False)
    from_snapshot = snapped.states(asked)
    assert snapped.snapshot is not None and len(snapped.snapshot) == 200
    assert summary(from_snapshot) == summary(from_probes)
    assert sum(s is EARLIER for s in from_snapshot) == 200


def test_no_snapshot_when_it_would_not_pay_or_not_fit(tmp_path, monkeypatch):
    index = CacheIndex(tmp_path / "index.sqlite")
    add_entries(index, FP, "r1", random_keys(64, 15))
    monkeypatch.setattr(lookup, "SNAPSHOT_AFTER", 1)
    short = KeyLookup(index, FP, "now", detail=False)
    short.states(random_keys(3, 16))  # 3 keys * 16 < 64 entries: probing stays cheaper
    assert short.snapshot is None
    refresh = KeyLookup(index, FP, "now", detail=True)  # refresh needs validators from SQLite
    refresh.states(random_keys(10, 17))
    assert refresh.snapshot is None
    monkeypatch.setattr(lookup, "SNAPSHOT_MAX_KEYS", 63)
    big = KeyLookup(index, FP, "now", detail=False)
    big.states(random_keys(10, 18))
    assert big.snapshot is None
    monkeypatch.setattr(lookup, "SNAPSHOT_MAX_KEYS", 64)
    fits = KeyLookup(index, FP, "now", detail=False)
    fits.states(random_keys(10, 19))
    assert fits.snapshot is not None and len(fits.snapshot) == 64


def test_a_rerun_through_the_snapshot_fetches_nothing_and_counts_like_probes(tmp_path, image_server, monkeypatch):
    """End to end with a snapshot from the first chunk: cached rows skip, new rows encode, failures stay failed."""
    monkeypatch.setattr(lookup, "SNAPSHOT_AFTER", 1)
    monkeypatch.setattr(lookup, "SNAPSHOT_RATIO", 10_000)
    built: list[int] = []
    read = KeySnapshot.read.__func__  # type: ignore[attr-defined]

    def spy(cls, *args, **kwargs):
        snapshot = read(cls, *args, **kwargs)
        built.append(len(snapshot))
        return snapshot

    monkeypatch.setattr(KeySnapshot, "read", classmethod(spy))
    urls = [image_server.add(f"/{i}.png", image_bytes("RGB", (24, 20), "PNG", i)) for i in range(8)]
    gone = image_server.url("/gone.png")
    cache = tmp_path / "cache"
    base = ["--model", "builtin:tiny-clip", "--out", str(cache), *NET, "--retries", "0"]
    code, first = encode_json(write_manifest(tmp_path / "a.jsonl", urls[:6] + [gone]), *base)
    assert code == 1 and first["encoded"] == 6

    hits = image_server.total_hits
    rows = urls + [urls[0], gone, "{not json"]  # two new, one repeated, a permanent failure, a bad line
    code, second = encode_json(write_manifest(tmp_path / "b.jsonl", rows), *base)
    assert code == 1
    assert (second["cached"], second["encoded"], second["skipped_failed"]) == (7, 2, 1), json.dumps(second)
    assert second["failures_by_kind"] == {"bad_manifest_line": 1}
    assert image_server.total_hits == hits + 2  # only the two new images were fetched
    assert built == [6]  # none on the first run (nothing cached yet); the rerun's held the six entries

    monkeypatch.setattr(lookup, "SNAPSHOT_AFTER", 10**9)  # the same rerun answered by SQLite probes only
    code, probed = encode_json(write_manifest(tmp_path / "b.jsonl", rows), *base)
    assert code == 0 and image_server.total_hits == hits + 2  # the bad line failed before: no new failure
    assert (probed["cached"], probed["encoded"], probed["skipped_failed"]) == (9, 0, 1)
    assert built == [6]
