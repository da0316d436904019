"""A crawl from a local folder, end to end: a WARC of real page text (``../shared/webdocs/``)
wrapped in HTML among the records a crawl also holds, and a WET file of the same kind of
text, read by ``bft run`` with the quickstart's engines. (The S3 runs read a WARC too:
test_pipeline_s3.py.)"""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

from needs import shared
from warc_files import conversion_records, crawl_records, pages, skipped_count, warc_bytes

from .conftest import engine_settings, run_bft
from .run_files import RunFiles


def page_texts(n: int) -> list[str]:
    """Real crawl text: English FineWeb pages of 800-5,000 characters, in file order (one
    long enough to be cut into segments)."""
    folder = shared("webdocs")
    rows = pq.read_table(folder / "sample.fineweb.parquet", columns=["text"]).column("text").to_pylist()
    short = [t for t in rows if 800 <= len(t) <= 2500 and t.isascii()][:n - 1]
    long = next(t for t in rows if 4000 <= len(t) <= 5000 and t.isascii())
    return [*short, long]


def test_local_warc_and_wet_run_end_to_end(tmp_path, tiny_model):
    *short, long = page_texts(4)
    texts = [short[0], short[1], long]
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    records = crawl_records(texts)
    (crawl / "CC-MAIN-sample.warc.gz").write_bytes(warc_bytes(records))
    (crawl / "CC-MAIN-sample.warc.wet.gz").write_bytes(warc_bytes(conversion_records([short[2]], start=2)))
    out = tmp_path / "out"
    result = run_bft("run", "examples/quickstart.yaml", "--run-id", "warc", *engine_settings(tiny_model),
                     "--set", f"input.uri={crawl}", "--set", f"output.uri={out}")
    assert result.returncode == 0, result.stderr[-4000:]

    files = RunFiles(fsspec.filesystem("file"), str(out / "warc"))
    files.check_complete()
    files.check_nothing_lost()
    warc = next(s for s in files.stats if s.endswith(".warc.gz") and ".wet" not in s)
    assert files.stats[warc]["rows_seen"] == len(texts)
    assert sum(files.stats[warc]["records_skipped"].values()) == skipped_count(records)
    skipped = files.manifest["stages"]["read"]["records_skipped"]
    assert skipped["warcinfo"] == 2 and skipped["request"] == len(texts)
    # ids and urls from the records; the long page as segments of it
    responses = {r.record_id: r.url for r in pages(records)}
    rows = [r for r in files.kept["filter"] + files.dropped if r["source"] == warc]
    assert {r["id"].split("#")[0] for r in rows} == set(responses)
    assert all(r["url"] == responses[r["id"].split("#")[0]] for r in rows)
    assert any(r["segment"] for r in rows) and files.manifest["stages"]["filter"]["segments_added"] >= 1
    # the WET file's page, read as text, with its record's url
    wet = [r for r in files.kept["filter"] + files.dropped if r["source"].endswith(".wet.gz")
           and r.get("stage", "filter") in ("read", "filter")]
    assert [r["url"] for r in wet] == ["https://example.org/wet/2-0"] and wet[0]["text"] == short[2]
