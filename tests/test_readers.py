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
from needs import shared
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


def test_shared_webdocs_both_layouts_agree():
    shared("webdocs")
    dolma, d_drops, _ = read_all(SHARED_WEBDOCS / "sample.dolma.jsonl.gz")
    fineweb, f_drops, _ = read_all(SHARED_WEBDOCS / "sample.fineweb.parquet")
    assert len(dolma) == len(fineweb) == 300 and not d_drops and not f_drops
    key = lambda d: (d["id"], d["url"], d["text"])  # noqa: E731
    assert [key(d) for d in dolma] == [key(d) for d in fineweb]


# --- hostile input ----------------------------------------------------------------------

def read_skip(path: Path, block: int = 100):
    docs, drops, stats = [], [], None
    for d, x, stats in read_file(STORAGE, str(path), "auto", ColumnMapping(), block, on_bad_file="skip"):
        docs += d
        drops += x
    return docs, drops, stats


def test_hostile_corpus_every_bad_row_dropped_with_its_reason(tmp_path):
    from collections import Counter

    from hostile import write_hostile_corpus

    corpus = write_hostile_corpus(tmp_path)
    seen_ids = set()
    for path in corpus.files:
        docs, drops, stats = read_skip(path)
        reasons = Counter(d["reason"] for d in drops)
        if path.name in corpus.all_dropped_as:
            assert not docs and set(reasons) <= corpus.all_dropped_as[path.name], (path.name, reasons)
            assert sum(reasons.values()) == corpus.read_drops[path.name]["*"]
        else:
            assert reasons == corpus.read_drops[path.name], path.name
        # every row is counted once, kept or dropped, and each drop names file and row
        assert stats.rows_seen == len(docs) + len(drops) == stats.rows_ok + stats.rows_dropped
        assert all(path.name in d["detail"] and d["source"] == str(path) for d in drops)
        # no lone surrogates survive into anything that will be written as UTF-8
        for row in docs + drops:
            for value in (row.get("text"), row.get("id"), row.get("url")):
                if value is not None:
                    value.encode("utf-8")
        seen_ids |= {d["id"] for d in docs}
    assert corpus.good_ids <= seen_ids
    huge = next(d for d in read_skip(corpus.files[0])[1] if d["id"] == corpus.huge_id)
    assert huge["reason"] == "too_large" and "input.max_document_chars=2000000" in huge["detail"]
    assert len(huge["text"]) == 10_000


def test_truncated_gzip_keeps_rows_before_the_cut(tmp_path):
    from hostile import write_hostile_corpus

    corpus = write_hostile_corpus(tmp_path)
    path = next(p for p in corpus.files if p.name.endswith(".gz"))
    docs, drops, _ = read_skip(path, block=7)
    assert 0 < len(docs) < 40
    assert [d["id"] for d in docs] == [f"gz-{i}" for i in range(len(docs))]
    (cut,) = drops
    assert cut["reason"] == "unreadable_file" and cut["source_row"] == len(docs) + 1
    assert "EOFError" in cut["detail"] or "Error" in cut["detail"]


@pytest.mark.parametrize("name", ["c-truncated.jsonl.gz", "e-other-schema.parquet", "f-not-really.parquet"])
def test_on_bad_file_fail_names_the_file(tmp_path, name):
    from hostile import write_hostile_corpus

    write_hostile_corpus(tmp_path)
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        read_all(tmp_path / name)


def test_read_drops_can_be_written_as_parquet(tmp_path):
    """Drop rows from hostile input (surrogates, NULs, binary) survive the Parquet writer."""
    from bft.writers.parquet import StageWriter

    from hostile import write_hostile_corpus

    corpus = write_hostile_corpus(tmp_path / "in")
    writer = StageWriter(STORAGE, str(tmp_path / "run"))
    for path in corpus.files:
        docs, drops, _ = read_skip(path)
        writer.write("read", [], drops, 0.0)
    written = sum(pq.read_table(f).num_rows for f in (tmp_path / "run" / "dropped").glob("*.parquet"))
    expected = sum(len(read_skip(p)[1]) for p in corpus.files)
    assert written == expected > 0


def test_preflight_looks_past_a_damaged_first_file_only_when_skipping(tmp_path, minimal_config_data):
    import yaml

    from bft.config import load_config
    from bft.planning import preflight

    bad = tmp_path / "a-bad.parquet"
    bad.write_bytes(b"not parquet at all")
    good = write_jsonl(tmp_path / "b-good.jsonl", [{"text": TEXT}])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal_config_data))
    preflight(load_config(str(path)), STORAGE, [str(bad), str(good)])  # skip (default): b is fine
    with pytest.raises(InputError, match=r"a-bad\.parquet: unreadable before its first row"):
        preflight(load_config(str(path), ["input.on_bad_file=fail"]), STORAGE, [str(bad), str(good)])
    with pytest.raises(InputError, match="none of the first 2 input files is readable"):
        preflight(load_config(str(path)), STORAGE, [str(bad), str(bad)])


@pytest.mark.parametrize("gz", [False, True])
def test_a_line_over_max_line_bytes_is_dropped_without_being_held_and_the_rest_is_read(tmp_path, gz):
    """Issue 17: one huge line (or a gzip that inflates to one) was read whole into memory."""
    from bft.readers import ReadLimits
    from bft.readers.jsonl import bounded_lines

    path = write_jsonl(tmp_path / ("big.jsonl.gz" if gz else "big.jsonl"),
                       [{"id": "a", "text": TEXT}, {"id": "big", "text": "z" * 50_000},
                        {"id": "b", "text": TEXT}, '{"id": "tail", "text": "' + "y" * 9000], gz=gz)
    limits = ReadLimits(max_line_bytes=4096, max_document_chars=10**6)
    docs, drops, stats = [], [], None
    for d, x, stats in read_file(STORAGE, str(path), "auto", ColumnMapping(), 100, "skip", limits):
        docs, drops = docs + d, drops + x
    assert [d["id"] for d in docs] == ["a", "b"]
    assert [(x["source_row"], x["reason"]) for x in drops] == [(2, "too_large"), (4, "too_large")]
    assert "line of 50026 bytes, over input.max_line_bytes=4096" in drops[0]["detail"]
    assert len(drops[0]["text"]) <= 4097 and stats.rows_seen == 4
    # the reader never asks for more than the limit (+1) at once
    asked = []

    class Spy:
        def __init__(self, data: bytes):
            self.stream = __import__("io").BytesIO(data)

        def readline(self, size: int = -1) -> bytes:
            asked.append(size)
            return self.stream.readline(size)

    list(bounded_lines(Spy(b"x" * 100_000 + b"\nok\n"), 4096))
    assert asked and all(0 < size <= 1 << 20 for size in asked)


def test_parquet_reads_only_the_mapped_columns(tmp_path, monkeypatch):
    """Issue 17: every column was read (a crawl's raw HTML next to its text)."""
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc_id": ["1", "2"], "body": [TEXT, TEXT], "html": ["<p>x</p>" * 1000] * 2,
                             "url": ["https://a", "https://b"]}), path)
    asked = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("columns"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs, drops, _ = read_all(path, ColumnMapping(text="body", id="doc_id"))
    assert asked == [["doc_id", "body", "url"]]
    assert [(d["id"], d["url"]) for d in docs] == [("1", "https://a"), ("2", "https://b")] and not drops
