"""Tabular and plain-text manifests (parquet, csv, tsv, txt) read from real files, row by row."""

from __future__ import annotations

import csv
import gzip
import io
import sys
from pathlib import Path

import pytest

from mmprep.errors import UsageError
from mmprep.manifest import BadLine, Record, check_readable, manifest_format, read_manifests
from mmprep.settings import ManifestSettings

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def items(path: Path | str, url_col: str = "url", id_col: str | None = None) -> list[Record | BadLine]:
    return list(read_manifests([str(path)], ManifestSettings(url_col, id_col)))


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize(
    ("name", "kind"),
    [("a.parquet", "parquet"), ("A.PARQUET", "parquet"), ("a.csv", "csv"), ("a.csv.gz", "csv"), ("a.tsv", "tsv"),
     ("a.tsv.gz", "tsv"), ("urls.txt", "txt"), ("urls.txt.gz", "txt"), ("a.jsonl", "jsonl"), ("a.jsonl.gz", "jsonl"),
     ("a.json", "jsonl"), ("manifest", "jsonl"), ("-", "jsonl"), (".csv", "jsonl")],
)  # fmt: skip
def test_the_format_comes_from_the_file_extension(name, kind):
    assert manifest_format(name) == kind


def test_a_gzipped_parquet_is_a_usage_error(tmp_path):
    path = tmp_path / "m.parquet.gz"
    path.write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(UsageError, match="gzipped parquet file cannot be streamed"):
        check_readable([str(path)])


def test_csv_with_custom_columns_quoted_fields_and_bad_rows(tmp_path):
    path = write_csv(tmp_path / "m.csv", [
        ["caption", "image", "sku"],
        ["a cat, sitting", "https://e.com/1.jpg", "s1"],
        ["two\nlines", "  https://e.com/2.jpg ", "s2"],  # a quoted newline; whitespace round the URL
        ["no url", "", "s3"],
        [],  # a blank line
        ["short row"],
        ["no id", "https://e.com/6.jpg", ""],
    ])  # fmt: skip
    got = items(path, "image", "sku")
    assert got == [
        Record("https://e.com/1.jpg", "s1", str(path), 2),
        Record("https://e.com/2.jpg", "s2", str(path), 3),  # starts on line 3, ends on 4
        BadLine(str(path), 5, "column 'image' is empty", "s3"),  # the error record keeps the row's id
        BadLine(str(path), 7, "row has 1 field; column 'image' is field 2"),
        Record("https://e.com/6.jpg", None, str(path), 8),  # an empty id cell is no id
    ]


def test_id_defaults_to_the_id_column_when_there_is_one(tmp_path):
    with_id = write_csv(tmp_path / "a.csv", [["id", "url"], ["k1", "https://e.com/1.jpg"]])
    without = write_csv(tmp_path / "b.csv", [["key", "url"], ["k1", "https://e.com/1.jpg"]])
    assert [(r.url, r.id) for r in items(with_id)] == [("https://e.com/1.jpg", "k1")]
    assert [(r.url, r.id) for r in items(without)] == [("https://e.com/1.jpg", None)]


def test_gzip_csv_tsv_and_crlf_csv(tmp_path):
    gz = write_csv(tmp_path / "m.csv.gz", [["url", "id"], ["https://e.com/1.jpg", "a"], ["https://e.com/2.jpg", "b"]])
    tsv = write_csv(tmp_path / "m.tsv.gz", [["id", "url"], ["x,y", "https://e.com/3.jpg"]], delimiter="\t")
    crlf = tmp_path / "w.csv"
    crlf.write_bytes(
        b"\xef\xbb\xbfurl,id\r\nhttps://e.com/4.jpg,c\r\n\r\nhttps://e.com/5.jpg,d\r\n"
    )  # Excel: BOM, CRLF
    assert [(r.url, r.id, r.line) for r in items(gz)] == [
        ("https://e.com/1.jpg", "a", 2),
        ("https://e.com/2.jpg", "b", 3),
    ]
    assert [(r.url, r.id, r.line) for r in items(tsv)] == [("https://e.com/3.jpg", "x,y", 2)]
    assert [(r.url, r.id, r.line) for r in items(crlf)] == [
        ("https://e.com/4.jpg", "c", 2),
        ("https://e.com/5.jpg", "d", 4),
    ]


def test_a_missing_column_is_a_usage_error_naming_the_columns_there_are(tmp_path):
    path = write_csv(tmp_path / "m.csv", [["caption", "image"], ["x", "https://e.com/1.jpg"]])
    with pytest.raises(UsageError) as url_error:
        check_readable([str(path)], ManifestSettings())
    assert str(url_error.value) == f"manifest {path} has no column 'url' (--url-col); its columns: 'caption', 'image'"
    with pytest.raises(UsageError, match=r"no column 'sku' \(--id-col\); its columns: 'caption', 'image'"):
        check_readable([str(path)], ManifestSettings("image", "sku"))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match=r"its columns: none \(the file is empty\)"):
        check_readable([str(empty)])
    check_readable([str(path)], ManifestSettings("image"))  # the right column: no error


def test_column_options_with_only_jsonl_manifests_are_a_usage_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"url": "https://e.com/1.jpg"}\n')
    with pytest.raises(UsageError, match="--url-col and --id-col apply to parquet, csv and tsv manifests only"):
        check_readable([str(path)], ManifestSettings("image"))
    check_readable([str(path)], ManifestSettings())


def test_parquet_with_several_row_groups_nulls_and_custom_columns(tmp_path):
    urls = [f"https://e.com/{i}.jpg" for i in range(25)]
    urls[3], urls[11], urls[24] = None, "", " https://e.com/24.jpg\n"
    keys = list(range(1000, 1025))
    keys[5] = None
    table = pa.table({"caption": [f"c{i}" for i in range(25)], "URL": urls, "key": pa.array(keys, pa.int64())})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=4)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    got = items(path, "URL", "key")
    assert len(got) == 25
    assert got[3] == BadLine(str(path), 4, "column 'URL' is null", "1003")
    assert got[11] == BadLine(str(path), 12, "column 'URL' is empty", "1011")
    assert got[24] == Record("https://e.com/24.jpg", "1024", str(path), 25)
    assert got[5] == Record("https://e.com/5.jpg", None, str(path), 6)  # a null id is no id
    good = [r for i, r in enumerate(got) if i not in (3, 11, 24)]
    assert good == [
        Record(f"https://e.com/{i}.jpg", str(keys[i]) if keys[i] else None, str(path), i + 1)
        for i in range(25)
        if i not in (3, 11, 24)
    ]


def test_parquet_dictionary_and_large_string_columns(tmp_path):
    table = pa.table({
        "url": pa.array(["https://e.com/a.jpg", "https://e.com/b.jpg", "https://e.com/a.jpg"]).dictionary_encode(),
        "id": pa.array(["x", "y", None], pa.large_string()),
    })  # fmt: skip
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    assert [(r.url, r.id) for r in items(path)] == [
        ("https://e.com/a.jpg", "x"),
        ("https://e.com/b.jpg", "y"),
        ("https://e.com/a.jpg", None),
    ]


def test_parquet_column_of_the_wrong_type_or_missing_is_a_usage_error(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": [1, 2], "id": [0.5, 1.5], "image": ["a", "b"]}), path)
    with pytest.raises(UsageError, match=r"column 'url' \(--url-col\) holds int64, not strings"):
        check_readable([str(path)])
    with pytest.raises(UsageError, match=r"column 'id' \(--id-col\) holds double, not strings or integers"):
        check_readable([str(path)], ManifestSettings("image"))
    with pytest.raises(UsageError, match=r"has no column 'link' \(--url-col\); its columns: 'url', 'id', 'image'"):
        check_readable([str(path)], ManifestSettings("link"))
    check_readable([str(path)], ManifestSettings("image", "url"))  # integer ids are fine


def test_a_file_that_is_not_parquet_and_a_damaged_parquet(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"url": "https://e.com/1.jpg"}\n')
    with pytest.raises(UsageError, match=f"cannot read manifest {fake} as parquet"):
        check_readable([str(fake)])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": [f"https://e.com/{i}/" + "x" * 200 for i in range(4000)]}), path,
                   row_group_size=1000, compression="none")  # fmt: skip
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4000] = b"\xff" * 4000  # garble the pages of a middle row group
    path.write_bytes(bytes(data))
    got = items(path)
    *records, last = got
    assert all(isinstance(r, Record) for r in records) and 1000 <= len(records) < 4000
    assert isinstance(last, BadLine) and last.line == len(records) + 1
    assert "the rest of the manifest is unreadable" in last.message


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": ["https://e.com/1.jpg"]}), path)
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without pyarrow sees: ImportError
    message = r"reading parquet manifests needs pyarrow: pip install 'mmprep\[parquet\]'"
    with pytest.raises(UsageError, match=message):
        check_readable([str(path)])
    with pytest.raises(UsageError, match=message):
        items(path)


def test_txt_one_url_a_line(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_bytes(
        b'https://e.com/1.jpg\r\n\n  /data/2.png  \n{"url": "https://e.com/3.jpg"}\ndata:image/png;base64,AAAA'
    )
    assert items(path) == [
        Record("https://e.com/1.jpg", None, str(path), 1),
        Record("/data/2.png", None, str(path), 3),
        BadLine(
            str(path), 4, "line looks like JSON: a .txt manifest holds one URL a line (name a JSONL manifest .jsonl)"
        ),
        Record("data:image/png;base64,AAAA", None, str(path), 5),
    ]
    packed = tmp_path / "urls.txt.gz"
    packed.write_bytes(gzip.compress(b"https://e.com/9.jpg\n"))
    assert items(packed) == [Record("https://e.com/9.jpg", None, str(packed), 1)]


def test_an_overlong_csv_line_is_skipped_in_bounded_pieces_and_reading_goes_on(tmp_path, monkeypatch):
    import mmprep.manifest.source as source

    monkeypatch.setattr(source, "MAX_LINE_CHARS", 4096)
    monkeypatch.setattr("mmprep.manifest.delimited.MAX_LINE_CHARS", 4096)
    path = tmp_path / "m.csv"
    path.write_bytes(b"url,id\nhttps://e.com/1.jpg,a\n" + b"y" * 100_000 + b"\nhttps://e.com/3.jpg,c\n")
    assert items(path) == [
        Record("https://e.com/1.jpg", "a", str(path), 2),
        BadLine(str(path), 3, "line longer than 4096 characters (skipped unread)"),
        Record("https://e.com/3.jpg", "c", str(path), 4),
    ]


def test_an_unreadable_csv_header_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr("mmprep.manifest.source.MAX_LINE_CHARS", 4096)
    monkeypatch.setattr("mmprep.manifest.delimited.MAX_LINE_CHARS", 4096)
    long_header = tmp_path / "long.csv"
    long_header.write_bytes(b"x" * 10_000 + b"\nhttps://e.com/1.jpg\n")
    with pytest.raises(UsageError, match="unreadable header row: line longer than 4096 characters"):
        check_readable([str(long_header)])
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"\x1f\x8b" + b"not a gzip stream")  # gzip by its magic bytes, then garbage
    with pytest.raises(UsageError, match=f"cannot read manifest {broken}"):
        check_readable([str(broken)])


def test_one_parquet_column_as_url_and_id(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": ["https://e.com/1.jpg"]}), path)
    assert items(path, "url", "url") == [Record("https://e.com/1.jpg", "https://e.com/1.jpg", str(path), 1)]


def test_invalid_utf8_in_a_csv_cell_is_a_bad_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"url\nhttps://e.com/\xff.jpg\nhttps://e.com/caf\xc3\xa9.jpg\n")
    bad, good = items(path)
    assert isinstance(bad, BadLine) and bad.line == 2 and "column 'url' holds an unpaired surrogate" in bad.message
    assert good == Record("https://e.com/café.jpg", None, str(path), 3)


def test_formats_mix_in_one_run_in_order(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"url": "https://e.com/1.jpg"}\n')
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"link": ["https://e.com/2.jpg"]}), parquet)
    txt = tmp_path / "c.txt"
    txt.write_text("https://e.com/3.jpg\n")
    got = list(read_manifests([str(jsonl), str(parquet), str(txt)], ManifestSettings("link")))
    assert [r.url for r in got] == ["https://e.com/1.jpg", "https://e.com/2.jpg", "https://e.com/3.jpg"]
    check_readable([str(jsonl), str(parquet), str(txt)], ManifestSettings("link"))  # the column applies to b.parquet


PEAK_READ = """
import sys
from mmprep.manifest import read_manifests
assert sum(1 for _ in read_manifests([sys.argv[1]])) == int(sys.argv[2])
"""
PEAK_NAIVE = """
import sys
import pyarrow.parquet as pq
assert len(pq.read_table(sys.argv[1]).column("url").to_pylist()) == int(sys.argv[2])
"""


def peak_mb(tmp_path: Path, code: str, *args: str) -> float:
    """Peak RSS (VmHWM, MB) of a fresh Python process running `code` (benchmarks/peak.py)."""
    import subprocess

    out = tmp_path / "peak.txt"
    subprocess.run([sys.executable, "-m", "benchmarks.peak", str(out), "-c", code, *args], check=True,
                   cwd=Path(__file__).resolve().parent.parent, timeout=300)  # fmt: skip
    return float(out.read_text())


def test_a_parquet_manifest_is_read_a_batch_at_a_time_not_whole(tmp_path):
    """75x the rows, in one row group (~45 MB of URLs), cost about the same peak memory (+8 MB here); reading
    the whole table (the negative control) costs the URLs' size several times over (+230 MB here)."""
    paths = {}
    for rows in (2_000, 150_000):
        paths[rows] = tmp_path / f"m{rows}.parquet"
        column = pa.array([f"https://images.example.com/{i:08d}/" + "x" * 260 for i in range(rows)])
        pq.write_table(pa.table({"url": column}), paths[rows], row_group_size=rows)
    small = peak_mb(tmp_path, PEAK_READ, str(paths[2_000]), "2000")
    big = peak_mb(tmp_path, PEAK_READ, str(paths[150_000]), "150000")
    naive = peak_mb(tmp_path, PEAK_NAIVE, str(paths[150_000]), "150000")
    assert big - small < 30, (small, big)
    assert naive - small > 90, (small, naive)  # the same measurement sees a whole-file read
