"""Serving formats (mmprep.serving) and `mmprep rewrite`, on caches encoded by `mmprep encode` from real images.

Wire formats are checked the way the servers read them: torch.load(weights_only=True) of the base64
payloads (vLLM's ImageEmbeddingMediaIO), safetensors / torch.load of the embedding files (Dynamo's
TensorRT-LLM worker); with MMPREP_VLLM_PYTHON set, vLLM's own decoder reads the payloads too.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _model_helpers import pattern_image, save_llava
from _cli import cli
from mmprep.keys import cache_key
from mmprep.serving import ServingFormatError, save_pt, to_sglang, to_vllm, to_vllm_part
from mmprep.store.reader import EmbeddingCache

N_IMAGES = 4


def loads_b64(text: str) -> torch.Tensor:
    """What vLLM does with an image_embeds string: base64-decode, torch.load(weights_only=True)."""
    return torch.load(io.BytesIO(base64.b64decode(text, validate=True)), weights_only=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images on disk and three caches of them: Qwen2-VL, LLaVA (tiny, saved like a checkpoint) and CLIP."""
    root = tmp_path_factory.mktemp("serving")
    images = root / "img"
    images.mkdir()
    for i in range(N_IMAGES):
        pattern_image((40 + 16 * i, 48 - 4 * i), seed=i).save(images / f"{i}.png")
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"url": str(images / f"{i}.png")}) + "\n" for i in range(N_IMAGES - 1)))
    llava_dir = save_llava(root / "llava-model")
    world = {"root": root, "images": images}
    for name, model in (("qwen", "builtin:tiny-qwen2-vl"), ("llava", str(llava_dir)), ("clip", "builtin:tiny-clip")):
        cache = root / f"cache-{name}"
        result = cli("encode", str(manifest), "--model", model, "--out", str(cache), "--allow-local-dir", str(images),
                     "--progress", "none", "--json")  # fmt: skip
        assert result.exit_code == 0, result.output
        world[name] = cache
    return world


def url(world: dict[str, Path], i: int) -> str:
    return str(world["images"] / f"{i}.png")


def entry(world: dict[str, Path], name: str, i: int):
    with EmbeddingCache(world[name]) as cache:
        found = cache.get(url(world, i))
    assert found is not None
    return found


# --- to_vllm_part -----------------------------------------------------------------------------------


def test_vllm_part_of_a_qwen2_vl_entry_round_trips(world: dict[str, Path]) -> None:
    e = entry(world, "qwen", 1)
    part = to_vllm_part(e)
    assert list(part) == ["type", "image_embeds", "uuid"]
    assert part["type"] == "image_embeds" and part["uuid"] == e.key == cache_key(url(world, 1))
    payload = part["image_embeds"]
    assert set(payload) == {"image_embeds", "image_grid_thw"}
    embeds, grid = loads_b64(payload["image_embeds"]), loads_b64(payload["image_grid_thw"])
    assert torch.equal(embeds, e.embeddings) and embeds.ndim == 2
    assert grid.shape == (3,) and grid.dtype == torch.int64  # vLLM: "size_per_item should be a 1-D tensor"
    assert torch.equal(grid, e.image_grid_thw.reshape(-1))
    assert embeds.shape[0] * 4 == int(grid.prod())  # merge 2x2: the rows fill the image's placeholders
    assert embeds.abs().max() > 0 and not torch.equal(
        embeds, loads_b64(to_vllm_part(entry(world, "qwen", 0))["image_embeds"]["image_embeds"])
    )


def test_vllm_part_of_a_llava_entry_is_one_2d_tensor(world: dict[str, Path]) -> None:
    e = entry(world, "llava", 2)
    part = to_vllm_part(e)
    embeds = loads_b64(part["image_embeds"])
    assert embeds.shape == e.embeddings.shape and embeds.ndim == 2  # one item, not vLLM's batched [1, n, h]
    assert torch.equal(embeds, e.embeddings) and torch.equal(to_vllm(e)[0], embeds)


def test_payload_holds_only_the_entry_not_the_shard(world: dict[str, Path]) -> None:
    """torch.save writes a view's whole storage: the payload must not grow with the shard."""
    e = entry(world, "qwen", 0)
    raw = base64.b64decode(to_vllm_part(e)["image_embeds"]["image_embeds"])
    assert len(raw) < e.embeddings.numel() * e.embeddings.element_size() + 2048


def test_pooled_entries_have_no_serving_format(world: dict[str, Path], tmp_path: Path) -> None:
    e = entry(world, "clip", 0)
    for build in (to_vllm, to_vllm_part, to_sglang, lambda x: save_pt(x, tmp_path / "x.safetensors")):
        with pytest.raises(ServingFormatError, match="pooled"):
            build(e)


def test_rows_that_cannot_fill_the_grid_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    """vLLM does not check the row count against the grid (a short tensor kills its engine): we do."""
    e = entry(world, "qwen", 1)
    short = replace(e, tensors={**e.tensors, "embeddings": e.embeddings[:-1]})
    for build in (to_vllm_part, to_sglang, lambda x: save_pt(x, tmp_path / "x.pt")):
        with pytest.raises(ServingFormatError, match="embedding rows for a grid of"):
            build(short)
    assert not list(tmp_path.iterdir())


# --- to_sglang, save_pt -----------------------------------------------------------------------------


def test_sglang_item_for_one_and_several_images(world: dict[str, Path]) -> None:
    a, b = entry(world, "qwen", 0), entry(world, "qwen", 2)
    one = to_sglang(a)
    assert one["format"] == "precomputed_embedding" and set(one) == {"format", "feature", "image_grid_thw"}
    assert torch.equal(one["feature"], a.embeddings) and one["image_grid_thw"].shape == (1, 3)
    both = to_sglang([a, b])
    assert torch.equal(both["feature"], torch.cat([a.embeddings, b.embeddings]))
    assert torch.equal(both["image_grid_thw"], torch.cat([a.image_grid_thw, b.image_grid_thw]))
    llava = to_sglang(entry(world, "llava", 1))
    assert set(llava) == {"format", "feature"} and llava["feature"].ndim == 2
    with pytest.raises(ServingFormatError, match="different models"):
        to_sglang([a, entry(world, "llava", 1)])


def test_embedding_files_as_dynamo_reads_them(world: dict[str, Path], tmp_path: Path) -> None:
    q, lv = entry(world, "qwen", 1), entry(world, "llava", 1)
    tensors = load_file(str(save_pt(q, tmp_path / "q.safetensors")))
    assert set(tensors) == {"mm_embeddings", "image_grid_thw"}  # several keys: the worker takes mm_embeddings
    assert torch.equal(tensors["mm_embeddings"], q.embeddings.unsqueeze(0)) and torch.equal(
        tensors["image_grid_thw"], q.image_grid_thw
    )
    single = load_file(str(save_pt(lv, tmp_path / "l.safetensors")))
    assert list(single) == ["mm_embeddings"] and single["mm_embeddings"].shape == (1, *lv.embeddings.shape)
    plain = torch.load(save_pt(lv, tmp_path / "l.pt"), weights_only=True)  # older Dynamo: a bare tensor
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, lv.embeddings.unsqueeze(0))
    as_dict = torch.load(save_pt(q, tmp_path / "q.pth"), weights_only=True)
    assert torch.equal(as_dict["mm_embeddings"][0], q.embeddings) and torch.equal(
        as_dict["image_grid_thw"], q.image_grid_thw
    )
    with pytest.raises(ServingFormatError, match="suffix"):
        save_pt(q, tmp_path / "q.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.pt", "l.safetensors", "q.pth", "q.safetensors"]


# --- mmprep rewrite on a real OpenAI Batch API file ----------------------------------------------------


def batch_file(world: dict[str, Path], path: Path) -> list[str]:
    """An OpenAI batch input file (custom_id, method, url, body) with every kind of line rewrite meets."""
    u = [url(world, i) for i in range(N_IMAGES)]  # image 3 is not cached: a miss

    def line(cid: str, content: object, **extra: object) -> str:
        body = {"model": "Qwen/Qwen2-VL-2B-Instruct", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": content}], "max_tokens": 16, **extra}  # fmt: skip
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})

    lines = [
        line(
            "one",
            [
                {"type": "text", "text": "Décris l'image ✓"},
                {"type": "image_url", "image_url": {"url": u[0], "detail": "auto"}},
            ],
        ),
        line(
            "two",
            [
                {"type": "image_url", "image_url": {"url": u[1]}},
                {"type": "text", "text": "and"},
                {"type": "input_image", "image_url": "  " + u[2]},
            ],
            temperature=0,
        ),  # fmt: skip
        line(
            "miss",
            [{"type": "image_url", "image_url": {"url": u[2]}}, {"type": "image_url", "image_url": {"url": u[3]}}],
        ),
        line("text-only", "no image here"),
        "",
        json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": u[1]}]}]}
        ),
        '{"custom_id": "broken", "body": ',
        json.dumps(
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": u[0]}]}]}
        ),
        '{"custom_id":"crlf","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"%s"}}]}]}}\r'
        % u[0],
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def rewrite_json(*args: str, input: str | None = None) -> tuple[int, dict, str]:
    result = cli("rewrite", *args, "--json", input=input)
    summary_text = result.stderr[: result.stderr.rindex("}") + 1]
    return result.exit_code, json.loads(summary_text), result.stdout


def test_rewrite_a_batch_file(world: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "batch.jsonl"
    original = batch_file(world, src)
    out = tmp_path / "out.jsonl"
    code, s, stdout = rewrite_json(str(src), "-o", str(out), "--cache", str(world["qwen"]))
    assert code == 1 and stdout == ""  # a miss: exit 1
    assert (s["lines"], s["requests"], s["images"], s["replaced"], s["misses"], s["kept"]) == (9, 7, 7, 5, 1, 1)
    assert s["skipped_lines"] == 2 and len(s["problems"]) == 2
    assert (
        "batch.jsonl:7: invalid JSON" in s["problems"][0]
        and "batch.jsonl:8: a Responses API request" in s["problems"][1]
    )
    assert s["bytes_in"] == src.stat().st_size and s["bytes_out"] == out.stat().st_size

    written = out.read_bytes().split(b"\n")
    assert len(written) == len(original) + 1 and written[-1] == b""
    unchanged = {2, 3, 4, 6, 7}  # the miss (mixing is refused by vLLM), text-only, blank, broken, Responses
    for i in unchanged:
        assert written[i] == original[i].encode(), i
    for i in sorted(set(range(len(original))) - unchanged):
        before, after = json.loads(original[i]), json.loads(written[i].decode())
        assert list(after) == list(before)  # same keys, same order
        after_parts = [p for m in _messages(after) for p in (m["content"] if isinstance(m["content"], list) else [])]
        before_parts = [p for m in _messages(before) for p in (m["content"] if isinstance(m["content"], list) else [])]
        assert len(after_parts) == len(before_parts)
        for b, a in zip(before_parts, after_parts):
            if b["type"] in ("image_url", "input_image"):
                image = b["image_url"]["url"] if isinstance(b["image_url"], dict) else b["image_url"]
                e = EmbeddingCache(world["qwen"]).get(image.strip())
                assert a["type"] == "image_embeds" and a["uuid"] == e.key
                assert torch.equal(loads_b64(a["image_embeds"]["image_embeds"]), e.embeddings)
            else:
                assert a == b
        if i == 0:
            assert "Décris l'image ✓" in written[i].decode()  # non-ASCII text kept as it was
    assert written[8].endswith(b"\r")  # the CRLF line keeps its line ending


def _messages(obj: dict) -> list[dict]:
    return obj.get("body", obj)["messages"]


def test_rewrite_exit_0_when_every_image_is_cached_gz_and_stdin(world: dict[str, Path], tmp_path: Path) -> None:
    u = [url(world, i) for i in range(3)]
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u[i % 3]}}]}]}}
            for i in range(7)]  # fmt: skip
    src = tmp_path / "all.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "all.out.jsonl.gz"
    code, s, _ = rewrite_json(str(src), "-o", str(out), "--cache", str(world["qwen"]))
    assert code == 0 and (s["requests"], s["replaced"], s["misses"]) == (7, 7, 0)
    with gzip.open(out, "rt") as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"r{i}" for i in range(7)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary file was renamed
    # stdin to stdout, cache from the environment
    result = cli("rewrite", "-", input=json.dumps(rows[0]) + "\n", env={"MMPREP_CACHE_DIR": str(world["qwen"])})
    assert (
        result.exit_code == 0
        and json.loads(result.stdout)["body"]["messages"][0]["content"][0]["type"] == "image_embeds"
    )


def test_uuid_only_adds_the_entry_key_and_nothing_else(world: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "batch.jsonl"
    original = batch_file(world, src)
    code, s, stdout = rewrite_json(str(src), "--cache", str(world["clip"]), "--uuid-only")  # any model: only keys
    assert code == 1 and (s["images"], s["replaced"], s["misses"], s["kept"]) == (7, 6, 1, 0)
    written = stdout.split("\n")
    for before_text, after_text in zip(original, written):
        if before_text in ("", '{"custom_id": "broken", "body": ') or '"input"' in before_text:
            assert after_text == before_text
            continue
        before, after = json.loads(before_text), json.loads(after_text)
        for m_before, m_after in zip(_messages(before), _messages(after)):
            if not isinstance(m_before["content"], list):
                assert m_after == m_before
                continue
            for b, a in zip(m_before["content"], m_after["content"]):
                if b["type"] in ("image_url", "input_image"):
                    image = (b["image_url"]["url"] if isinstance(b["image_url"], dict) else b["image_url"]).strip()
                    cached = image != url(world, 3)
                    assert a == ({**b, "uuid": cache_key(image)} if cached else b)
                else:
                    assert a == b


def test_rewrite_usage_errors_and_bounded_lines(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "b.jsonl"
    batch_file(world, src)
    pooled = cli("rewrite", str(src), "--cache", str(world["clip"]))
    assert pooled.exit_code == 2 and "pooled model" in pooled.stderr and "--uuid-only" in pooled.stderr
    missing = cli("rewrite", str(tmp_path / "nope.jsonl"), "--cache", str(world["qwen"]))
    assert missing.exit_code == 2 and "not found" in missing.stderr
    no_cache = cli("rewrite", str(src), "--cache", str(tmp_path / "empty"))
    assert no_cache.exit_code == 2 and "not an mmprep cache" in no_cache.stderr
    wrong_model = cli("rewrite", str(src), "--cache", str(world["qwen"]), "--model", "nothing")
    assert wrong_model.exit_code == 2 and "no model matches 'nothing'" in wrong_model.stderr
    bad_dir = cli("rewrite", str(src), "--cache", str(world["qwen"]), "-o", str(tmp_path / "no" / "out.jsonl"))
    assert bad_dir.exit_code == 2 and "does not exist" in bad_dir.stderr
    assert cli("rewrite", str(src), "--target", "sglang").exit_code == 2

    import mmprep.serving.rewrite

    monkeypatch.setattr(mmprep.serving.rewrite, "MAX_LINE_CHARS", 64)  # a line longer than this is copied in pieces
    long_line = json.dumps({"custom_id": "x" * 200, "body": {"messages": []}})
    code, s, stdout = rewrite_json("-", "--cache", str(world["qwen"]), input=long_line + "\nnot json\n")
    assert code == 1 and stdout == long_line + "\nnot json\n"
    assert s["skipped_lines"] == 2 and "longer than 64 characters" in s["problems"][0]


# --- vLLM's own decoder, when a Python with vLLM is at hand -------------------------------------------

_VLLM_DECODE = """
import json, sys, torch
from vllm.multimodal.media.image import ImageEmbeddingMediaIO
io_ = ImageEmbeddingMediaIO()
parts = json.load(open(sys.argv[1]))
out = {}
for name, payload in parts.items():
    items = payload.items() if isinstance(payload, dict) else [("embeds", payload)]
    out[name] = {k: io_.load_base64("", v).tolist() for k, v in items}
json.dump(out, open(sys.argv[2], "w"))
"""


def test_vllms_own_decoder_reads_the_parts(world: dict[str, Path], tmp_path: Path) -> None:
    python = os.environ.get("MMPREP_VLLM_PYTHON")
    if not python:
        pytest.skip("no Python with vLLM here (set MMPREP_VLLM_PYTHON to one, e.g. the interop venv)")
    entries = {"qwen": entry(world, "qwen", 1), "llava": entry(world, "llava", 0)}
    (tmp_path / "parts.json").write_text(json.dumps({k: to_vllm_part(e)["image_embeds"] for k, e in entries.items()}))
    done = subprocess.run([python, "-c", _VLLM_DECODE, str(tmp_path / "parts.json"), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    decoded = json.loads((tmp_path / "out.json").read_text())
    assert torch.equal(torch.tensor(decoded["qwen"]["image_embeds"]), entries["qwen"].embeddings)
    assert decoded["qwen"]["image_grid_thw"] == entries["qwen"].image_grid_thw.reshape(-1).tolist()
    assert torch.equal(torch.tensor(decoded["llava"]["embeds"]), entries["llava"].embeddings)
