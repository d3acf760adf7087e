"""`mmprep export --format vllm-ec`: vLLM's ECExampleConnector store from a real tiny Qwen2-VL cache,
and its safety rules (atomic entries, row counts checked before writing, incremental reruns, one model
per store). The end-to-end run of a real vLLM ec_consumer on such a store is in tests/interop."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import cli
from conftest import image_bytes
from safetensors.torch import load_file, save_file

from mmprep import EmbeddingCache, cache_key
from mmprep.serving.vllm_ec import ENTRY_FILE, STAGING, STORE_MANIFEST, TENSOR
from mmprep.serving.vllm_hash import vllm_image_identifier

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # the --model string a vLLM server would be started with
SIZES = [(56, 56), (84, 56), (112, 84), (56, 140), (70, 70), (98, 112)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Six local images (one RGBA) of different sizes, encoded with builtin:tiny-qwen2-vl and --vllm-model-id."""
    root = tmp_path_factory.mktemp("vllm-ec")
    images = root / "imgs"
    images.mkdir()
    urls = []
    for i, size in enumerate(SIZES):
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGBA" if i == 1 else "RGB", size, "PNG", i))
        urls.append(str(path))
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(u) + "\n" for u in urls))
    out = root / "cache"
    result = cli("encode", str(manifest), "--model", "builtin:tiny-qwen2-vl", "--out", str(out), "--allow-local-dir",
                 str(images), "--progress", "none", "--vllm-model-id", MODEL_ID, "--shard-size", "20000")  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "urls": urls, "images": images, "manifest": manifest}


def private_copy(cache: dict, tmp_path: Path) -> dict:
    """The module's cache copied, for a test that adds to it (the other tests see the six entries)."""
    subprocess.run(["cp", "-a", str(cache["out"]), str(tmp_path / "cache")], check=True)
    return {**cache, "out": tmp_path / "cache", "root": tmp_path}


def export(cache: dict, store: Path, *extra: str):
    return cli("export", str(cache["out"]), "--out", str(store), "--format", "vllm-ec", "--progress", "none", *extra)


def entry_files(store: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in store.glob(f"*/{ENTRY_FILE}")}


def assert_entry_is_the_cached_one(cache: dict, store: Path, identifier: str, url: str) -> None:
    """The file vLLM would load holds exactly one tensor, `ec_cache`: the entry's merged tokens, whose row
    count is the grid's t*h*w / 2²."""
    tensors = load_file(str(store / identifier / ENTRY_FILE))  # what ECExampleConnector.start_load_caches does
    assert list(tensors) == [TENSOR]
    with EmbeddingCache(cache["out"], model="builtin:tiny-qwen2-vl") as reader:
        entry = reader.get(url)
    assert torch.equal(tensors[TENSOR], entry.embeddings)
    assert tensors[TENSOR].shape[0] == int(entry.image_grid_thw.prod()) // 4 and tensors[TENSOR].std() > 1e-3


def test_key_url_store_holds_each_image_merged_tokens(cache: dict) -> None:
    store = cache["root"] / "store-url"
    result = export(cache, store)
    assert result.exit_code == 0, result.output
    assert "6 written, 0 replaced, 0 skipped" in result.output
    files = entry_files(store)
    assert sorted(files) == sorted(cache_key(u) for u in cache["urls"])
    shapes = set()
    for url in cache["urls"]:
        assert_entry_is_the_cached_one(cache, store, cache_key(url), url)
        shapes.add(load_file(str(files[cache_key(url)]))[TENSOR].shape[0])
    assert len(shapes) > 3  # different image sizes, different token counts
    manifest = json.loads((store / STORE_MANIFEST).read_text())
    assert manifest["model"] == "builtin:tiny-qwen2-vl" and manifest["family"] == "qwen2_vl"
    assert not (store / STAGING).exists()


def test_rerun_writes_nothing(cache: dict) -> None:
    store = cache["root"] / "store-rerun"
    assert export(cache, store).exit_code == 0
    before = {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in entry_files(store).items()}
    again = export(cache, store, "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout[: again.stdout.rindex("}") + 1])
    assert (report["written"], report["replaced"], report["skipped"], report["bytes"]) == (0, 0, 6, 0)
    assert {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in entry_files(store).items()} == before


def test_key_vllm_names_entries_by_vllms_identifier(cache: dict) -> None:
    store = cache["root"] / "store-vllm"
    refused = export(cache, store, "--key", "vllm")
    assert refused.exit_code == 2 and "--vllm-model-id" in refused.output
    result = export(cache, store, "--key", "vllm", "--vllm-model-id", MODEL_ID)
    assert result.exit_code == 0, result.output
    for url in cache["urls"]:  # tests/interop checks vllm_image_identifier against vLLM's own hasher
        identifier = vllm_image_identifier(Path(url).read_bytes(), MODEL_ID)
        assert_entry_is_the_cached_one(cache, store, identifier, url)
    assert len(entry_files(store)) == 6
    other = export(cache, cache["root"] / "store-other-id", "--key", "vllm", "--vllm-model-id", "another/model")
    assert other.exit_code == 1 and "6 without a vLLM identifier" in other.output
    assert not entry_files(cache["root"] / "store-other-id")


def test_identifier_is_recorded_for_rows_cached_before_without_refetching_twice(cache: dict, tmp_path: Path) -> None:
    """Rows encoded without --vllm-model-id get their identifier on the next run that has it: fetched once
    more (not re-encoded); the run after that fetches nothing. The same bytes under two URLs are one entry
    of a --key vllm store (vLLM names the bytes, not the URL)."""
    cache = private_copy(cache, tmp_path)
    body = image_bytes("RGB", (60, 60), "PNG", 40)
    paths = [cache["images"] / "late.png", cache["images"] / "late-copy.png"]  # the images directory is shared,
    for path in paths:  # but no other test lists its files
        path.write_bytes(body)
    manifest = tmp_path / "late.jsonl"
    manifest.write_text("".join(json.dumps(str(p)) + "\n" for p in paths))
    common = ["--model", "builtin:tiny-qwen2-vl", "--out", str(cache["out"]), "--allow-local-dir", str(cache["images"]),
              "--progress", "none", "--json"]  # fmt: skip
    summaries = []
    for extra in ([], ["--vllm-model-id", "late/model"], ["--vllm-model-id", "late/model"]):
        result = cli("encode", str(manifest), *common, *extra)
        assert result.exit_code == 0, result.output
        summaries.append(json.loads(result.stdout))
    assert [(s["encoded"], s["refreshed"], s["cached"]) for s in summaries] == [(2, 0, 0), (0, 2, 0), (0, 0, 2)]
    store = cache["root"] / "store-late"
    result = export(cache, store, "--key", "vllm", "--vllm-model-id", "late/model")
    assert result.exit_code == 1 and "6 without a vLLM identifier" in result.output
    assert "1 written, 0 replaced, 1 skipped" in result.output
    assert list(entry_files(store)) == [vllm_image_identifier(body, "late/model")]


@pytest.mark.slow  # subprocess exports killed mid-way
def test_killed_export_leaves_no_visible_partial_entry(cache: dict) -> None:
    """SIGKILL just before the third entry's rename (all six are staged, whole): vLLM sees two entries,
    both complete; the rerun removes the leftovers and writes the other four."""
    store = cache["root"] / "store-killed"
    cmd = [sys.executable, "-m", "mmprep", "export", str(cache["out"]), "--out", str(store), "--format", "vllm-ec",
           "--progress", "none"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMPREP_FAULT": "ec_before_rename:3"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert killed.returncode == -9, killed.stderr
    visible = entry_files(store)
    assert len(visible) == 2
    by_key = {cache_key(u): u for u in cache["urls"]}
    for identifier in visible:
        assert_entry_is_the_cached_one(cache, store, identifier, by_key[identifier])
    entry_dirs = {p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert entry_dirs == set(visible)  # no directory of the third entry: vLLM's lookup finds nothing there
    assert len(list((store / STAGING).rglob(ENTRY_FILE))) == 4  # the other four, complete but invisible
    rerun = export(cache, store)
    assert rerun.exit_code == 0 and "4 written, 0 replaced, 2 skipped" in rerun.output
    assert len(entry_files(store)) == 6 and not (store / STAGING).exists()


def test_wrong_row_count_is_refused_before_writing(cache: dict, tmp_path: Path) -> None:
    """An entry whose tensor lost a row (11 rows for 12 placeholders killed vLLM's engine) is never written."""
    damaged = private_copy(cache, tmp_path)["out"]
    victim = cache_key(cache["urls"][2])
    for shard in (damaged / "shards").rglob("*.safetensors"):
        tensors = load_file(str(shard))
        if victim in tensors:
            from safetensors import safe_open

            with safe_open(str(shard), "pt") as f:
                metadata = f.metadata()
            tensors[victim] = tensors[victim][:-1].clone()
            save_file(tensors, str(shard), metadata=metadata)
    store = tmp_path / "store"
    result = cli("export", str(damaged), "--out", str(store), "--format", "vllm-ec", "--progress", "none")
    assert result.exit_code == 1 and "refused" in result.output and victim[:16] in result.output
    assert "5 written" in result.output
    assert victim not in entry_files(store) and not (store / victim).exists()
    assert len(entry_files(store)) == 5


def test_changed_entries_are_replaced_identical_ones_kept_and_prune_empty(cache: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    keys = [cache_key(u) for u in cache["urls"]]
    # what a vLLM producer (or an older export) may have left: one entry with another tensor, one with
    # the same tensor but no mmprep metadata, the empty directories of misses, a non-empty foreign directory
    with EmbeddingCache(cache["out"]) as reader:
        same, changed = reader.get_key(keys[0]).embeddings, reader.get_key(keys[1]).embeddings
    for key, tensor in ((keys[0], same), (keys[1], changed * 2)):
        (store / key).mkdir(parents=True)
        save_file({TENSOR: tensor.contiguous()}, str(store / key / ENTRY_FILE))
    (store / keys[2]).mkdir()  # a miss on an image that is in the cache: the entry goes into it
    for name in ("miss-a", "miss-b"):
        (store / name).mkdir()
    (store / "kept").mkdir()
    (store / "kept" / "note").write_text("not empty")
    inode_same = (store / keys[0] / ENTRY_FILE).stat().st_ino
    result = export(cache, store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert (report["written"], report["replaced"], report["skipped"], report["pruned"]) == (4, 1, 1, 0)
    assert (store / "miss-a").is_dir()
    pruned = export(cache, store, "--prune-empty", "--json")
    report = json.loads(pruned.stdout[: pruned.stdout.rindex("}") + 1])
    assert (report["written"], report["replaced"], report["skipped"], report["pruned"]) == (0, 0, 6, 2)
    assert (store / keys[0] / ENTRY_FILE).stat().st_ino == inode_same  # identical tensor: not rewritten
    for url in cache["urls"]:
        assert_entry_is_the_cached_one(cache, store, cache_key(url), url)
    assert torch.equal(load_file(str(store / keys[1] / ENTRY_FILE))[TENSOR], changed)  # the doubled one was replaced
    assert not (store / "miss-a").exists() and (store / "kept" / "note").exists()


def test_store_of_another_model_and_token_sequences_as_rows_are_refused(cache: dict, tmp_path: Path) -> None:
    cache = private_copy(cache, tmp_path)
    store = cache["root"] / "store-one-model"
    assert export(cache, store).exit_code == 0
    # the same tiny model decoded another way has another fingerprint: it must not share the store
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps(cache["urls"][0]) + "\n")
    encoded = cli("encode", str(manifest), "--model", "builtin:tiny-qwen2-vl", "--out", str(cache["out"]),
                  "--allow-local-dir", str(cache["images"]), "--progress", "none", "--no-exif-transpose")  # fmt: skip
    assert encoded.exit_code == 0, encoded.output
    with sqlite3.connect(cache["out"] / "index.sqlite") as db:
        fingerprints = [r[0] for r in db.execute("SELECT fingerprint FROM models ORDER BY created")]
    other = export(cache, store, "--model", fingerprints[-1][:16])
    assert other.exit_code == 2 and "serves one model" in other.output
    assert len(entry_files(store)) == 6
    token_rows = cli("export", str(cache["out"]), "--out", str(tmp_path / "npy"), "--model", fingerprints[0][:16])
    assert token_rows.exit_code == 2 and "token sequence" in token_rows.output


def test_qwen3_vl_store_holds_merged_tokens_and_deepstack_concatenated(tmp_path: Path) -> None:
    """Qwen3-VL: vLLM caches the tower's cat([merged] + deepstack levels) per image, so the `ec_cache`
    tensor is to_vllm's image_embeds, [n, hidden * (1 + levels)], with n = t*h*w / merge² rows."""
    from mmprep.serving import to_vllm

    images = tmp_path / "imgs"
    images.mkdir()
    urls = []
    for i, size in enumerate([(56, 84), (112, 56)]):
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGB", size, "PNG", i))
        urls.append(str(path))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(u) + "\n" for u in urls))
    out, store = tmp_path / "cache", tmp_path / "store"
    result = cli("encode", str(manifest), "--model", "builtin:tiny-qwen3-vl", "--out", str(out), "--allow-local-dir",
                 str(images), "--progress", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = cli("export", str(out), "--out", str(store), "--format", "vllm-ec", "--progress", "none")
    assert result.exit_code == 0, result.output
    with EmbeddingCache(out, model="builtin:tiny-qwen3-vl") as reader:
        for url in urls:
            entry = reader.get(url)
            stored = load_file(str(store / cache_key(url) / ENTRY_FILE))[TENSOR]
            levels = entry.tensors["deepstack"].shape[0]
            assert levels >= 1 and stored.shape[1] == entry.embeddings.shape[1] * (1 + levels)
            assert torch.equal(stored, to_vllm(entry)["image_embeds"])
            assert stored.shape[0] == entry.embeddings.shape[0] == int(entry.image_grid_thw.prod()) // 4
            hidden = entry.embeddings.shape[1]
            assert not torch.allclose(
                stored[:, :hidden], stored[:, hidden : 2 * hidden]
            )  # levels differ from the merged tokens
