from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bft.config import InputConfig, StorageConfig
from bft.readers import ColumnMapping, InputError, read_file
from bft.readers.base import content_id
from bft.storage import Storage

from conftest import SHARED_WEBDOCS

STORAGE = Storage(StorageConfig())
TEXT = "A document body. " * 10


def read_all(path: Path, mapping: ColumnMapping = ColumnMapping(), fmt: str = "auto", block: int = 100):
    docs, drops, stats = [], [], None
    for d, x, stats in read_file(STORAGE, str(path), fmt, mapping, block):
        docs += d
        drops += x
    return docs, drops, stats


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(lines)
    else:
        path.write_text(lines)
    return path


def test_dolma_layout(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl.gz", [
        {"id": "d1", "text": TEXT, "source": "c4", "metadata": {"url": "https://a.example/1"}}], gz=True)
    docs, drops, _ = read_all(path)
    assert drops == []
    assert docs == [{"id": "d1", "url": "https://a.example/1", "source": str(path), "source_row": 1, "text": TEXT}]


def test_fineweb_parquet_layout(tmp_path):
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": [TEXT, TEXT + "!"], "id": ["<urn:uuid:1>", "<urn:uuid:2>"],
                             "url": ["https://b.example/", "https://c.example/"], "dump": ["x", "x"]}), path)
    docs, drops, stats = read_all(path, block=1)
    assert [d["id"] for d in docs] == ["<urn:uuid:1>", "<urn:uuid:2>"]
    assert [d["url"] for d in docs] == ["https://b.example/", "https://c.example/"]
    assert (stats.rows_seen, stats.rows_ok) == (2, 2)


def test_c4_layout_gets_stable_content_ids(tmp_path):
    path = write_jsonl(tmp_path / "c4.json", [{"text": TEXT, "url": "https://c4.example/", "timestamp": "t"}])
    first, _, _ = read_all(path)
    again, _, _ = read_all(path)
    assert first[0]["id"] == again[0]["id"] == content_id(TEXT, "https://c4.example/")
    assert first[0]["id"].startswith("sha1-")


def test_custom_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": {"content": TEXT}, "doc_id": 7, "link": "u"}])
    mapping = ColumnMapping.from_config(InputConfig(text_column="body.content", id_column="doc_id", url_column="link"))
    docs, _, _ = read_all(path, mapping)
    assert (docs[0]["id"], docs[0]["url"], docs[0]["text"]) == ("7", "u", TEXT)


def test_malformed_lines_are_dropped_not_fatal(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ok1", "text": TEXT}, '{"id": "broken", "text": "cut', "[1, 2]",
        {"id": "no-text"}, {"id": "num", "text": 12}, {"id": "blank", "text": "   "}, {"id": "ok2", "text": TEXT}])
    docs, drops, stats = read_all(path)
    assert [d["id"] for d in docs] == ["ok1", "ok2"]
    assert [d["reason"] for d in drops] == ["malformed_json", "not_an_object", "missing_text", "invalid_text",
                                            "empty_text"]
    assert drops[0]["text"] == '{"id": "broken", "text": "cut'  # nothing lost: the raw line is kept
    assert "m.jsonl, row 2" in drops[0]["detail"]
    assert (stats.rows_seen, stats.rows_ok, stats.rows_dropped) == (7, 2, 5)


def test_missing_text_column_names_column_and_file(tmp_path):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"id": 1, "content": TEXT}, {"id": 2, "content": TEXT}])
    with pytest.raises(InputError, match=r"wrong\.jsonl.*'text'"):
        read_all(path)
    ppath = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"content": [TEXT]}), ppath)
    with pytest.raises(InputError, match=r"wrong\.parquet.*'text' not found \(columns: content\)"):
        read_all(ppath)


def test_blocks_are_bounded(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"id": str(i), "text": TEXT} for i in range(25)])
    chunks = [len(d) + len(x) for d, x, _ in read_file(STORAGE, str(path), "auto", ColumnMapping(), 10)]
    assert chunks == [10, 10, 5]


def test_unknown_extension_needs_format(tmp_path):
    path = write_jsonl(tmp_path / "data.txt", [{"text": TEXT}])
    with pytest.raises(InputError, match="input.format"):
        read_all(path)
    docs, _, _ = read_all(path, fmt="jsonl")
    assert len(docs) == 1


@pytest.mark.skipif(not SHARED_WEBDOCS.exists(), reason="../shared/webdocs not present")
def test_shared_webdocs_both_layouts_agree():
    dolma, d_drops, _ = read_all(SHARED_WEBDOCS / "sample.dolma.jsonl.gz")
    fineweb, f_drops, _ = read_all(SHARED_WEBDOCS / "sample.fineweb.parquet")
    assert len(dolma) == len(fineweb) == 300 and not d_drops and not f_drops
    key = lambda d: (d["id"], d["url"], d["text"])  # noqa: E731
    assert [key(d) for d in dolma] == [key(d) for d in fineweb]
