"""`mmprep encode` / `check` over every manifest format (parquet, csv, txt, OpenAI batch files), through the CLI
against a real local server: rows, error records, resume, --shard and --retry-failed behave as for JSONL."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import pytest

from conftest import image_bytes
from mmprep import cache_key
from _cli import NET, cli, encode_json

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MODEL = ["--model", "builtin:tiny-clip"]


def errors_of(summary: dict) -> list[dict]:
    return [json.loads(line) for line in Path(summary["errors_file"]).read_text().splitlines()]


def caller_ids(cache: Path) -> dict[str, str | None]:
    db = sqlite3.connect(cache / "index.sqlite")
    try:
        return dict(db.execute("SELECT key, caller_id FROM entries"))
    finally:
        db.close()


@pytest.fixture()
def laion_parquet(tmp_path, image_server) -> tuple[Path, list[str]]:
    """An img2dataset/LAION-style parquet: URL / TEXT / key columns, 3 row groups, a null and an empty URL."""
    urls = [image_server.add(f"/p{i}.png", image_bytes("RGB", (24 + i, 24), "PNG", i)) for i in range(8)]
    column = urls[:3] + [None] + urls[3:6] + [""] + urls[6:]  # rows 4 and 8 are bad
    table = pa.table({
        "TEXT": [f"caption {i}" for i in range(len(column))],
        "URL": column,
        "key": [f"{i:09d}" for i in range(len(column))],
    })  # fmt: skip
    path = tmp_path / "laion.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path, urls


def test_parquet_manifest_encodes_reports_bad_rows_and_resumes_without_fetching(tmp_path, image_server, laion_parquet):
    path, urls = laion_parquet
    cache = tmp_path / "cache"
    args = [str(path), *MODEL, "--out", str(cache), *NET, "--url-col", "URL", "--id-col", "key"]
    code, first = encode_json(*args)
    assert code == 1 and (first["rows"], first["encoded"], first["failed"]) == (10, 8, 2)
    assert sorted((e["kind"], e["source"], e["line"], e["id"], e["message"]) for e in errors_of(first)) == [
        ("bad_manifest_line", str(path), 4, "000000003", "column 'URL' is null"),
        ("bad_manifest_line", str(path), 8, "000000007", "column 'URL' is empty"),
    ]
    ids = caller_ids(cache)
    assert ids[cache_key(urls[0])] == "000000000" and ids[cache_key(urls[7])] == "000000009"
    hits = image_server.total_hits
    assert hits == 8

    code, again = encode_json(*args)
    assert image_server.total_hits == hits  # resume: nothing fetched the second time
    assert (again["encoded"], again["cached"]) == (0, 8)


def test_parquet_shards_cover_the_rows_once_and_retry_failed_refetches_only_the_transient_failure(
    tmp_path, image_server
):
    urls = [image_server.add(f"/s{i}.png", image_bytes("RGB", (20, 20 + i), "PNG", i)) for i in range(9)]
    flaky = image_server.add("/flaky.png", b"busy", "text/plain", 503)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": urls + [flaky]}), path, row_group_size=3)
    cache = tmp_path / "cache"
    base = [str(path), *MODEL, "--out", str(cache), *NET, "--url-col", "image", "--retries", "0"]
    encoded = []
    for part in ("1/2", "2/2"):
        code, s = encode_json(*base, "--shard", part)
        assert s["rows"] == 10 and s["encoded"] + s["other_shard"] + s["failed"] == 10
        encoded.append(s["encoded"])
    assert sum(encoded) == 9 and all(image_server.hits[f"/s{i}.png"] == 1 for i in range(9))

    image_server.routes["/flaky.png"] = image_server.routes["/s0.png"]  # the server recovered
    hits = image_server.total_hits
    code, retried = encode_json(*base, "--retry-failed")
    assert code == 0 and retried["content_dedup"] == 1  # s0.png's bytes: copied from its entry, not encoded
    assert image_server.total_hits == hits + 1  # only the 503 row was fetched again


def test_gzip_csv_and_txt_manifests_through_check(tmp_path, image_server):
    urls = [image_server.add(f"/c{i}.jpg", image_bytes("RGB", (40, 30), "JPEG", i), "image/jpeg") for i in range(3)]
    csv_gz = tmp_path / "m.csv.gz"
    csv_gz.write_bytes(gzip.compress(f"id,link\na,{urls[0]}\nb,\n".encode()))
    txt = tmp_path / "urls.txt"
    txt.write_text(f"{urls[1]}\r\n\n  {urls[2]}  \n")
    errors = tmp_path / "e.jsonl"
    result = cli("check", str(csv_gz), str(txt), *NET, "--size", "16x16", "--url-col", "link",
                     "--errors", str(errors), "--json", "--progress", "none")  # fmt: skip
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["ok"], summary["failed"]) == (4, 3, 1)
    [bad] = [json.loads(line) for line in errors.read_text().splitlines()]
    assert (bad["kind"], bad["source"], bad["line"], bad["message"]) == (
        "bad_manifest_line",
        str(csv_gz),
        3,
        "column 'link' is empty",
    )


@pytest.mark.parametrize("command", ["encode", "check"])
def test_a_missing_column_exits_2_before_any_work_naming_the_columns(tmp_path, image_server, command):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": [image_server.add("/x.png", image_bytes())], "TEXT": ["a cat"]}), path)
    extra = [*MODEL, "--out", str(tmp_path / "cache")] if command == "encode" else ["--size", "8x8"]
    result = cli(command, str(path), *NET, *extra, "--progress", "none")
    assert result.exit_code == 2
    assert f"manifest {path} has no column 'url' (--url-col); its columns: 'URL', 'TEXT'" in " ".join(
        result.output.split()
    )
    assert image_server.total_hits == 0 and not (tmp_path / "cache").exists()


def test_a_real_openai_batch_file_yields_the_body_images_not_the_endpoint(tmp_path, image_server):
    """The Batch API input format: every line carries method and url (the endpoint) beside custom_id and body."""
    a, b, c = (image_server.add(f"/o{i}.png", image_bytes("RGB", (32, 28), "PNG", 20 + i)) for i in range(3))
    lines = [
        {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "gpt-4o-mini", "max_tokens": 100, "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": a, "detail": "low"}},
                ]},
            ]}},
        {"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello world!"}]}},
        {"custom_id": "request-3", "method": "POST", "url": "/v1/responses", "body": {
            "model": "gpt-4.1-mini", "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "Compare these."},
                {"type": "input_image", "image_url": b},
                {"type": "input_image", "image_url": " " + c + "\n"},
            ]}]}},
    ]  # fmt: skip
    manifest = tmp_path / "batchinput.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cache = tmp_path / "cache"
    code, summary = encode_json(str(manifest), *MODEL, "--out", str(cache), *NET)
    assert code == 0, errors_of(summary)  # no bad_path for "/v1/chat/completions"
    assert (summary["rows"], summary["encoded"], summary["failed"]) == (3, 3, 0)
    assert caller_ids(cache) == {cache_key(a): "request-1:0", cache_key(b): "request-3:0", cache_key(c): "request-3:1"}
