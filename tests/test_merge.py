"""`mmprep merge`: the halves of a `--shard 1/2` + `--shard 2/2` job merge into the cache one run
would have made; merging again changes nothing; conflicts and models are kept apart; kill -9 mid-merge
and a rerun give the clean result."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _cli import cli as mmprep_cli
from conftest import image_bytes
from mmprep import cache_key
from mmprep.store.reader import EmbeddingCache
from mmprep.store.verify import verify_cache

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 10


def cli(*args: str) -> tuple[int, str]:
    result = mmprep_cli(*args)
    return result.exit_code, result.stdout


def encode(manifest: Path, out: Path, *extra: str) -> dict:
    code, stdout = cli(
        "encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), "--allow-local-dir",
        str(manifest.parent), "--shard-size", "64", "--progress", "none", "--json", *extra,
    )  # fmt: skip
    summary = json.loads(stdout)
    assert code == summary["exit_code"]
    return summary


def merge(dest: Path, *sources: Path, move: bool = False) -> tuple[int, dict]:
    code, stdout = cli("merge", str(dest), *map(str, sources), *(["--move"] if move else []), "--json")
    return code, json.loads(stdout)


def dump(cache: Path) -> dict[str, list[tuple]]:
    """Every row of every index table, sorted: two caches with equal dumps hold the same thing."""
    db = sqlite3.connect(cache / "index.sqlite")
    try:
        return {
            t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}")))
            for t in ("models", "shards", "entries", "failures", "runs")
        }
    finally:
        db.close()


def tensors(cache: Path, fingerprint: str | None = None) -> dict[str, torch.Tensor]:
    db = sqlite3.connect(cache / "index.sqlite")
    keys = [
        r[0] for r in db.execute("SELECT key FROM entries WHERE fingerprint=coalesce(?, fingerprint)", (fingerprint,))
    ]
    db.close()
    with EmbeddingCache(cache, model=fingerprint, memory_bytes=0) as reader:
        return {key: entry.embeddings for key, entry in zip(keys, reader.get_keys(keys))}


@pytest.fixture()
def job(tmp_path: Path) -> Path:
    """A manifest of N_IMAGES local images plus one missing file (a bad_path failure)."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(N_IMAGES):
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGB", (24 + i, 30), "PNG", i))
        rows.append({"url": str(path), "id": f"img-{i}"})
    rows.append({"url": str(images / "missing.png")})
    manifest = images / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture()
def halves(job: Path, tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "part1", tmp_path / "part2"
    first, second = encode(job, a, "--shard", "1/2"), encode(job, b, "--shard", "2/2")
    assert first["encoded"] + second["encoded"] == N_IMAGES
    assert 0 < first["encoded"] < N_IMAGES
    return a, b


def test_merged_shard_halves_equal_one_single_run(job, halves, tmp_path):
    whole = tmp_path / "whole"
    encode(job, whole)
    merged = tmp_path / "merged"
    code, report = merge(merged, *halves)
    assert code == 0 and report["conflicts"] == []
    assert report["entries_added"] == N_IMAGES and report["runs_merged"] == 2 and report["failures_merged"] == 1

    expected, got = tensors(whole), tensors(merged)
    copied = {**tensors(halves[0]), **tensors(halves[1])}
    assert (
        set(got) == set(expected) == set(copied) == {cache_key(str(job.parent / f"{i}.png")) for i in range(N_IMAGES)}
    )
    for key in expected:
        # Merge copies tensors bit for bit. The single run batched the rows differently, and CPU
        # GEMMs are not bitwise batch-invariant, so against it the match is to float32 rounding.
        assert torch.equal(got[key], copied[key])
        assert got[key].shape == expected[key].shape and torch.allclose(got[key], expected[key], rtol=0, atol=1e-5)
    rows, whole_rows = dump(merged), dump(whole)
    assert [r[0] for r in rows["models"]] == [r[0] for r in whole_rows["models"]]
    assert [(r[1], r[6]) for r in rows["failures"]] == [(r[1], r[6]) for r in whole_rows["failures"]]  # key, kind
    assert {r[0] for r in rows["runs"]} == {r[0] for r in dump(halves[0])["runs"] + dump(halves[1])["runs"]}
    assert sorted(p.name for p in (merged / "errors").iterdir()) == sorted(
        p.name for h in halves for p in (h / "errors").iterdir()
    )
    assert verify_cache(merged, deep=True).ok

    # merging again (or merging a source twice) changes nothing
    code, again = merge(merged, *halves, halves[0])
    assert code == 0 and again["entries_added"] == 0 and again["shards_copied"] == 0
    assert again["shards_present"] == 2 * len(dump(halves[0])["shards"]) + len(dump(halves[1])["shards"])
    assert dump(merged) == rows

    # a rerun of the whole job on the merged cache fetches and encodes nothing
    summary = encode(job, merged)
    assert (summary["encoded"], summary["cached"], summary["skipped_failed"]) == (0, N_IMAGES, 1)


def test_move_hard_links_shards_and_leaves_sources_valid(halves, tmp_path):
    merged = tmp_path / "merged"
    code, report = merge(merged, *halves, move=True)
    assert (
        code == 0
        and report["shards_copied"] == 0
        and report["shards_linked"] == len(dump(halves[0])["shards"]) + len(dump(halves[1])["shards"])
    )
    for shard in dump(merged)["shards"]:
        source = next(h for h in halves if (h / "shards" / shard[0]).exists())
        assert (merged / "shards" / shard[0]).stat().st_ino == (source / "shards" / shard[0]).stat().st_ino
    for cache in (merged, *halves):
        assert verify_cache(cache, deep=True).ok


def test_conflicting_content_keeps_dest_entry_and_exits_1(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    manifest = images / "m.jsonl"
    manifest.write_text(json.dumps(str(images / "x.png")) + "\n" + json.dumps(str(images / "same.png")) + "\n")
    (images / "same.png").write_bytes(image_bytes("RGB", (30, 30), "PNG", 9))
    (images / "x.png").write_bytes(image_bytes("RGB", (30, 30), "PNG", 1))
    encode(manifest, tmp_path / "a")
    (images / "x.png").write_bytes(image_bytes("RGB", (30, 30), "PNG", 2))  # same URL, new bytes
    encode(manifest, tmp_path / "b")
    before = tensors(tmp_path / "a")

    code, report = merge(tmp_path / "a", tmp_path / "b")
    key = cache_key(str(images / "x.png"))
    assert code == 1
    assert [(c["key"], c["url"]) for c in report["conflicts"]] == [(key, str(images / "x.png"))]
    assert report["entries_identical"] == 1 and report["entries_added"] == 0
    after = tensors(tmp_path / "a")
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert verify_cache(tmp_path / "a").ok
    # the same conflict is reported again by a rerun, which changes nothing
    rows = dump(tmp_path / "a")
    assert merge(tmp_path / "a", tmp_path / "b")[0] == 1 and dump(tmp_path / "a") == rows


def test_different_models_stay_separate_namespaces(job, tmp_path):
    encode(job, tmp_path / "fp32")
    encode(job, tmp_path / "bf16", "--dtype", "bfloat16")  # another fingerprint, the same keys
    code, report = merge(tmp_path / "merged", tmp_path / "fp32", tmp_path / "bf16")
    assert code == 0 and report["conflicts"] == [] and report["entries_added"] == 2 * N_IMAGES
    assert report["models_merged"] == 2
    for source in ("fp32", "bf16"):
        (fingerprint,) = [r[0] for r in dump(tmp_path / source)["models"]]
        expected = tensors(tmp_path / source, fingerprint)
        got = tensors(tmp_path / "merged", fingerprint)
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert len(dump(tmp_path / "merged")["failures"]) == 2  # the missing file, once per model


def test_merge_into_itself_or_from_a_non_cache_is_a_usage_error(halves, tmp_path):
    assert cli("merge", str(halves[0]), str(halves[0]))[0] == 2
    assert cli("merge", str(tmp_path / "new"), str(tmp_path / "nothing-here"))[0] == 2


@pytest.mark.slow  # subprocess merges killed mid-way
@pytest.mark.parametrize("fault", ["merge_after_copy:3", "merge_in_commit:2", "merge_after_copy:7"])
def test_kill_9_mid_merge_then_rerun_equals_a_clean_merge(fault, halves, tmp_path):
    clean = tmp_path / "clean"
    assert merge(clean, *halves)[0] == 0
    dest = tmp_path / "dest"
    cmd = [sys.executable, "-m", "mmprep", "merge", str(dest), *map(str, halves)]
    crashed = subprocess.run(cmd, cwd=REPO, env={**os.environ, "MMPREP_FAULT": fault}, capture_output=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert len(dump(dest)["entries"]) < N_IMAGES
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert dump(dest) == dump(clean)
    assert verify_cache(dest, deep=True).ok
    assert not list(dest.rglob("*.tmp"))
