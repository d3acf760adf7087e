"""Decode profiles (--decode-as vllm|hf|pil) against the exact transformations they mirror.

References: PIL's ImageOps.exif_transpose, transformers' convert_to_rgb, and, when a Python with vLLM
is at hand (env MMPREP_VLLM_PYTHON, or vLLM importable here), vLLM's own ImageMediaIO.load_bytes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from _cli import cli
from mmprep.imaging.decode import decode_flags, decode_image, pixel_options, to_rgb
from mmprep.errors import ErrorKind, RowError
from mmprep.settings import LoadSettings

from _image_corpus import encode, exif_jpeg, from_values, noise

ALL = ("JPEG", "PNG", "WEBP", "TIFF")
VLLM, HF, PIL = (LoadSettings(decode_as=p, formats=ALL) for p in ("vllm", "hf", "pil"))


def pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im)


def opened(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def hf_convert_to_rgb(im: Image.Image) -> np.ndarray:
    """transformers' own convert_to_rgb (its PIL branch) on the opened image."""
    from transformers.image_transforms import convert_to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_to_rgb(im, return_numpy=True)
    return np.asarray(out)


def asymmetric(size: tuple[int, int] = (24, 16)) -> Image.Image:
    """An RGB image with no symmetry, so every orientation gives different pixels."""
    im = noise(size, seed=3)
    im.paste((255, 0, 0), (0, 0, 6, 4))  # one marked corner
    return im


# --- EXIF orientation 1..8 ------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_per_profile(orientation: int) -> None:
    data = exif_jpeg(asymmetric(), orientation)
    plain = opened(data).convert("RGB")
    transposed = ImageOps.exif_transpose(opened(data)).convert("RGB")
    if orientation != 1:  # the reference really moves pixels, so the assertions below can fail
        assert transposed.size != plain.size or not np.array_equal(pixels(transposed), pixels(plain))
    assert np.array_equal(pixels(decode_image(data, VLLM)), pixels(transposed))
    assert np.array_equal(pixels(decode_image(data, HF)), hf_convert_to_rgb(opened(data)))
    assert np.array_equal(pixels(decode_image(data, HF)), pixels(plain))
    assert np.array_equal(pixels(decode_image(data, PIL)), pixels(plain))


def test_exif_overrides_work_both_ways() -> None:
    data = exif_jpeg(asymmetric(), 6)
    assert decode_image(data, replace(VLLM, exif_transpose=False)).size == (24, 16)
    assert decode_image(data, replace(HF, exif_transpose=True)).size == (16, 24)
    assert decode_image(data, replace(PIL, exif_transpose=True)).size == (16, 24)


def test_unreadable_exif_is_ignored_like_vllm() -> None:
    """vLLM's normalize_image swallows exif_transpose errors and keeps the image as opened; the pil
    profile with --exif-transpose keeps failing the row as it always did."""
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", "\nexif\n 4\nnot hex at all")  # ImageMagick's EXIF text chunk, broken
    data = encode(asymmetric(), "PNG", pnginfo=text)
    with pytest.raises(ValueError, match="non-hexadecimal"):
        ImageOps.exif_transpose(opened(data))
    assert np.array_equal(pixels(decode_image(data, VLLM)), pixels(asymmetric()))
    with pytest.raises(RowError) as info:
        decode_image(data, replace(PIL, exif_transpose=True))
    assert info.value.kind is ErrorKind.DECODE_ERROR and "non-hexadecimal" in info.value.message


# --- transparency, CMYK, 16 bit ------------------------------------------------------------------

PALETTE = [255, 0, 0, 0, 0, 255, 0, 255, 0, 10, 20, 30]


def _palette(values: list[int]) -> Image.Image:
    im = from_values("P", values, (len(values), 1))
    im.putpalette(PALETTE)
    return im


def _gradient_rgba() -> Image.Image:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 32, 4), dtype=np.uint8)
    a[..., 3] = np.arange(256, dtype=np.uint8).reshape(8, 32)  # every alpha value once
    return Image.fromarray(a, "RGBA")


# name -> encoded bytes. Every case is a real file Pillow wrote (PA as TIFF: PNG cannot hold it).
CASES: dict[str, bytes] = {
    "RGBA": encode(_gradient_rgba(), "PNG"),
    "LA": encode(_gradient_rgba().convert("LA"), "PNG"),
    "PA": encode(Image.merge("PA", (_palette([0, 1, 2, 3]).getchannel(0), Image.new("L", (4, 1), 77))), "TIFF"),
    "P tRNS index": encode(_palette([0, 1, 2, 3]), "PNG", transparency=1),
    "P tRNS bytes": encode(_palette([0, 1, 2, 3]), "PNG", transparency=bytes([255, 0, 128, 255])),
    "L tRNS": encode(from_values("L", [7, 100, 7, 200]), "PNG", transparency=7),
    "RGB tRNS": encode(from_values("RGB", [(1, 2, 3), (4, 5, 6)]), "PNG", transparency=(1, 2, 3)),
    "RGB": encode(noise((16, 8)), "PNG"),
    "L": encode(from_values("L", [0, 90, 255]), "PNG"),
    "1-bit": encode(from_values("1", [0, 1, 1, 0]), "PNG"),
    "CMYK": encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
    "I;16": encode(Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000), "PNG"),
    "RGBA WEBP": encode(_gradient_rgba(), "WEBP", lossless=True),
}
# The cases where vLLM and transformers differ: vLLM keeps an RGB image as is, tRNS colour key included.
VLLM_KEEPS_RGB = {"RGB tRNS"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_profile_is_transformers_convert_to_rgb(name: str) -> None:
    assert np.array_equal(pixels(decode_image(CASES[name], HF)), hf_convert_to_rgb(opened(CASES[name])))


@pytest.mark.parametrize("name", sorted(CASES))
def test_vllm_profile_composites_like_hf_except_on_rgb_images(name: str) -> None:
    data = CASES[name]
    got = pixels(decode_image(data, VLLM))
    expected = pixels(opened(data).convert("RGB")) if name in VLLM_KEEPS_RGB else hf_convert_to_rgb(opened(data))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pil_profile_is_unchanged(name: str) -> None:
    """`pil` is the decode older caches were made with: convert("RGB"), 16-bit scaled by >> 8."""
    data = CASES[name]
    expected = opened(data)
    if name == "I;16":
        expected = Image.fromarray((np.asarray(expected).astype(np.uint32) >> 8).astype(np.uint8))
    elif name == "P tRNS bytes":
        expected = expected.convert("RGBA")
    assert np.array_equal(pixels(decode_image(data, PIL)), pixels(expected.convert("RGB")))


def test_profiles_really_differ_where_they_should() -> None:
    """The cases above can fail: transparent pixels land on white, not on their hidden colour."""
    rgba = CASES["RGBA"]
    transparent = np.asarray(opened(rgba))[..., 3] == 0
    assert transparent.any()
    assert (pixels(decode_image(rgba, VLLM))[transparent] == 255).all()
    assert not (pixels(decode_image(rgba, PIL))[transparent] == 255).all()
    rgb_trns = CASES["RGB tRNS"]
    assert pixels(decode_image(rgb_trns, VLLM))[0, 0].tolist() == [1, 2, 3]
    assert pixels(decode_image(rgb_trns, HF))[0, 0].tolist() == [255, 255, 255]
    sixteen = CASES["I;16"]  # vLLM and transformers clip 16-bit values at 255; pil scales them
    assert pixels(decode_image(sixteen, VLLM))[0, 1].tolist() == [255] * 3
    assert pixels(decode_image(sixteen, PIL))[0, 1].tolist() == [4000 >> 8] * 3


def test_hand_computed_composite_and_background_override() -> None:
    data = encode(from_values("RGBA", [(10, 20, 30, 0), (10, 20, 30, 255), (200, 100, 0, 128)]), "PNG")
    for profile in (VLLM, HF):
        assert pixels(decode_image(data, profile)).tolist() == [[[255, 255, 255], [10, 20, 30], [227, 177, 127]]]
        black = replace(profile, alpha_background=(0, 0, 0))
        assert pixels(decode_image(data, black)).tolist() == [[[0, 0, 0], [10, 20, 30], [100, 50, 0]]]


def test_pa_image_in_memory() -> None:
    """PA (palette + alpha), which only a few formats store: through to_rgb directly as well."""
    pa = Image.merge("PA", (_palette([0, 1, 2, 3]).getchannel(0), from_values("L", [0, 255, 128, 255])))
    for profile in (VLLM, HF):
        assert np.array_equal(pixels(to_rgb(pa, profile)), hf_convert_to_rgb(pa))
    assert pixels(to_rgb(pa, VLLM))[0, 0].tolist() == [255, 255, 255]


# --- fingerprint facts ---------------------------------------------------------------------------


def test_pixel_options_per_profile_and_override() -> None:
    base = LoadSettings()
    assert base.decode_as == "vllm" and pixel_options(base) == {"decode_as": "vllm"}
    assert pixel_options(replace(base, decode_as="hf")) == {"decode_as": "hf"}
    assert pixel_options(replace(base, decode_as="pil")) == {}  # what caches made before profiles recorded
    # overrides equal to the profile's own choice change nothing, so they add nothing
    assert pixel_options(replace(base, alpha_background=(255, 255, 255), exif_transpose=True)) == {"decode_as": "vllm"}
    assert pixel_options(replace(base, exif_transpose=False)) == {"decode_as": "vllm", "exif_transpose": False}
    assert pixel_options(replace(base, decode_as="hf", exif_transpose=True, alpha_background=(1, 2, 3))) == {
        "decode_as": "hf", "exif_transpose": True, "alpha_background": [1, 2, 3]}  # fmt: skip
    # pil keeps the old records of the old flags
    old = replace(base, decode_as="pil", exif_transpose=True, alpha_background=(255, 255, 255), fast_decode=True)
    assert pixel_options(old) == {"fast_decode": True, "exif_transpose": True, "alpha_background": [255, 255, 255]}
    assert decode_flags({"decode_as": "vllm", "exif_transpose": False}) == ["--decode-as vllm", "--no-exif-transpose"]
    assert decode_flags({"exif_transpose": True}, profile=True) == ["--decode-as pil", "--exif-transpose"]
    with pytest.raises(ValueError, match="unknown decode profile"):
        pixel_options(replace(base, decode_as="opencv"))


# --- vLLM's own loader, when a Python with vLLM is available -------------------------------------

_VLLM_SCRIPT = """
import json, sys, numpy as np
from pathlib import Path
from vllm.multimodal.media.image import ImageMediaIO
import vllm
root = Path(sys.argv[1])
io_ = ImageMediaIO()
for path in sorted(root.glob("*.img")):
    try:
        np.save(path.with_suffix(".npy"), np.asarray(io_.load_bytes(path.read_bytes()).media.convert("RGB")))
    except Exception as exc:
        path.with_suffix(".err").write_text(repr(exc))
print(json.dumps({"vllm": vllm.__version__}))
"""


def _vllm_python() -> str | None:
    candidate = os.environ.get("MMPREP_VLLM_PYTHON")
    if candidate:
        return candidate
    try:
        import vllm.multimodal.media.image  # noqa: F401
    except Exception:
        return None
    return sys.executable


def test_vllm_profile_equals_vllms_own_loader(tmp_path: Path) -> None:
    python = _vllm_python()
    if python is None:
        pytest.skip("no Python with vLLM here (set MMPREP_VLLM_PYTHON to one, e.g. the interop venv)")
    cases = dict(CASES)
    cases.update({f"exif {o}": exif_jpeg(asymmetric(), o) for o in range(1, 9)})
    names = {}
    for i, (name, data) in enumerate(sorted(cases.items())):
        (tmp_path / f"{i:02d}.img").write_bytes(data)
        names[i] = name
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": ""}
    done = subprocess.run(
        [python, "-c", _VLLM_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode != 0:
        pytest.skip(f"vLLM's loader could not run: {done.stderr.strip().splitlines()[-1:]}")
    compared = 0
    for i, name in names.items():
        ours = pixels(decode_image(cases[name], replace(VLLM, formats=ALL)))
        theirs = np.load(tmp_path / f"{i:02d}.npy")
        assert np.array_equal(ours, theirs), name
        compared += 1
    assert compared == len(cases)
    print(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the command line: --decode-as, MMPREP_DECODE_AS, and a cache of another profile ---------------


def test_a_run_says_when_the_cache_holds_this_model_decoded_another_way(tmp_path: Path) -> None:
    from mmprep.keys import cache_key
    from mmprep.store.reader import EmbeddingCache

    images = tmp_path / "img"
    images.mkdir()
    (images / "logo.png").write_bytes(CASES["RGBA"])
    (images / "photo.jpg").write_bytes(exif_jpeg(asymmetric(), 6))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"url": str(images / n)}) + "\n" for n in ("logo.png", "photo.jpg")))
    cache = tmp_path / "cache"
    common = [str(manifest), "--model", "builtin:tiny-clip", "--out", str(cache), "--allow-local-dir", str(images)]

    def encode_run(*extra: str, env: dict[str, str] | None = None, progress: str = "none") -> tuple[int, dict, str]:
        result = cli("encode", *common, *extra, "--json", "--progress", progress, env=env)
        return result.exit_code, json.loads(result.stdout), result.stderr

    code, old, _ = encode_run("--decode-as", "pil")  # a cache written the way mmprep decoded before profiles
    assert code == 0 and old["encoded"] == 2 and old["other_decodes"] == []
    code, new, stderr = encode_run(progress="log")  # the new default, vllm: a new fingerprint, nothing reused
    assert code == 0 and new["encoded"] == 2 and new["fingerprint"] != old["fingerprint"]
    assert new["other_decodes"] == [{"decode": {}, "flags": "--decode-as pil", "entries": 2}]
    assert ("note: the cache holds 2 entries of this model decoded with --decode-as pil, which this run "
            "(--decode-as vllm) does not reuse; to keep using them, run with --decode-as pil") in stderr  # fmt: skip
    code, again, _ = encode_run(env={"MMPREP_DECODE_AS": "pil"})  # how to keep the old cache
    assert code == 0 and (again["fingerprint"], again["cached"], again["encoded"]) == (old["fingerprint"], 2, 0)
    assert again["other_decodes"] == [{"decode": {"decode_as": "vllm"}, "flags": "--decode-as vllm", "entries": 2}]
    code, hf, _ = encode_run("--decode-as", "hf", "--exif-transpose")
    assert code == 0 and hf["encoded"] == 2 and len(hf["other_decodes"]) == 2

    # The profiles' pixels really reach the embeddings: the transparent logo and the rotated photo differ.
    for url in (str(images / "logo.png"), str(images / "photo.jpg")):
        pil_entry = EmbeddingCache(cache, old["fingerprint"]).get(url)
        vllm_entry = EmbeddingCache(cache, new["fingerprint"]).get(url)
        assert pil_entry is not None and vllm_entry is not None and pil_entry.key == cache_key(url)
        assert not np.allclose(pil_entry.embeddings.numpy(), vllm_entry.embeddings.numpy(), atol=1e-4)

    stats = cli("stats", str(cache)).stdout
    assert "builtin:tiny-clip (--decode-as vllm)" in stats and "(--decode-as hf --exif-transpose)" in stats
    checked = cli("check", str(manifest), "--allow-local-dir", str(images), "--size", "32x32",
                  "--decode-as", "hf", "--no-exif-transpose", "--json", "--progress", "none",
                  "--errors", str(tmp_path / "check-errors.jsonl"))  # fmt: skip
    assert checked.exit_code == 0 and json.loads(checked.stdout)["ok"] == 2
    bad = cli("encode", *common, "--decode-as", "opencv")
    assert bad.exit_code == 2 and "must be one of vllm, hf, pil, not 'opencv'" in " ".join(bad.stderr.split())
