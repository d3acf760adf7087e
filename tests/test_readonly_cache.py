"""Readers never fail on a read-only cache, and writers refuse it with one line (exit 2).

The cache is made read-only two ways: a read-only bind mount (needs root and mount(2)), and files this user
cannot write (they belong to `nobody`; the reader is root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, via
setpriv: plain root ignores file permissions). Each comes in three states of the index's WAL files: none (a
writer that closed), -wal and -shm (a writer that was killed, one commit only in the -wal), and a -wal without
its -shm. Every command runs in a real process as that reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import image_bytes

from mmprep import EmbeddingCache
from mmprep.store.index import IMMUTABLE, LIVE, SNAPSHOT

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 6
WAL_RUN = "only-in-the-wal"
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]

# Runs in the reader's process: every reading command (through the CLI, as `mmprep` runs it), the reader API, and
# every writing command, each result as [exit code, output]; prints them as one JSON object.
DRIVER = r"""
import json, os, sys
from typer.testing import CliRunner
from mmprep.cli import app
from mmprep import EmbeddingCache
from mmprep.store import open_readonly

cache, work, urls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
index = os.path.join(cache, "index.sqlite")
def run(*args):
    r = CliRunner().invoke(app, list(args))
    crash = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    return [r.exit_code, r.output, crash]
out = {"writable": os.access(index, os.W_OK, effective_ids=True) or os.access(cache, os.W_OK, effective_ids=True)}
ro = open_readonly(index)
out["mode"] = ro.mode
ro.close()
with EmbeddingCache(cache) as reader:
    out["reader"] = [None if e is None else e.embeddings.tolist() for e in reader.get_many(urls)]
out["stats"] = run("stats", "--json", cache)
out["show"] = run("show", cache, urls[0])
out["verify"] = run("verify", cache)
out["verify_deep"] = run("verify", "--deep", "--json", cache)
out["export"] = run("export", cache, "--format", "parquet", "--out", os.path.join(work, "exported"))
out["rewrite"] = run("rewrite", os.path.join(work, "requests.jsonl"), "--cache", cache, "--uuid-only", "--json",
                     "-o", os.path.join(work, "rewritten.jsonl"))
out["merge_from"] = run("merge", os.path.join(work, "merged"), cache)
out["writers"] = {
    "encode": run("encode", os.path.join(work, "m.jsonl"), "--model", "builtin:tiny-clip", "--out", cache,
                  "--allow-local-dir", os.path.join(work, "img"), "--progress", "none"),
    "gc": run("gc", cache, "--older-than", "1s"),
    "gc_failures": run("gc", cache, "--failures"),
    "verify_repair": run("verify", "--repair", cache),
    "rebuild": run("index", "rebuild", cache),
    "merge_into": run("merge", cache, os.path.join(work, "merged")),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory, mmprep_home: str) -> tuple[Path, list[str]]:
    """A cache encoded by a real `mmprep encode` (tiny-clip, local images, three shards), writer closed."""
    root = tmp_path_factory.mktemp("golden")
    images = root / "img"
    images.mkdir()
    urls = []
    for i in range(N_IMAGES):
        (images / f"{i}.png").write_bytes(image_bytes("RGB", (24 + i, 20), "PNG", i))
        urls.append(str(images / f"{i}.png"))
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(u) + "\n" for u in urls))
    cache = root / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "mmprep", "encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(cache),
         "--allow-local-dir", str(images), "--shard-size", "1", "--progress", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not Path(f"{cache}/index.sqlite-wal").exists()  # a closed writer leaves the index file alone
    return root, urls


def _commit_only_to_the_wal(cache: Path) -> None:
    """A writer that commits a run and is killed before any checkpoint: the commit lives only in the -wal."""
    code = (
        "import os, signal, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1]); db.execute('PRAGMA wal_autocheckpoint=0')\n"
        "db.execute(\"INSERT INTO runs (run_id, fingerprint, model, started, status) VALUES (?, 'f', 'm', 1.0, 'running')\","
        " (sys.argv[2],)); db.commit()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(cache / "index.sqlite"), WAL_RUN], timeout=60)
    assert Path(f"{cache}/index.sqlite-wal").stat().st_size > 32 and Path(f"{cache}/index.sqlite-shm").exists()


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(params=["mount", "permissions"])
def read_only(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, Path, list[str]]]:
    """(how, where the test puts the cache, where the reader sees it, the command prefix that runs the reader)."""
    staged = tmp_path / "staged"
    staged.mkdir()
    if request.param == "mount":
        view = tmp_path / "view"
        view.mkdir()
        made = subprocess.run(["mount", "--bind", str(staged), str(view)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"a bind mount needs root and mount(2) here: {made.stderr.strip()}")
        try:
            yield "mount", staged, view, []
        finally:
            subprocess.run(["umount", "--lazy", str(view)], check=True)
        return
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("files this user cannot write: needs root (to chown) and setpriv (to drop the override)")
    yield "permissions", staged, staged, NO_DAC


@pytest.mark.slow  # every command in a subprocess, six times
@pytest.mark.parametrize("wal", ["none", "wal-and-shm", "wal-without-shm"])
def test_every_reader_works_on_a_read_only_cache_and_every_writer_refuses_it(
    golden: tuple[Path, list[str]], read_only: tuple[str, Path, Path, list[str]], wal: str, tmp_path: Path
) -> None:
    how, staged, view, prefix = read_only
    root, urls = golden
    cache = staged / "cache"
    shutil.copytree(root / "cache", cache)
    if wal != "none":
        _commit_only_to_the_wal(cache)
    if wal == "wal-without-shm":
        Path(f"{cache}/index.sqlite-shm").unlink()
    work = tmp_path / "work"
    shutil.copytree(root / "img", work / "img")
    shutil.copy(root / "m.jsonl", work / "m.jsonl")
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    (work / "requests.jsonl").write_text(json.dumps(body) + "\n")
    before = _files(cache)
    if how == "mount":
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the bind mount read-only: {remount.stderr.strip()}")
    else:
        subprocess.run(["chown", "-R", "nobody:nogroup", str(cache)], check=True)

    done = subprocess.run(
        [*prefix, sys.executable, "-c", DRIVER, str(view / "cache"), str(work), json.dumps(urls)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if out["writable"]:
        pytest.skip(f"the reader could still write the cache ({how}): nothing read-only to test")

    assert out["mode"] == {"none": IMMUTABLE, "wal-and-shm": LIVE, "wal-without-shm": SNAPSHOT}[wal]
    for name in ("stats", "show", "verify", "verify_deep", "export", "rewrite", "merge_from"):
        code, output, crash = out[name]
        assert crash is None and code == 0, (name, output, crash)
    stats = json.loads(out["stats"][1])
    assert stats["entries"] == N_IMAGES
    assert (WAL_RUN in {r["run_id"] for r in stats["runs"]}) == (wal != "none")  # commits only in the -wal are seen
    assert json.loads(out["show"][1])["cached"] is True
    assert "clean" in out["verify"][1] and json.loads(out["verify_deep"][1])["ok"] is True
    assert f"exported {N_IMAGES} rows" in out["export"][1]
    assert json.loads(out["rewrite"][1])["replaced"] == N_IMAGES
    assert json.loads((work / "rewritten.jsonl").read_text())["messages"][0]["content"][0]["uuid"]
    for name, (code, output, crash) in out["writers"].items():
        assert crash is None and code == 2, (name, output, crash)
        assert "is read-only" in output and len(output.strip().splitlines()) == 1, (name, output)
        assert "Traceback" not in output

    assert _files(cache) == before  # nothing was written
    with EmbeddingCache(cache) as writable_reader:  # the same embeddings as a reader of the writable cache gets
        assert out["reader"] == [e.embeddings.tolist() for e in writable_reader.get_many(urls)]


def test_a_reader_of_a_read_only_index_follows_a_writer_elsewhere_by_reopening(tmp_path: Path) -> None:
    """EmbeddingCache on a read-only mount of a cache nobody has open reads index.sqlite alone (immutable); when a
    writer elsewhere (through a writable path to the same files) commits, the reader notices and reopens."""
    import torch

    from mmprep import cache_key
    from mmprep.store.index import CacheIndex, open_readonly
    from mmprep.store.layout import CacheLayout
    from mmprep.store.shards import ShardEntry, ShardWriter

    layout = CacheLayout(tmp_path / "cache")

    def add(url: str, run: str) -> torch.Tensor:
        tensor = torch.full((4,), float(len(run)))
        index = CacheIndex(layout.index)
        index.register_model("d" * 64, "tiny", "pooled", {})
        writer = ShardWriter(layout, "d" * 64, "tiny", run)
        writer.add(ShardEntry(key=cache_key(url), url=url, caller_id=None, tensors={"embeddings": tensor},
                              content_sha256="c" * 64, created=1.0))  # fmt: skip
        index.commit_shard(writer.flush(), "d" * 64, run)
        index.close()
        return tensor

    first = add("https://h/first", "r1")
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(layout.root), str(view)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs root and mount(2)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        ro = open_readonly(view / "index.sqlite")
        assert ro.mode == IMMUTABLE and not ro.changed()
        with EmbeddingCache(view) as reader:
            got = reader.get("https://h/first")
            assert got is not None and torch.equal(got.embeddings, first)
            assert reader.get("https://h/second") is None
            second = add("https://h/second", "r22")  # the writer elsewhere
            assert ro.changed()
            got = reader.get("https://h/second")
            assert got is not None and torch.equal(got.embeddings, second)
        ro.close()
    finally:
        subprocess.run(["umount", "--lazy", str(view)], check=True)  # lazy: an open file (a failed test's) stays


# `mmprep` with every file it writes capped at argv[1] bytes: a full disk, as the kernel refuses a larger write.
LIMITED_FILE_SIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mmprep.cli import main
sys.argv[0] = "mmprep"
main()
"""


@pytest.mark.slow  # subprocess runs on a full disk
def test_an_index_a_full_disk_never_let_exist_is_called_that(golden: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A disk full before the index's first commit leaves an empty index.sqlite: verify says it was never created
    (not "unreadable, rebuild it"), stats and show answer for an empty cache, and shards beside it are orphans."""
    root, urls = golden
    cache = tmp_path / "cache"
    full = subprocess.run(
        [sys.executable, "-c", LIMITED_FILE_SIZE, "100", "encode", str(root / "m.jsonl"), "--model", "builtin:tiny-clip",
         "--out", str(cache), "--allow-local-dir", str(root / "img"), "--progress", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == 70, full.stderr
    assert (cache / "index.sqlite").stat().st_size == 0

    def mmprep(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mmprep", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )

    verify = mmprep("verify", str(cache))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "index.sqlite was never created" in verify.stdout and "0 shards, 0 entries checked: clean" in verify.stdout
    assert "unreadable" not in verify.stdout + verify.stderr and "rebuild" not in verify.stdout + verify.stderr
    stats = mmprep("stats", "--json", str(cache))
    assert stats.returncode == 0 and json.loads(stats.stdout)["entries"] == 0, stats.stderr
    show = mmprep("show", str(cache), urls[0])
    assert show.returncode == 1 and json.loads(show.stdout)["cached"] is False, show.stderr
    with pytest.raises(ValueError, match="holds no model"):
        EmbeddingCache(cache)

    shard = next((root / "cache" / "shards").rglob("*.safetensors"))  # a shard whose commit never happened
    (cache / "shards" / shard.parent.name).mkdir(parents=True)
    shutil.copy(shard, cache / "shards" / shard.parent.name / shard.name)
    found = mmprep("verify", "--json", str(cache))
    assert found.returncode == 1
    report = json.loads(found.stdout)
    assert "never created" in report["index_note"] and [p["kind"] for p in report["problems"]] == ["orphan_shard"]
    assert mmprep("verify", "--repair", str(cache)).returncode == 1  # adopts it
    assert mmprep("verify", str(cache)).returncode == 0
    with EmbeddingCache(cache) as reader:
        assert sum(e is not None for e in reader.get_many(urls)) == 1
