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
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }
    assert private <= {"_asdict"}, private  # (a NamedTuple's public method)
    run = EncodeRun.__init__.__code__.co_names
    assert "EncodePlanner" in run and "CacheWriter" in run
    assert EncodePlanner.__module__ != CacheWriter.__module__


def test_the_ray_engine_sizes_actors_and_loading_tasks_to_the_cluster_or_refuses():
    """Actors that would hold every CPU (the loading tasks then never run: a run that never ends) are
    given a share instead, and what cannot fit is refused with a line that says what fits."""
    import pytest

    from mmprep.engines.ray_engine import MIN_ACTOR_CPUS, Sizing, size_pipeline
    from mmprep.errors import UsageError

    assert size_pipeline({"CPU": 16}, None, 0) == Sizing(1, 1.0, 1.0)  # a CPU each while they fit
    assert size_pipeline({"CPU": 16}, 4, 0) == Sizing(4, 1.0, 1.0)
    two = size_pipeline({"CPU": 2}, 2, 0)  # the run that used to wait forever
    assert two.workers == 2 and 2 * two.actor_cpus + two.load_cpus <= 2 and two.load_cpus > 0
    assert size_pipeline({"CPU": 1}, None, 0) == Sizing(1, 0.5, 0.5)
    for cpus in (1, 2, 3, 7, 64):  # shares never add up to more than the cluster has (Ray's 1e-4 precision)
        for workers in range(1, 4 * cpus):
            try:
                size = size_pipeline({"CPU": cpus}, workers, 0)
            except UsageError:
                continue
            assert workers * size.actor_cpus + size.load_cpus <= cpus and size.actor_cpus >= MIN_ACTOR_CPUS
    assert size_pipeline({"CPU": 8, "GPU": 4}, None, 1).workers == 4  # one per GPU by default
    assert size_pipeline({"CPU": 8, "GPU": 2}, None, 0.5).workers == 4

    with pytest.raises(UsageError, match=r"--workers 8 encoder actors .* 2 CPUs .*use --workers 7 or fewer"):
        size_pipeline({"CPU": 2}, 8, 0)
    size_pipeline({"CPU": 2}, 7, 0)  # what the line offers fits
    with pytest.raises(UsageError, match=r"--gpus-per-worker 1 needs GPUs, and the Ray cluster has 0"):
        size_pipeline({"CPU": 8}, None, 1)
    with pytest.raises(UsageError, match=r"--workers 3 with --gpus-per-worker 1 needs 3 GPUs.*has 2: use --workers 2"):
        size_pipeline({"CPU": 8, "GPU": 2}, 3, 1)
    with pytest.raises(UsageError, match=r"has 0 CPUs"):
        size_pipeline({}, None, 0)
