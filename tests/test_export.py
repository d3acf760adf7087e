"""`mmprep export --format npy|parquet` on a cache made by `encode`, read back with embedding_reader
(the reader autofaiss uses) and compared, vector by vector and id by id, with `EmbeddingCache`."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _model_helpers import save_clip
from _cli import cli
from conftest import image_bytes
from embedding_reader import EmbeddingReader

from mmprep import EmbeddingCache, cache_key

REPO = Path(__file__).resolve().parent.parent
META = ["url", "id", "key", "content_sha256"]
N_FILES = 17  # local images; plus two data URLs


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny-clip cache of 19 images in several shards, some rows with ids, two of them data URLs;
    then a second model (a local tiny CLIP) on the first 5 images of the same cache."""
    root = tmp_path_factory.mktemp("export")
    images = root / "imgs"
    images.mkdir()
    rows = []
    for i in range(N_FILES):
        path = images / f"{i}.png"
        path.write_bytes(image_bytes("RGB", (20 + i, 24 + i % 3), "PNG", i))
        rows.append({"url": str(path), "id": f"img-{i}"} if i % 3 else {"url": str(path)})
    for i in range(2):
        data = base64.b64encode(image_bytes("RGB", (30, 30), "PNG", 50 + i)).decode()
        rows.append({"url": f"data:image/png;base64,{data}", "id": f"inline-{i}"})
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "cache"
    common = ["--out", str(out), "--allow-local-dir", str(images), "--batch-size", "4", "--progress", "none"]
    result = cli("encode", str(manifest), "--model", "builtin:tiny-clip", "--shard-size", "300", *common)
    assert result.exit_code == 0, result.output
    second = save_clip(root / "clip-b", seed=1)
    (root / "m5.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    result = cli("encode", str(root / "m5.jsonl"), "--model", str(second), *common)
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "rows": rows, "second": str(second)}


def read_all(reader: EmbeddingReader) -> tuple[np.ndarray, list[dict]]:
    vectors, meta = [], []
    for batch, frame in reader(batch_size=6, show_progress=False):
        vectors.append(batch.copy())
        meta.extend(frame.to_dict("records"))
    return np.concatenate(vectors), meta


def assert_matches_cache(cache: dict, vectors: np.ndarray, meta: list[dict], model: str, dtype: type) -> None:
    """Every row equals what EmbeddingCache returns for its URL, and every cached row is there once."""
    ids = {cache_key(r["url"]): r.get("id") for r in cache["rows"]}
    with EmbeddingCache(cache["out"], model=model) as reader:
        assert len(meta) == len(vectors) == len(cache["rows"])
        assert len({m["key"] for m in meta}) == len(meta)
        for vector, m in zip(vectors, meta):
            url = m["url"]
            if url.startswith("data:"):
                assert url == f"data:sha256={m['key']}"  # data URLs as stored, never verbatim
                entry = reader.get_key(m["key"])
            else:
                assert m["key"] == cache_key(url)
                entry = reader.get(url)
            assert entry is not None
            expected = entry.embeddings.float().numpy().astype(dtype)
            assert np.array_equal(vector.astype(dtype), expected), url
            assert (m["id"] if isinstance(m["id"], str) else None) == ids[m["key"]]
            assert re.fullmatch(r"[0-9a-f]{64}", m["content_sha256"])
    assert np.std(vectors) > 1e-3  # real, varied vectors (a constant output would compare trivially)


def test_npy_export_reads_back_with_embedding_reader(cache: dict) -> None:
    out = cache["root"] / "npy"
    result = cli("export", str(cache["out"]), "--out", str(out), "--format", "npy", "--model", "builtin:tiny-clip",
                 "--rows-per-file", "5", "--progress", "none", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert (report["rows"], report["files"], report["dtype"]) == (19, 4, "float32")
    assert "exported 19 rows of builtin:tiny-clip" in result.output
    emb = sorted(p.name for p in (out / "img_emb").iterdir())
    assert emb == [f"img_emb_{i}.npy" for i in range(4)]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(4)]
    for i in range(4):  # numpy's own reader takes the streamed files; each pair is row-aligned
        matrix = np.load(out / "img_emb" / f"img_emb_{i}.npy")
        assert matrix.dtype == np.float32 and matrix.shape == (5 if i < 3 else 4, 16)
        assert pq.read_table(out / "metadata" / f"metadata_{i}.parquet").num_rows == len(matrix)
    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", meta_columns=META,
                             metadata_folder=str(out / "metadata"))  # fmt: skip
    assert (reader.count, reader.dimension) == (19, 16)
    vectors, meta = read_all(reader)
    assert_matches_cache(cache, vectors, meta, "builtin:tiny-clip", np.float32)


def test_parquet_export_float16_reads_back_with_embedding_reader(cache: dict) -> None:
    out = cache["root"] / "parquet"
    result = cli("export", str(cache["out"]), "--out", str(out), "--format", "parquet", "--model", "builtin:tiny-clip",
                 "--dtype", "float16", "--rows-per-file", "8", "--progress", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    schema = pq.read_schema(out / "part-0.parquet")
    vector_type = schema.field("embedding").type
    assert schema.names == [*META, "embedding"] and pa.types.is_fixed_size_list(vector_type)
    assert (vector_type.list_size, vector_type.value_type) == (16, pa.float16())
    reader = EmbeddingReader(str(out), file_format="parquet", embedding_column="embedding", meta_columns=META)
    vectors, meta = read_all(reader)
    assert_matches_cache(cache, vectors, meta, "builtin:tiny-clip", np.float16)
    # negative control: the float16 rows are not the float32 ones (the comparison can fail)
    with EmbeddingCache(cache["out"], model="builtin:tiny-clip") as reader32:
        full = reader32.get_key(meta[0]["key"]).embeddings.numpy()
    assert not np.array_equal(vectors[0], full)


def test_second_model_needs_model_and_exports_only_its_rows(cache: dict) -> None:
    out = cache["root"] / "second"
    result = cli("export", str(cache["out"]), "--out", str(out), "--format", "npy", "--progress", "none")
    assert result.exit_code == 2 and "holds 2 models" in result.output and "--model" in result.output
    assert not out.exists()
    result = cli(
        "export",
        str(cache["out"]),
        "--out",
        str(out),
        "--format",
        "npy",
        "--model",
        cache["second"],
        "--progress",
        "none",
    )
    assert result.exit_code == 0, result.output
    matrix = np.load(out / "img_emb" / "img_emb_0.npy")
    keys = pq.read_table(out / "metadata" / "metadata_0.parquet").column("key").to_pylist()
    assert matrix.shape == (5, 16) and sorted(keys) == sorted(cache_key(r["url"]) for r in cache["rows"][:5])
    with EmbeddingCache(cache["out"], model=cache["second"]) as reader:
        for key, vector in zip(keys, matrix):
            assert np.array_equal(vector, reader.get_key(key).embeddings.numpy())


def test_non_empty_out_needs_overwrite_which_replaces_only_an_export(cache: dict) -> None:
    out = cache["root"] / "again"
    args = ["export", str(cache["out"]), "--out", str(out), "--model", "builtin:tiny-clip", "--progress", "none"]
    assert cli(*args, "--rows-per-file", "3").exit_code == 0
    assert len(list((out / "img_emb").iterdir())) == 7
    refused = cli(*args)
    assert refused.exit_code == 2 and "not empty" in refused.output and "--overwrite" in refused.output
    assert cli(*args, "--overwrite").exit_code == 0
    assert [p.name for p in (out / "img_emb").iterdir()] == ["img_emb_0.npy"]  # the 7 old files are gone
    (out / "notes.txt").write_text("mine")
    foreign = cli(*args, "--overwrite")
    assert foreign.exit_code == 2 and "notes.txt" in foreign.output and (out / "notes.txt").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".again")]  # no staging left behind


@pytest.mark.slow  # subprocess exports killed mid-way
def test_killed_export_leaves_no_file_that_reads_as_complete(cache: dict) -> None:
    """SIGKILL after two of four files are complete: OUT does not exist, nothing named *.npy or *.parquet
    exists anywhere, and the next export removes the dead one's staging directory and succeeds."""
    out = cache["root"] / "killed"
    cmd = [sys.executable, "-m", "mmprep", "export", str(cache["out"]), "--out", str(out), "--format", "npy",
           "--model", "builtin:tiny-clip", "--rows-per-file", "5", "--progress", "none"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMPREP_FAULT": "export_after_file:2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    staging = [p for p in cache["root"].iterdir() if p.name.startswith(".killed.")]
    assert len(staging) == 1 and staging[0].is_dir()
    left = [p for p in staging[0].rglob("*") if p.is_file()]
    assert len(left) == 4  # the two finished pairs, still under their staging names
    assert all(p.name.endswith(".part") for p in left)
    assert not [p for p in cache["root"].rglob("*") if p.suffix in (".npy", ".parquet") and "killed" in str(p)]
    with pytest.raises(ValueError):
        EmbeddingReader(
            str(out / "img_emb"), file_format="parquet_npy", meta_columns=META, metadata_folder=str(out / "metadata")
        )
    rerun = cli(*cmd[3:])  # in-process: the dead export's pid is gone, so its staging directory goes
    assert rerun.exit_code == 0, rerun.output
    assert not [p for p in cache["root"].iterdir() if p.name.startswith(".killed.")]
    assert EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", meta_columns=META,
                           metadata_folder=str(out / "metadata")).count == 19  # fmt: skip


def test_docs_retrieval_snippet_runs_on_an_export(cache: dict, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The FAISS snippet of docs/retrieval.md, run as written on a real export: the first image's nearest
    neighbour is itself (score 1), and the order is the brute-force cosine order."""
    section = (REPO / "docs" / "retrieval.md").read_text()
    snippet = section[
        section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)
    ]
    workdir = cache["root"] / "readme"
    workdir.mkdir()
    result = cli("export", str(cache["out"]), "--out", str(workdir / "clip-export"), "--model", "builtin:tiny-clip",
                 "--rows-per-file", "7", "--progress", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(snippet, "docs/retrieval.md", "exec"), scope)  # noqa: S102
    printed = capsys.readouterr().out
    urls, rows, scores, x = scope["urls"], scope["rows"], scope["scores"], scope["x"]
    assert len(urls) == 19 and rows.shape == (1, 5) and urls[rows[0][0]] in printed
    assert rows[0][0] == 0 and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    brute = np.argsort(-(x @ x[0]))[:5]  # the page's numpy alternative gives the same top-5
    assert list(brute) == list(rows[0])


def test_missing_pyarrow_names_the_extra(cache: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an environment without pyarrow imports
    result = cli("export", str(cache["out"]), "--out", str(cache["root"] / "no-arrow"), "--model", "builtin:tiny-clip")
    assert result.exit_code == 2 and "pip install 'mmprep[parquet]'" in result.output
    assert not (cache["root"] / "no-arrow").exists()


def test_pooled_model_has_no_vllm_store(cache: dict) -> None:
    result = cli(
        "export",
        str(cache["out"]),
        "--out",
        str(cache["root"] / "ec"),
        "--format",
        "vllm-ec",
        "--model",
        "builtin:tiny-clip",
    )
    assert result.exit_code == 2 and "no vLLM encoder-cache layout" in result.output
    assert not (cache["root"] / "ec").exists()
