"""Cron refresh (--refresh-older-than with conditional requests) and content dedup."""

from __future__ import annotations


import torch

from conftest import image_bytes
from mmprep import EmbeddingCache
from _cli import NET, encode_json, entry_row, write_manifest


def test_refresh_revalidates_with_etag_and_reencodes_only_changed_content(tmp_path, image_server):
    cache = tmp_path / "cache"
    url = image_server.add("/photo.png", image_bytes("RGB", (40, 40), "PNG", 1), etag='"v1"')
    plain = image_server.add("/plain.png", image_bytes("RGB", (40, 40), "PNG", 2))  # no validators
    manifest = write_manifest(tmp_path / "m.jsonl", [url, plain])
    base = ["--model", "builtin:tiny-clip", "--out", str(cache), *NET]
    code, first = encode_json(manifest, *base)
    assert code == 0 and first["encoded"] == 2
    assert entry_row(cache, url)["etag"] == '"v1"'
    with EmbeddingCache(cache) as reader:
        before = reader.get(url).embeddings

    # within the refresh age: nothing is fetched
    code, fresh = encode_json(manifest, *base, "--refresh-older-than", "1h")
    assert fresh["cached"] == 2 and image_server.hits["/photo.png"] == 1

    # past it: a conditional GET (304) and an unconditional one with the same bytes both keep the entry
    code, revalidated = encode_json(manifest, *base, "--refresh-older-than", "0s")
    assert code == 0
    assert (revalidated["refreshed"], revalidated["encoded"]) == (2, 0)
    assert image_server.not_modified["/photo.png"] == 1 and image_server.hits["/plain.png"] == 2
    assert entry_row(cache, url)["checked"] is not None

    # the source changed: new bytes, new ETag → re-encoded, the entry now holds the new tensor
    image_server.add("/photo.png", image_bytes("RGB", (40, 40), "PNG", 9), etag='"v2"')
    code, changed = encode_json(manifest, *base, "--refresh-older-than", "0s")
    assert (changed["encoded"], changed["refreshed"]) == (1, 1)
    row = entry_row(cache, url)
    assert row["etag"] == '"v2"'
    with EmbeddingCache(cache) as reader:
        after = reader.get(url).embeddings
    assert not torch.equal(before, after)


def test_same_bytes_under_a_new_url_are_stored_without_encoding(tmp_path, image_server):
    cache = tmp_path / "cache"
    body = image_bytes("RGB", (36, 30), "PNG", 5)
    first_url = image_server.add("/a.png", body)
    base = ["--model", "builtin:tiny-clip", "--out", str(cache), *NET]
    encode_json(write_manifest(tmp_path / "m1.jsonl", [first_url]), *base)
    mirror = image_server.add("/mirror/a.png", body)
    code, second = encode_json(write_manifest(tmp_path / "m2.jsonl", [first_url, mirror]), *base)
    assert code == 0
    assert (second["encoded"], second["content_dedup"], second["cached"]) == (0, 1, 1)  # copied, not encoded
    with EmbeddingCache(cache) as reader:
        a, b = reader.get_many([first_url, mirror])
    assert torch.equal(a.embeddings, b.embeddings)
    assert entry_row(cache, first_url)["content_sha256"] == entry_row(cache, mirror)["content_sha256"]
