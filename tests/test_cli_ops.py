"""`mmprep verify / index rebuild / gc / show`, the writer lock and the reader, on caches made by `encode`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _cli import cli
from conftest import image_bytes
from mmprep import EmbeddingCache, cache_key
from mmprep.store.lock import WriterLock


@pytest.fixture()
def cache(tmp_path) -> tuple[Path, list[str]]:
    """A cache with 6 local images in 3 shards (two rows per shard: --shard-size tiny)."""
    images = tmp_path / "imgs"
    images.mkdir()
    urls = []
    for i in range(6):
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGB", (24 + i, 30), "PNG", i))
        urls.append(str(path))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(u) + "\n" for u in urls))
    out = tmp_path / "cache"
    result = cli(
        "encode",
        str(manifest),
        "--model",
        "builtin:tiny-clip",
        "--out",
        str(out),
        "--allow-local-dir",
        str(images),
        "--shard-size",
        "100",
        "--batch-size",
        "2",
        "--progress",
        "none",
    )
    assert result.exit_code == 0, result.output
    return out, urls


def entries(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "index.sqlite")
    rows = sorted(db.execute("SELECT fingerprint, key, url, shard, tensors, dtype, shape, content_sha256 FROM entries"))
    db.close()
    return rows


def test_verify_clean_then_detects_and_repairs(cache):
    out, _ = cache
    clean = cli("verify", str(out), "--deep")
    assert clean.exit_code == 0 and "clean" in clean.stdout
    shard = next((out / "shards").rglob("*.safetensors"))
    shard.unlink()
    broken = cli("verify", str(out))
    assert broken.exit_code == 1 and "missing_shard" in broken.stdout
    repaired = cli("verify", str(out), "--repair")
    assert repaired.exit_code == 1 and "repaired" in repaired.stdout
    assert cli("verify", str(out)).exit_code == 0
    assert len(entries(out)) < 6


def test_index_rebuild_restores_entries_from_shards(cache):
    out, _ = cache
    before = entries(out)
    for suffix in ("", "-wal", "-shm"):
        (out / f"index.sqlite{suffix}").unlink(missing_ok=True)
    result = cli("index", "rebuild", str(out))
    assert result.exit_code == 0
    assert entries(out) == before


def test_show_and_export(cache, tmp_path):
    out, urls = cache
    shown = cli("show", str(out), urls[2], "--export", str(tmp_path / "e.safetensors"))
    assert shown.exit_code == 0
    info = json.loads(shown.stdout)
    assert info["cached"] and info["key"] == cache_key(urls[2])
    exported = load_file(str(tmp_path / "e.safetensors"))
    with EmbeddingCache(out) as reader:
        entry = reader.get(urls[2])
    assert torch.equal(next(iter(exported.values())), entry.embeddings)
    missing = cli("show", str(out), "https://nowhere.example/x.png")
    assert missing.exit_code == 1 and json.loads(missing.stdout)["cached"] is False


def test_gc_model_filter_drops_everything_of_that_model(cache):
    out, _ = cache
    dry = cli("gc", str(out), "--model", "builtin:tiny-clip", "--dry-run")
    assert dry.exit_code == 0 and "dry run" in dry.output and len(entries(out)) == 6
    real = cli("gc", str(out), "--model", "builtin:tiny-clip")
    assert real.exit_code == 0 and "6 entries dropped" in real.output
    assert entries(out) == [] and not list((out / "shards").rglob("*.safetensors"))
    assert cli("gc", str(out), "--older-than", "soon").exit_code == 2


def test_second_writer_exits_75_or_waits(cache, tmp_path):
    out, urls = cache
    manifest = tmp_path / "m2.jsonl"
    manifest.write_text(json.dumps(urls[0]) + "\n")
    args = [
        "encode",
        str(manifest),
        "--model",
        "builtin:tiny-clip",
        "--out",
        str(out),
        "--allow-local-dir",
        str(Path(urls[0]).parent),
        "--progress",
        "none",
    ]
    with WriterLock(out):
        locked = cli(*args)
        assert locked.exit_code == 75 and "pid" in locked.output
    assert cli(*args, "--wait-lock", "5").exit_code == 0


def test_reader_serves_what_encode_stored(cache):
    out, urls = cache
    with EmbeddingCache(out, memory_bytes=1 << 20) as reader:
        got = reader.get_many(urls + ["https://nowhere.example/x"])
        assert got[-1] is None and all(g is not None for g in got[:-1])
        again = reader.get(urls[0])
        assert torch.equal(again.embeddings, got[0].embeddings)
        s = reader.stats
        assert (s.hits, s.misses, s.memory_hits) == (7, 1, 1)


def test_an_index_from_a_newer_mmprep_is_refused_before_any_write(cache, tmp_path):
    """A newer schema version in the index: every command and the reader refuse it (exit 2, a
    specific error), and nothing is written to it."""
    from mmprep.errors import CacheVersionError
    from mmprep.store.index import SCHEMA_VERSION

    out, urls = cache
    db = sqlite3.connect(out / "index.sqlite")
    db.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    before = (out / "index.sqlite").read_bytes()
    manifest = tmp_path / "again.jsonl"
    manifest.write_text(json.dumps(urls[0]) + "\n")
    for args in (
        ["encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), "--allow-local-dir",
         str(Path(urls[0]).parent), "--progress", "none"],
        ["stats", str(out)], ["verify", str(out)], ["gc", str(out)], ["show", str(out), urls[0]],
        ["index", "rebuild", str(out)], ["merge", str(tmp_path / "merged"), str(out)],
    ):  # fmt: skip
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "index schema version '3'" in result.output and "upgrade mmprep" in result.output, args
    with pytest.raises(CacheVersionError, match="written by a newer mmprep"):
        EmbeddingCache(out)
    assert (out / "index.sqlite").read_bytes() == before


def test_a_cache_dir_that_cannot_be_made_is_a_usage_error(tmp_path):
    """--out below a regular file: exit 2 and a one-line reason, not a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps("https://example.com/a.jpg") + "\n")
    result = cli(
        "encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(blocker / "cache"), "--progress", "none"
    )
    assert result.exit_code == 2
    assert f"error: cannot use {blocker / 'cache'} as a cache directory: Not a directory\n" in result.output


def test_a_corrupt_index_is_a_usage_error_everywhere_and_index_rebuild_repairs_it(cache, tmp_path):
    out, urls = cache
    for leftover in out.glob("index.sqlite-*"):
        leftover.unlink()
    (out / "index.sqlite").write_bytes(b"\x13" * 5000)  # not a database
    manifest = tmp_path / "again.jsonl"
    manifest.write_text(json.dumps(urls[0]) + "\n")
    for args in (
        ["encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), "--allow-local-dir",
         str(Path(urls[0]).parent), "--progress", "none"],
        ["stats", str(out)], ["verify", str(out)], ["gc", str(out), "--dry-run"], ["show", str(out), urls[0]],
        ["merge", str(tmp_path / "merged"), str(out)],
    ):  # fmt: skip
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert f"is not a readable index (file is not a database); `mmprep index rebuild {out}`" in result.output, args
    assert not (tmp_path / "merged").exists()  # a bad source is refused before DEST is made
    assert cli("index", "rebuild", str(out)).exit_code == 0
    assert json.loads(cli("stats", str(out), "--json").stdout)["entries"] == len(urls)


@pytest.mark.parametrize(
    "args",
    [
        ["--progress", "weird"], ["--timeout", "0"], ["--timeout", "nan"], ["--max-bytes", "99999999999999TiB"],
        ["--refresh-older-than", "soon"],
    ],
)  # fmt: skip
def test_option_values_out_of_range_are_usage_errors(args, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps("https://example.com/a.jpg") + "\n")
    result = cli("encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(tmp_path / "c"), *args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "c").exists()


def test_check_and_show_refuse_a_directory_as_their_output_file(cache, tmp_path):
    out, urls = cache
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(urls[0]) + "\n")
    folder = Path(urls[0]).parent
    checked = cli("check", str(manifest), "--size", "32x32", "--allow-local-dir", str(folder), "--errors", str(folder))
    assert checked.exit_code == 2 and "cannot write the error records" in checked.output
    huge = cli("check", str(manifest), "--size", "100000x100000", "--allow-local-dir", str(folder))
    assert huge.exit_code == 2  # would allocate 40 GB per row
    shown = cli("show", str(out), urls[0], "--export", str(tmp_path))
    assert shown.exit_code == 2 and "is a directory" in shown.output


def test_an_open_reader_follows_an_index_rebuild_and_refuses_use_after_close(cache, tmp_path):
    """`index rebuild` renames a new index over the old one: an open EmbeddingCache reopens it (it
    used to keep serving the deleted file, missing every later row); a closed one says so."""
    out, urls = cache
    images = Path(urls[0]).parent
    extra = images / "extra.png"
    extra.write_bytes(image_bytes("RGB", (40, 30), "PNG", 99))
    manifest = tmp_path / "more.jsonl"
    manifest.write_text(json.dumps(str(extra)) + "\n")
    reader = EmbeddingCache(out, memory_bytes=1 << 20)
    assert all(e is not None for e in reader.get_many(urls)) and reader.get(str(extra)) is None
    assert cli("index", "rebuild", str(out)).exit_code == 0
    assert cli("encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(out), "--allow-local-dir",
               str(images), "--progress", "none").exit_code == 0  # fmt: skip
    got = reader.get_many(urls + [str(extra)])
    assert all(e is not None for e in got)
    with EmbeddingCache(out) as fresh:
        assert torch.equal(fresh.get(str(extra)).embeddings, got[-1].embeddings)
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.get(urls[0])


def test_merge_completes_a_run_copied_while_running_and_refuses_a_dest_inside_a_source(cache, tmp_path):
    out, _ = cache
    snapshot = tmp_path / "snapshot"  # the source as a merge taken mid-run saw it
    import shutil

    shutil.copytree(out, snapshot)
    db = sqlite3.connect(snapshot / "index.sqlite")
    db.execute("UPDATE runs SET status='running', finished=NULL, exit_code=NULL, summary=NULL")
    db.commit()
    db.close()
    dest = tmp_path / "dest"
    assert cli("merge", str(dest), str(snapshot)).exit_code == 0
    assert cli("merge", str(dest), str(out)).exit_code == 0  # the same run, now finished
    [run] = json.loads(cli("stats", str(dest), "--json").stdout)["runs"]
    assert (run["status"], run["exit_code"], run["encoded"]) == ("completed", 0, 6)
    nested = cli("merge", str(out / "shards" / "x"), str(out))
    assert nested.exit_code == 2 and "lies inside the source cache" in nested.output
    assert not (out / "shards" / "x").exists()
