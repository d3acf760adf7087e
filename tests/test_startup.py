"""Commands that need no model import no torch/transformers: each is run in a fresh interpreter and asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import image_bytes
from _cli import cli, write_manifest

# Runs one mmprep command in this interpreter, then prints which heavy modules it imported.
PROBE = """
import json, sys
sys.argv = ["mmprep", *sys.argv[1:]]
from mmprep.cli import app
try:
    app()
except SystemExit:
    pass
heavy = ("torch", "transformers", "safetensors.torch")
print("MODULES=" + json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


def heavy_modules(*args: str, cwd) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=300
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("MODULES=")]
    assert line, done.stderr[-2000:]
    return json.loads(line[-1].removeprefix("MODULES="))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A real cache with two entries of builtin:tiny-clip, made from two JPEG files, and their manifest."""
    root = tmp_path_factory.mktemp("startup")
    paths = []
    for i in range(2):
        (root / f"{i}.jpg").write_bytes(image_bytes("RGB", (64, 48), "JPEG", i))
        paths.append(str(root / f"{i}.jpg"))
    manifest = write_manifest(root / "m.jsonl", paths)
    result = cli("encode", manifest, *LOCAL(root), "--model", "builtin:tiny-clip", "--out", str(root / "c"),
                     "--json", "--progress", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    return root, manifest, paths


def LOCAL(root) -> list[str]:
    return ["--allow-local-dir", str(root)]


@pytest.mark.parametrize(
    "command",
    [
        ["stats", "c"],
        ["verify", "c"],
        ["show", "c", "URL0"],
        ["gc", "c", "--dry-run"],
        ["gc", "c", "--older-than", "30d"],
        ["check", "MANIFEST", "--allow-local-dir", ".", "--size", "32x32", "--progress", "none"],
    ],
)
def test_model_free_commands_import_no_torch(cache, command) -> None:
    root, manifest, paths = cache
    args = [{"MANIFEST": manifest, "URL0": paths[0]}.get(a, a) for a in command]
    assert heavy_modules(*args, cwd=root) == []


@pytest.mark.slow  # subprocess runs that import torch
def test_the_probe_sees_torch_when_a_command_needs_it(cache) -> None:
    """The probe can fail: `show --export` reads tensors, `check --model` runs a processor; both import torch."""
    root, manifest, paths = cache
    assert "torch" in heavy_modules("show", "c", paths[0], "--export", str(root / "e.safetensors"), cwd=root)
    assert "transformers" in heavy_modules("check", manifest, *LOCAL(root), "--model", "builtin:tiny-clip", cwd=root)
