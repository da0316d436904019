"""Real web text: WARC/WET reading, segmentation of long documents, language ID, and
how segments travel through the filter step, the manifest and resume. (Near-duplicate
actors are tested with exact dedup's in test_filters.py, on the same Ray instance.)"""

from __future__ import annotations

import json
import random

import pytest

from bft.config import ConfigError, FilterConfig, StorageConfig, load_config
from bft.filters.language import check_language, check_languages
from bft.filters.segment import segment_document, split_segments
from bft.readers import ColumnMapping, InputError, read_file
from bft.storage import Storage
from warc_files import conversion_records, crawl_records, long_document, pages, paragraph, skipped_count, warc_bytes

def words_of(text: str) -> list[str]:
    return text.split()


# --- segmentation --------------------------------------------------------------------

def test_long_document_is_cut_at_paragraphs_within_bounds():
    text = long_document()
    segments = split_segments(text, 3000)
    assert len(segments) > 1
    assert all(600 <= len(s) <= 3000 for s in segments), [len(s) for s in segments]
    assert words_of(" ".join(segments)) == words_of(text)  # nothing lost, nothing repeated
    paragraphs = {p for p in text.split("\n\n")}
    for s in segments:  # cut only at paragraph breaks: every piece is a whole paragraph
        assert set(s.split("\n\n")) <= paragraphs


def test_overlong_paragraph_is_cut_at_sentences_then_words():
    rng = random.Random(1)
    one_paragraph = paragraph(rng, 7000)
    segments = split_segments(one_paragraph, 3000)
    assert all(len(s) <= 3000 for s in segments) and words_of(" ".join(segments)) == words_of(one_paragraph)
    assert all(s.endswith(".") for s in segments)  # at sentence ends
    no_spaces = "x" * 7000  # a run of text with no break at all is still bounded
    assert [len(s) for s in split_segments(no_spaces, 3000)] == [3000, 3000, 1000]


def test_segment_rows_keep_the_document_identity():
    cfg = FilterConfig()
    doc = {"id": "page-7", "url": "https://example.org/p", "source": "s3://b/in.jsonl", "source_row": 7,
           "segment": None, "text": long_document()}
    rows = segment_document(doc, cfg)
    assert [r["segment"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["id"] for r in rows] == [f"page-7#{i}" for i in range(1, len(rows) + 1)]
    assert {(r["url"], r["source"], r["source_row"]) for r in rows} == {(doc["url"], doc["source"], 7)}
    assert segment_document(doc, FilterConfig(long_documents="drop")).reason == "too_long"
    too_many = segment_document(doc, FilterConfig(max_segments=2))
    assert too_many.reason == "too_long" and "filters.max_segments 2" in too_many.detail


# --- language ------------------------------------------------------------------------

ENGLISH = ("Repotting a houseplant is less dramatic than most people expect, as long as you pick the right "
           "moment and the right pot. The best time is early spring.")
GERMAN = ("Das Umtopfen einer Zimmerpflanze ist weniger dramatisch, als die meisten Leute erwarten, solange "
          "man den richtigen Moment und den richtigen Topf wählt. Die beste Zeit ist das Frühjahr.")


GERMAN_PAGE = GERMAN + (
    " Ein Topf, der nur zwei bis vier Zentimeter breiter ist als der alte, reicht völlig aus. Zu viel Erde "
    "bleibt lange nass, und die Wurzeln beginnen zu faulen. Frische Blumenerde mit etwas Sand oder Perlit "
    "sorgt dafür, dass überschüssiges Wasser schnell abläuft. Vor dem Umtopfen sollte man die Pflanze einen "
    "Tag vorher gießen, damit sich der Wurzelballen leichter aus dem Gefäß lösen lässt. Danach stellt man sie "
    "für ein paar Tage an einen hellen, aber nicht sonnigen Platz und düngt erst nach einigen Wochen wieder.")


def test_language_is_detected_offline_and_named_in_the_drop():
    cfg = FilterConfig()
    assert check_language(ENGLISH, cfg) is None
    drop = check_language(GERMAN, cfg)
    assert drop.reason == "language" and drop.detail.startswith("detected de (score ")
    assert check_language(GERMAN, FilterConfig(languages=["en", "de"])) is None
    assert check_language(GERMAN, FilterConfig(languages=None)) is None
    # a confident language in the list, below the score asked for
    low = check_language(ENGLISH, FilterConfig(min_language_score=1.0))
    assert low is not None and "filters.min_language_score 1.0" in low.detail


def test_unknown_language_code_is_a_config_error():
    with pytest.raises(ConfigError, match="filters.languages: \\['english'\\]"):
        check_languages(FilterConfig(languages=["english"]))


# --- the filter step with segments, the manifest and resume --------------------------

def _context(tmp_path, overrides=()):
    from bft.context import RunContext

    cfg = load_config(None, ["model=/m", "filters.near_dedup=null", "filters.dedup=false", *overrides])
    return RunContext(config=cfg, storage=Storage(StorageConfig()), run_uri=str(tmp_path / "run"), templates={})


def _batch(rows):
    from bft.schema import DOC_COLUMNS, to_table

    return to_table(rows, DOC_COLUMNS)


def _docs():
    return [{"id": "long", "url": "u1", "source": "in.jsonl", "source_row": 1, "text": long_document(2)},
            {"id": "short", "url": "u2", "source": "in.jsonl", "source_row": 2, "text": "too short to keep"},
            {"id": "ok", "url": "u3", "source": "in.jsonl", "source_row": 3, "text": long_document(3, 2)[:2000]},
            {"id": "de", "url": "u4", "source": "in.jsonl", "source_row": 4, "text": GERMAN_PAGE}]


def _write_read_stats(ctx, n):
    from bft.steps.read import stats_uri

    ctx.storage.write_bytes(stats_uri(ctx.run_uri, "in.jsonl"), json.dumps(
        {"source": "in.jsonl", "rows_seen": n, "rows_ok": n, "started_at": 0.0, "finished_at": 1.0}).encode())


def test_filter_step_turns_a_long_document_into_segment_rows_and_the_manifest_reconciles(tmp_path):
    import pyarrow.parquet as pq

    from bft.steps.filter import filter_documents
    from bft.writers.manifest import build_manifest

    ctx = _context(tmp_path)
    out = filter_documents(_batch(_docs()), ctx).to_pylist()
    segments = [r for r in out if r["segment"] is not None]
    assert len(segments) >= 2 and {r["source_row"] for r in segments} == {1}
    assert [r["id"] for r in out if r["segment"] is None] == ["ok"]
    dropped = pq.read_table(str(tmp_path / "run" / "dropped")).to_pylist()
    assert sorted((r["id"], r["reason"]) for r in dropped) == [("de", "language"), ("short", "too_short")]
    _write_read_stats(ctx, 4)
    manifest = build_manifest(ctx.storage, ctx.run_uri, run_id="r", config={}, started_at=0.0)
    filt = manifest["stages"]["filter"]
    assert filt["in"] == 4 and filt["segments_added"] == len(segments) - 1
    assert filt["out"] + filt["dropped"] == 4 + filt["segments_added"]
    assert manifest["stages"]["generate"]["in"] == len(out)
    # The same files with the documents' count alone do not add up: the segments are counted.
    assert manifest["invariant"]["segments_added"] == len(segments) - 1
    assert manifest["reconciled"] is False  # generate.. did not run: their rows are missing
    assert manifest["reconciliation_problems"][0].startswith("generate:")
    from bft.cli import _summary

    assert f"passages made {len(segments) - 1} more row(s)" in _summary(manifest)


def test_resume_skips_finished_segments_and_reads_their_file_again(tmp_path):
    import pyarrow.parquet as pq

    from bft.resume import scan_run
    from bft.steps.filter import filter_documents

    ctx = _context(tmp_path)
    docs = _docs()
    first = filter_documents(_batch(docs[:1]), ctx).to_pylist()  # the long one only
    _write_read_stats(ctx, 4)
    state = scan_run(ctx.storage, ctx.run_uri)
    assert not state.input_done("in.jsonl")  # segments show only when the document is cut again
    ctx.finished = state.finished
    again = filter_documents(_batch(docs), ctx).to_pylist()
    assert {r["id"] for r in again} == {"ok"}  # no segment twice
    kept = pq.read_table(str(tmp_path / "run" / "filtered")).to_pylist()
    keys = [(r["source_row"], r["segment"]) for r in kept]
    assert len(keys) == len(set(keys)) == len(first) + 1


# --- WARC / WET --------------------------------------------------------------------------

TEXTS = [long_document(10 + i, 3)[:2500] for i in range(6)]


def _read_all(path, fmt="auto", on_bad_file="fail"):
    docs, drops, stats = [], [], None
    for d, x, stats in read_file(Storage(StorageConfig()), str(path), fmt, ColumnMapping(text="body"), 100,
                                 on_bad_file):
        docs += d
        drops += x
    return docs, drops, stats


@pytest.mark.parametrize("name, gz", [("crawl.warc.gz", True), ("crawl.warc", False)])
def test_warc_response_records_become_documents_and_the_rest_is_counted(tmp_path, name, gz):
    records = crawl_records(TEXTS)
    (tmp_path / name).write_bytes(warc_bytes(records, gz=gz))
    docs, drops, stats = _read_all(tmp_path / name)
    assert not drops and len(docs) == len(TEXTS)
    assert sum(stats.records_skipped.values()) == skipped_count(records)
    assert stats.records_skipped["request"] == len(TEXTS) and stats.records_skipped["warcinfo"] == 1
    assert stats.rows_seen == len(TEXTS)  # skipped records are not rows
    responses = pages(records)
    for doc, record, text in zip(docs, responses, TEXTS):
        assert doc["id"] == record.record_id and doc["url"] == record.url
        assert words_of(text) == words_of(doc["text"])[-len(words_of(text)):]  # the article, whole
        for boilerplate in ("Home | Recipes", "Copyright 2026", "tracker"):
            assert boilerplate not in doc["text"]  # navigation, footer and script left out
    assert [d["source_row"] for d in docs] == [records.index(r) + 1 for r in responses]


def test_wet_conversion_records_are_read_as_text(tmp_path):
    (tmp_path / "crawl.wet.gz").write_bytes(warc_bytes(conversion_records(TEXTS[:3])))
    docs, drops, stats = _read_all(tmp_path / "crawl.wet.gz")
    assert [d["text"] for d in docs] == TEXTS[:3] and stats.records_skipped == {"warcinfo": 1}


def test_warc_page_in_another_charset(tmp_path):
    text = "Crème brûlée needs a water bath, a low oven and patience: the custard sets slowly. " * 10
    (tmp_path / "latin.warc.gz").write_bytes(warc_bytes(crawl_records([text], charset="iso-8859-1")))
    docs, _, _ = _read_all(tmp_path / "latin.warc.gz")
    assert "Crème brûlée" in docs[0]["text"]


def test_truncated_warc_keeps_the_records_before_the_damage(tmp_path):
    data = warc_bytes(crawl_records(TEXTS))
    for cut in (len(data) // 3, len(data) // 2, len(data) - 200):
        (tmp_path / "cut.warc.gz").write_bytes(data[:cut])
        docs, drops, _ = _read_all(tmp_path / "cut.warc.gz", on_bad_file="skip")
        assert drops[-1]["reason"] == "unreadable_file" and "EOFError" in drops[-1]["detail"]
        for doc in docs:  # what is kept is whole: a record cut short is left to the unreadable rest
            assert words_of(doc["text"])[-20:] == words_of(TEXTS[int(doc["url"].rsplit("-", 1)[1])])[-20:]
        with pytest.raises(InputError, match="cut.warc.gz: unreadable"):
            _read_all(tmp_path / "cut.warc.gz", on_bad_file="fail")


def test_warc_format_is_detected_and_can_be_named(tmp_path):
    from bft.storage import detect_format

    assert {detect_format(n) for n in ("a.warc", "a.warc.gz", "CC-MAIN-1.warc.wet.gz", "b.wet")} == {"warc"}
    (tmp_path / "crawl.data").write_bytes(warc_bytes(crawl_records(TEXTS[:2]), gz=False))
    docs, _, _ = _read_all(tmp_path / "crawl.data", fmt="warc")
    assert len(docs) == 2
    assert load_config(None, ["model=/m", "input.format=warc"]).input.format == "warc"


def test_a_page_whose_html_cannot_be_parsed_is_dropped_with_a_reason(tmp_path, monkeypatch):
    import bft.readers.warc as warc

    def broken(payload, charset):
        raise ValueError("parser gave up")

    monkeypatch.setattr(warc, "html_text", broken)
    (tmp_path / "crawl.warc.gz").write_bytes(warc_bytes(crawl_records(TEXTS[:2])))
    docs, drops, stats = _read_all(tmp_path / "crawl.warc.gz")
    assert not docs and [d["reason"] for d in drops] == ["extraction_failed"] * 2
    assert "parser gave up" in drops[0]["detail"] and stats.drop_reasons == {"extraction_failed": 2}


def test_encoded_bodies_are_decoded_and_a_lying_one_costs_only_its_page(tmp_path):
    """gzip and chunked bodies are decoded; a body that claims gzip but is not is dropped
    (decode_failed) and the pages after it are still read."""
    import gzip as gz

    from warc_files import Record, http_response, page_html

    def response(n: int, body: bytes, extra: str) -> Record:
        return Record("response", f"https://example.org/enc/{n}", http_response("200 OK", "text/html", body, extra),
                      "application/http; msgtype=response", f"urn:uuid:00000000-0000-0000-0000-{n:012d}")

    pages = [page_html(f"P{i}", TEXTS[i]).encode() for i in range(4)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (pages[2][:100], pages[2][100:])) + b"0\r\n\r\n"
    records = [response(1, gz.compress(pages[0]), "Content-Encoding: gzip\r\n"),
               response(2, b"this is not gzip at all", "Content-Encoding: gzip\r\n"),
               response(3, chunked, "Transfer-Encoding: chunked\r\n"),
               response(4, pages[3], "")]
    (tmp_path / "enc.warc.gz").write_bytes(warc_bytes(records))
    docs, drops, _ = _read_all(tmp_path / "enc.warc.gz")
    assert [d["url"].rsplit("/", 1)[1] for d in docs] == ["1", "3", "4"]
    for doc, i in zip(docs, (0, 2, 3)):
        assert words_of(doc["text"])[-20:] == words_of(TEXTS[i])[-20:]
    assert [(d["source_row"], d["reason"]) for d in drops] == [(2, "decode_failed")]
