"""End-to-end `mmprep encode` / `mmprep stats` against a real local HTTP server and real tiny models."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from _cli import NET, cli, encode_json, write_manifest
from conftest import image_bytes
from mmprep import cache_key

REPO = Path(__file__).resolve().parent.parent


def stored(cache: Path, url: str) -> dict[str, torch.Tensor]:
    """Read an entry back the way serving code would: index row → shard → tensors."""
    db = sqlite3.connect(cache / "index.sqlite")
    shard, names = db.execute("SELECT shard, tensors FROM entries WHERE key=?", (cache_key(url),)).fetchone()
    db.close()
    with safe_open(str(cache / "shards" / shard), "pt") as f:
        return {n: f.get_tensor(n) for n in json.loads(names)}


def served_as_vllm_loads_it(data: bytes) -> Image.Image:
    """The default decode profile's pixels for an image without EXIF orientation or RGB colour key:
    transformers' convert_to_rgb (transparency on white; test_decode_profiles.py checks the equality)."""
    from transformers.image_transforms import convert_to_rgb

    with Image.open(io.BytesIO(data)) as image:
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))


@pytest.fixture()
def served(image_server):
    """Six distinct images of different modes/formats/sizes on the server."""
    specs = [
        ("/a.png", image_bytes("RGB", (48, 40), "PNG", 1), "image/png"),
        ("/b.jpg", image_bytes("RGB", (64, 32), "JPEG", 2), "image/jpeg"),
        ("/c.webp", image_bytes("RGB", (30, 50), "WEBP", 3), "image/webp"),
        ("/d.png", image_bytes("RGBA", (40, 40), "PNG", 4), "image/png"),
        ("/e.png", image_bytes("L", (33, 47), "PNG", 5), "image/png"),
        ("/F.png", image_bytes("RGB", (50, 50), "PNG", 6), "image/png"),
    ]
    return {path: image_server.add(path, body, ctype) for path, body, ctype in specs}


def test_encode_http_manifest_end_to_end(tmp_path, image_server, served):
    cache = tmp_path / "cache"
    urls = list(served.values())
    rows = [
        {"url": urls[0], "id": "first"},
        {"image_url": urls[1]},
        {"image_url": {"url": urls[2]}},
        urls[3],
        {
            "custom_id": "req",
            "body": {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": urls[4]}},
                            {"type": "image_url", "image_url": {"url": urls[0]}},  # duplicate of row 1
                        ],
                    }
                ]
            },
        },
        {"url": urls[5]},
        {"url": image_server.url("/missing.png")},  # 404
        "{this is not json",
        {"url": urls[1]},  # duplicate
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    code, summary = encode_json(
        manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET, "--batch-size", "4"
    )
    assert code == 1
    assert summary["rows"] == 10
    assert (summary["encoded"], summary["duplicates"], summary["failed"], summary["cached"]) == (6, 2, 2, 0)
    assert summary["failures_by_kind"] == {"bad_manifest_line": 1, "http_status": 1}
    for path in served:
        assert image_server.hits[path] == 1, f"{path} fetched {image_server.hits[path]} times"

    errors = [json.loads(line) for line in (cache / "errors.jsonl").read_text().splitlines()]
    by_kind = {e["kind"]: e for e in errors}
    assert by_kind["http_status"]["status"] == 404 and by_kind["http_status"]["line"] == 7
    assert by_kind["bad_manifest_line"]["line"] == 8 and "invalid JSON" in by_kind["bad_manifest_line"]["message"]

    db = sqlite3.connect(cache / "index.sqlite")
    assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 6
    assert db.execute("SELECT caller_id FROM entries WHERE key=?", (cache_key(urls[0]),)).fetchone()[0] == "first"
    assert db.execute("SELECT caller_id FROM entries WHERE key=?", (cache_key(urls[4]),)).fetchone()[0] == "req:0"
    shapes = {row[0] for row in db.execute("SELECT shape FROM entries")}
    assert shapes == {"[16]"}  # tiny-clip projection dim: one pooled vector per image
    db.close()

    # Second run: nothing fetched again, every good row cached, the 404 skipped as a permanent failure.
    hits_before = image_server.total_hits
    code2, again = encode_json(manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET)
    assert image_server.total_hits == hits_before
    assert (again["encoded"], again["cached"], again["skipped_failed"]) == (0, 8, 1)  # duplicates are cached rows now
    assert again["failures_by_kind"] == {"bad_manifest_line": 1}
    assert code2 == 0  # the bad line and the 404 failed before, the same way: counted, not a new failure


def test_all_good_rows_exit_zero_and_model_defaults_to_the_caches_only_model(tmp_path, image_server, served):
    cache = tmp_path / "cache"
    manifest = write_manifest(tmp_path / "m.jsonl", list(served.values())[:3])
    code, first = encode_json(manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET)
    assert code == 0 and first["encoded"] == 3
    more = write_manifest(tmp_path / "more.jsonl", list(served.values()))
    env = {"MMPREP_CACHE_DIR": str(cache), "MMPREP_ALLOW_HTTP": "1", "MMPREP_ALLOW_HOST": "127.0.0.1"}
    code, second = encode_json(more, env=env)  # the cron line: no --model, no --out
    assert code == 0
    assert (second["model"], second["encoded"], second["cached"]) == ("builtin:tiny-clip", 3, 3)
    assert first["first_batch_s"] > 0 and second["first_batch_s"] > 0  # model loading included
    code, third = encode_json(more, env=env)
    assert (code, third["encoded"], third["first_batch_s"]) == (0, 0, None)  # nothing encoded: no first batch


def test_pooled_embeddings_equal_a_direct_transformers_forward(tmp_path, image_server, served):
    from transformers import AutoImageProcessor, CLIPModel

    from mmprep.models.builtin import builtin_model_dir

    cache = tmp_path / "cache"
    manifest = write_manifest(tmp_path / "m.jsonl", list(served.values()))
    code, _ = encode_json(manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET, "--batch-size", "3")
    assert code == 0
    model_dir = builtin_model_dir("tiny-clip")
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    for path, url in served.items():
        image = served_as_vllm_loads_it(image_server.routes[path].body)
        with torch.inference_mode():
            out = model.get_image_features(**processor(images=image, return_tensors="pt"))
        expected = getattr(out, "pooler_output", out)[0]
        got = stored(cache, url)[cache_key(url)]
        assert got.shape == expected.shape
        assert torch.max(torch.abs(got - expected)).item() <= 1e-5, path


def test_qwen2_vl_entries_carry_grid_and_equal_direct_forward(tmp_path, image_server, served):
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    from mmprep.models.builtin import builtin_model_dir

    cache = tmp_path / "cache"
    urls = [served["/a.png"], served["/b.jpg"], served["/c.webp"]]
    manifest = write_manifest(tmp_path / "m.jsonl", urls)
    code, summary = encode_json(manifest, "--model", "builtin:tiny-qwen2-vl", "--out", str(cache), *NET)
    assert code == 0 and summary["encoded"] == 3
    model_dir = builtin_model_dir("tiny-qwen2-vl")
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    merge = model.config.vision_config.spatial_merge_size
    for path, url in zip(["/a.png", "/b.jpg", "/c.webp"], urls):
        image = served_as_vllm_loads_it(image_server.routes[path].body)
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        expected = getattr(out, "pooler_output", out)
        tensors = stored(cache, url)
        grid = tensors[cache_key(url) + ".image_grid_thw"]
        assert torch.equal(grid.reshape(-1, 3), inputs["image_grid_thw"])
        got = tensors[cache_key(url)]
        assert got.shape[0] == int(inputs["image_grid_thw"].prod()) // merge**2
        assert torch.max(torch.abs(got - expected)).item() <= 1e-5, path


def test_local_files_data_urls_and_scheme_errors(tmp_path):
    allowed = tmp_path / "imgs"
    allowed.mkdir()
    (allowed / "x.png").write_bytes(image_bytes("RGB", (20, 20), "PNG", 9))
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes("RGB", (20, 20), "PNG", 10))
    data = "data:image/png;base64," + base64.b64encode(image_bytes("LA", (16, 16), "PNG", 11)).decode()
    rows = [
        {"url": str(allowed / "x.png")},
        {"url": (allowed / "x.png").as_uri()},
        {"url": data},
        {"url": str(outside)},
        {"url": "ftp://example.com/a.png"},
        {"url": "data:text/html;base64,PGgxPmhpPC9oMT4="},
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    cache = tmp_path / "cache"
    code, s = encode_json(
        manifest, "--model", "builtin:tiny-clip", "--out", str(cache), "--allow-local-dir", str(allowed)
    )
    assert code == 1
    assert s["encoded"] == 3
    assert s["failures_by_kind"] == {"bad_data_url": 1, "bad_path": 1, "bad_scheme": 1}
    db = sqlite3.connect(cache / "index.sqlite")
    urls = {row[0] for row in db.execute("SELECT url FROM entries")}
    db.close()
    assert data not in urls and any(u.startswith("data:sha256=") for u in urls)  # data URLs stored by hash
    errors = (cache / "errors.jsonl").read_text()
    assert "PGgxPmhpPC9oMT4=" not in errors


def test_stdin_manifest_and_env_options(tmp_path, image_server, served):
    cache = tmp_path / "cache"
    env = {
        "MMPREP_MODEL": "builtin:tiny-clip",
        "MMPREP_CACHE_DIR": str(cache),
        "MMPREP_BATCH_SIZE": "2",
        "MMPREP_ALLOW_HTTP": "true",
        "MMPREP_ALLOW_HOST": "127.0.0.1",
    }
    stdin = "\n".join(json.dumps(u) for u in list(served.values())[:2]) + "\n"
    code, s = encode_json("-", env=env, input=stdin)
    assert code == 0 and s["encoded"] == 2 and s["cache_dir"] == str(cache)


def test_usage_errors_exit_2(tmp_path, image_server, served):
    manifest = write_manifest(tmp_path / "m.jsonl", list(served.values())[:1])
    missing = cli("encode", str(tmp_path / "nope.jsonl"), "--model", "builtin:tiny-clip", "--out", str(tmp_path / "c"))
    assert missing.exit_code == 2 and "manifest not found" in missing.output
    no_model = cli("encode", manifest, "--out", str(tmp_path / "empty"), env={"MMPREP_MODEL": ""})
    assert no_model.exit_code == 2 and "--model" in no_model.output
    bad_model = cli("encode", manifest, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "c"))
    assert bad_model.exit_code == 2
    bad_flag = cli("encode", manifest, "--model", "builtin:tiny-clip", "--max-bytes", "lots")
    assert bad_flag.exit_code == 2
    assert not (tmp_path / "c" / "index.sqlite").exists()  # nothing started


def test_stats_table_and_json(tmp_path, image_server, served):
    cache = tmp_path / "cache"
    rows = list(served.values())[:3] + [image_server.url("/gone.png")]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    encode_json(manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET)
    result = cli("stats", str(cache), "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["entries"] == 3 and data["failures_by_kind"] == {"http_status": 1}
    [model] = data["models"]
    assert model["name"] == "builtin:tiny-clip" and model["entries"] == 3 and model["shards"] >= 1
    assert model["shapes"] == [{"dtype": "float32", "shape": [16], "entries": 3}]
    assert data["runs"][0]["encoded"] == 3 and data["runs"][0]["status"] == "completed"
    assert data["bytes_on_disk"] > model["shard_bytes"] > 0
    assert data["failures_by_host"] == {"127.0.0.1": 1} and model["live_fraction"] == 1.0
    assert data["runs"][0]["hit_rate"] == 0.0 and 0 <= data["last_completed_run_age_s"] < 60
    assert data["last_clean_run_age_s"] is None  # the only run had a failing row
    encode_json(manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET)  # rerun: all cached
    rerun = json.loads(cli("stats", str(cache), "--json").stdout)["runs"][0]
    assert rerun["hit_rate"] == 0.75 and rerun["cached"] == 3  # 3 of 4 rows cached, the 404 skipped
    table = cli("stats", str(cache))
    assert table.exit_code == 0
    assert (
        "builtin:tiny-clip" in table.stdout and "http_status" in table.stdout and "last completed run" in table.stdout
    )
    missing = cli("stats", str(tmp_path / "nothing"))
    assert missing.exit_code == 2 and "not an mmprep cache" in missing.output


def test_pixel_changing_decode_options_get_their_own_fingerprint(tmp_path, image_server):
    """--fast-decode (like --exif-transpose and --alpha-background) changes the embeddings, so its
    entries live under a fingerprint of their own: one cache never mixes them with exact ones."""
    from mmprep.imaging.decode import pixel_options
    from mmprep.models import load_encoder
    from mmprep.settings import LoadSettings, ModelSettings
    from mmprep.store.reader import EmbeddingCache

    cache = tmp_path / "cache"
    urls = [image_server.add(f"/big{i}.jpg", image_bytes("RGB", (400, 300), "JPEG", i), "image/jpeg") for i in range(3)]
    manifest = write_manifest(tmp_path / "m.jsonl", urls)
    base = [manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET]
    _, exact = encode_json(*base)
    _, fast = encode_json(*base, "--fast-decode")
    _, fast_again = encode_json(*base, "--fast-decode")
    _, exact_again = encode_json(*base)
    default = load_encoder(ModelSettings("builtin:tiny-clip"), pixel_options(LoadSettings())).fingerprint
    assert exact["fingerprint"] == default  # the default decode profile (vllm), nothing else
    assert fast["fingerprint"] != exact["fingerprint"]
    assert (exact["encoded"], fast["encoded"]) == (3, 3)  # not served from the exact entries
    assert (fast_again["cached"], exact_again["cached"]) == (3, 3)
    assert (fast_again["fingerprint"], exact_again["fingerprint"]) == (fast["fingerprint"], exact["fingerprint"])

    with pytest.raises(ValueError, match="matches 2 models.*decoded with decode_as=vllm, fast_decode=True"):
        EmbeddingCache(cache, model="builtin:tiny-clip")
    with EmbeddingCache(cache, model=exact["fingerprint"]) as a, EmbeddingCache(cache, model=fast["fingerprint"]) as b:
        for url in urls:
            assert not torch.equal(a.get(url).embeddings, b.get(url).embeddings)  # the pixels really differ

    models = {m["fingerprint"]: m for m in json.loads(cli("stats", str(cache), "--json").stdout)["models"]}
    assert models[exact["fingerprint"]]["decode"] == {"decode_as": "vllm"}
    assert models[fast["fingerprint"]]["decode"] == {"decode_as": "vllm", "fast_decode": True}
    assert "builtin:tiny-clip (--decode-as vllm --fast-decode)" in cli("stats", str(cache)).stdout


def test_every_pixel_changing_option_changes_the_fingerprint():
    from dataclasses import replace

    from mmprep.imaging.decode import pixel_options
    from mmprep.models import load_encoder
    from mmprep.settings import LoadSettings, ModelSettings

    pil = LoadSettings(decode_as="pil")
    variants = [pil, replace(pil, fast_decode=True), replace(pil, exif_transpose=True),
                replace(pil, alpha_background=(255, 255, 255)), replace(pil, alpha_background=(0, 0, 0)),
                replace(pil, fast_decode=True, exif_transpose=True), LoadSettings(), LoadSettings(decode_as="hf"),
                LoadSettings(exif_transpose=False), LoadSettings(alpha_background=(0, 0, 0))]  # fmt: skip
    model = ModelSettings("builtin:tiny-clip")
    prints = [load_encoder(model, pixel_options(v)).fingerprint for v in variants]
    assert len(set(prints)) == len(variants)
    # pil without overrides is the fingerprint of caches made before decode profiles (no decode facts)
    assert (
        prints[0]
        == load_encoder(model).fingerprint
        == load_encoder(model, pixel_options(replace(pil, max_side=99))).fingerprint
    )
    assert load_encoder(model, pixel_options(variants[3])).describe()["decode"] == {"alpha_background": [255, 255, 255]}
    # an override equal to the profile's own choice is no variant: white is vllm's background, EXIF its default
    same = LoadSettings(alpha_background=(255, 255, 255), exif_transpose=True)
    assert load_encoder(model, pixel_options(same)).fingerprint == prints[6]
    assert load_encoder(model, pixel_options(LoadSettings())).describe()["base_fingerprint"] == prints[0]


def test_lines_that_once_stopped_a_run_are_bad_lines_and_the_rows_around_them_are_kept(tmp_path):
    """An escaped lone surrogate in an id or URL broke the index commit (the whole shard was lost and
    every later run exited 2 on the orphan); a 4400-digit id aborted the run. Now: error records."""
    images = tmp_path / "img"
    images.mkdir()
    good = []
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes("RGB", (30 + i, 30), "PNG", i))
        good.append(json.dumps({"url": str(images / f"{i}.png"), "id": f"ok-{i}"}))
    manifest = tmp_path / "m.jsonl"
    bad = ['{"url": "%s", "id": "\\udcff"}' % (images / "0.png"), '{"url": "%s/\\ud800.png"}' % images,
           '{"url": "%s", "id": %s}' % (images / "1.png", "7" * 4400)]  # fmt: skip
    manifest.write_text("\n".join([good[0], bad[0], good[1], bad[1], bad[2], good[2]]) + "\n")
    args = [
        str(manifest),
        "--model",
        "builtin:tiny-clip",
        "--out",
        str(tmp_path / "c"),
        "--allow-local-dir",
        str(images),
    ]
    code, summary = encode_json(*args)
    assert code == 1 and summary["status"] == "completed"
    assert summary["encoded"] == 3 and summary["failures_by_kind"] == {"bad_manifest_line": 3}
    code, again = encode_json(*args)  # the cache is healthy: the next run starts and finds every good row
    assert code == 0 and again["cached"] == 3 and again["encoded"] == 0  # the same bad lines: no new failure


@pytest.mark.slow  # three subprocess runs
def test_quick_start_commands_work_as_written(tmp_path):
    """README quick start (1), run in a subprocess from the repository root like a user would."""
    env = {**os.environ, "MMPREP_CACHE_DIR": str(tmp_path / "cache")}
    enc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmprep",
            "encode",
            "sample_inputs/manifest.jsonl",
            "--model",
            "builtin:tiny-clip",
            "--allow-local-dir",
            "sample_inputs",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert enc.returncode == 1, enc.stderr  # the sample manifest has one intentionally bad row
    lines = [" ".join(line.split()) for line in enc.stderr.splitlines()]  # the README quotes these, spaces aside
    for quoted in ("rows 7", "encoded 5", "duplicates 1 row repeating a URL of this run", "failed 1", "bad_data_url: 1",
                   "exit 1 (1 row failed that had not failed before)",
                   "manifest.jsonl:7 bad_data_url: media type 'text/plain' is not an image type"):  # fmt: skip
        assert any(quoted in line for line in lines), (quoted, enc.stderr)
    assert "mmprep: done=7/7" in enc.stderr  # not a TTY: plain progress log lines
    st = subprocess.run(
        [sys.executable, "-m", "mmprep", "stats"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert st.returncode == 0 and "5 entries" in st.stdout.replace("\n", " ")
    again = subprocess.run(enc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "skipped 1 row that failed permanently before" in " ".join(again.stderr.split())


def test_reruns_retry_transient_failures_and_skip_permanent_ones(tmp_path, image_server, served):
    cache = tmp_path / "cache"
    flaky = image_server.add("/flaky.png", b"busy", "text/plain", 503)
    gone = image_server.url("/gone.png")
    good = list(served.values())[:2]
    manifest = write_manifest(tmp_path / "m.jsonl", good + [flaky, gone])
    base = ["--model", "builtin:tiny-clip", "--out", str(cache), *NET, "--retries", "0"]
    code, first = encode_json(manifest, *base)
    assert code == 1 and first["failures_by_kind"] == {"http_status": 2}

    # --retry-failed: only rows that failed with a retryable kind (the 503), nothing new, not the 404
    extra = image_server.add("/new.png", image_bytes("RGB", (20, 20), "PNG", 42))
    manifest = write_manifest(tmp_path / "m.jsonl", good + [flaky, gone, extra])
    image_server.routes["/flaky.png"] = image_server.routes["/a.png"]  # the server recovered
    hits = dict(image_server.hits)
    code, retried = encode_json(manifest, *base, "--retry-failed")
    assert code == 0  # the 404 failed before and is skipped: counted, not a new failure
    assert (retried["content_dedup"], retried["skipped_failed"], retried["skipped_other"]) == (1, 1, 1)  # a.png's bytes
    assert image_server.hits["/flaky.png"] == hits["/flaky.png"] + 1
    assert image_server.hits["/gone.png"] == hits["/gone.png"] and image_server.hits["/new.png"] == 0

    # a plain rerun picks up the new row; the permanent failure is skipped and reported
    code, plain = encode_json(manifest, *base)
    assert (plain["encoded"], plain["cached"], plain["skipped_failed"]) == (1, 3, 1)
    assert image_server.hits["/gone.png"] == hits["/gone.png"]


def test_shard_parts_cover_the_manifest_exactly_once(tmp_path, image_server):
    urls = [image_server.add(f"/s{i}.png", image_bytes("RGB", (20, 20 + i), "PNG", i)) for i in range(12)]
    manifest = write_manifest(tmp_path / "m.jsonl", urls + ["{bad line"])
    cache = tmp_path / "cache"
    encoded, bad = [], 0
    for part in ("1/3", "2/3", "3/3"):
        code, s = encode_json(manifest, "--model", "builtin:tiny-clip", "--out", str(cache), *NET, "--shard", part)
        assert s["rows"] == 13 and s["encoded"] + s["other_shard"] + s["failed"] == 13
        encoded.append(s["encoded"])
        bad += s["failures_by_kind"].get("bad_manifest_line", 0)
    assert sum(encoded) == 12 and bad == 1 and all(n < 12 for n in encoded)
    assert all(image_server.hits[f"/s{i}.png"] == 1 for i in range(12))
    # the split depends on the key only: a reordered manifest gives the same part the same rows
    reordered = write_manifest(tmp_path / "r.jsonl", list(reversed(urls)))
    code, again = encode_json(reordered, "--model", "builtin:tiny-clip", "--out", str(cache), *NET, "--shard", "2/3")
    assert (again["cached"], again["encoded"]) == (encoded[1], 0)
    assert cli("encode", manifest, "--model", "builtin:tiny-clip", "--shard", "4/3").exit_code == 2
