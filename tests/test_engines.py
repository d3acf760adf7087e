"""Engine selection: the core install never imports Ray, and `--engine ray` without it is a clear usage error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _cli import cli

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_inputs"


def test_engine_ray_without_ray_installed_exits_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees where Ray is not installed
    result = cli(
        "encode", str(SAMPLES / "manifest.jsonl"), "--model", "builtin:tiny-clip", "--out", str(tmp_path / "c"),
        "--allow-local-dir", str(SAMPLES), "--engine", "ray", "--progress", "none",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "pip install 'mmprep[ray]'" in result.output
    assert not (tmp_path / "c" / "index.sqlite").exists()


def test_unknown_engine_exits_2(tmp_path):
    result = cli("encode", str(SAMPLES / "manifest.jsonl"), "--model", "builtin:tiny-clip",
                 "--out", str(tmp_path / "c"), "--engine", "spark")  # fmt: skip
    assert result.exit_code == 2 and "local or ray" in result.output


@pytest.mark.slow  # a subprocess run
def test_local_encode_never_imports_ray(tmp_path, mmprep_home):
    code = (
        "import sys; from typer.testing import CliRunner; from mmprep.cli import app; "
        f"r = CliRunner().invoke(app, ['encode', {str(SAMPLES / 'manifest.jsonl')!r}, '--model', 'builtin:tiny-clip', "
        f"'--out', {str(tmp_path / 'c')!r}, '--allow-local-dir', {str(SAMPLES)!r}, '--progress', 'none']); "
        "assert r.exit_code == 1, r.output; print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_ray_drivers_planned_keys_live_on_disk_and_say_which_are_new():
    """The Ray driver plans every row before any finishes; PlannedKeys keeps those claims in a temporary
    SQLite file (memory flat however long the manifest) and removes it on close."""
    import hashlib
    import os

    from mmprep.engines.ray_engine import PlannedKeys

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    keys += ["00" * 31 + "01", "00" * 31 + "02", "00" * 32]  # sharing every byte but the last
    planned = PlannedKeys()
    folder = planned._dir.name
    assert all(planned.claim(k) for k in keys)
    assert not any(planned.claim(k) for k in keys[::7])
    assert planned.claim("ff" * 32)
    assert os.path.isdir(folder)
    planned.close()
    assert not os.path.exists(folder)


def test_the_ray_engine_composes_the_pipelines_parts_instead_of_subclassing_the_local_run():
    """Both engines use the same planner and cache writer; the Ray run is no subclass of a run and
    reaches for no private name of mmprep.pipeline (a change to the local run cannot silently change it)."""
    import ast

    from mmprep.engines import ray_engine
    from mmprep.pipeline.core import LoadingRun
    from mmprep.pipeline.encode import EncodeRun
    from mmprep.pipeline.planner import EncodePlanner
    from mmprep.pipeline.writer import CacheWriter

    assert not issubclass(ray_engine.RayEncodeRun, LoadingRun) and not issubclass(EncodeRun, ray_engine.RayEncodeRun)
    tree = ast.parse(Path(ray_engine.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmprep.pipeline")
        for alias in node.names
    }
    assert {"EncodePlanner", "CacheWriter"} <= imported
    assert not {name for name in imported if name.startswith("_")} and "EncodeRun" not in imported
    private = {  # x._name where x is not self: another object's private attribute
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }
    assert private <= {"_asdict"}, private  # (a NamedTuple's public method)
    run = EncodeRun.__init__.__code__.co_names
    assert "EncodePlanner" in run and "CacheWriter" in run
    assert EncodePlanner.__module__ != CacheWriter.__module__
