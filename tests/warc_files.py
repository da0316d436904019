"""WARC files for tests, written byte by byte here (not by the library the reader uses, so
a reader bug cannot hide in a writer with the same bug).

``crawl_records(texts)`` wraps each text as an HTML page (title, script, navigation and
footer around an article of its paragraphs) in an HTTP 200 ``response`` record, and mixes
in the records a crawl also holds and the reader must skip: ``warcinfo``, ``request``,
``metadata``, a 404, an image and a redirect.
"""

from __future__ import annotations

import gzip
import html
import random
import uuid
from dataclasses import dataclass

NAV = "Home | Recipes | About us | Contact"
FOOTER = "Copyright 2026 Example Media. All rights reserved."
SCRIPT = "var tracker = {id: 42, consent: 'cookie banner text'};"


WORDS = ("soil", "pot", "root", "water", "light", "leaf", "spring", "drainage", "mix", "stem", "fern", "sun")


def paragraph(rng: random.Random, n_chars: int) -> str:
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < n_chars:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(sentences)


def long_document(seed: int = 0, paragraphs: int = 14) -> str:
    """A page of ``paragraphs`` paragraphs (250-900 characters each) of plain English words."""
    rng = random.Random(seed)
    return "\n\n".join(paragraph(rng, rng.randint(250, 900)) for _ in range(paragraphs))


@dataclass
class Record:
    kind: str
    url: str | None
    block: bytes
    content_type: str
    record_id: str


def _rid(n: int) -> str:
    return f"urn:uuid:{uuid.UUID(int=n)}"


def page_html(title: str, text: str, charset: str = "utf-8") -> str:
    paragraphs = "".join(f"<p>{html.escape(p)}</p>\n" for p in text.split("\n\n") if p.strip())
    return (f"<!DOCTYPE html><html><head><meta charset=\"{charset}\"><title>{html.escape(title)}</title>"
            f"<script>{SCRIPT}</script></head><body><nav><a href=\"/\">{NAV}</a></nav>"
            f"<article><h1>{html.escape(title)}</h1>\n{paragraphs}</article>"
            f"<footer>{FOOTER}</footer></body></html>")


def http_response(status: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n")
    return head.encode("latin-1") + body


def crawl_records(texts: list[str], *, start: int = 1, charset: str = "utf-8") -> list[Record]:
    """A warcinfo record, then per text a request and its 200 HTML response, with a 404,
    an image, a redirect and a metadata record in between."""
    n = start * 1000
    records = [Record("warcinfo", None, b"software: bft tests\r\nformat: WARC File Format 1.1\r\n",
                      "application/warc-fields", _rid(n))]
    for i, text in enumerate(texts):
        url = f"https://example.org/page/{start}-{i}"
        n += 10
        records.append(Record("request", url, f"GET /page/{i} HTTP/1.1\r\nHost: example.org\r\n\r\n".encode(),
                              "application/http; msgtype=request", _rid(n)))
        body = page_html(f"Page {i}", text, charset).encode(charset, "xmlcharrefreplace")
        records.append(Record("response", url, http_response("200 OK", f"text/html; charset={charset}", body),
                              "application/http; msgtype=response", _rid(n + 1)))
        if i % 3 == 0:
            records.append(Record("metadata", url, b"fetchTimeMs: 120\r\n", "application/warc-fields", _rid(n + 2)))
        if i % 4 == 1:
            records.append(Record("response", url + "/missing",
                                  http_response("404 Not Found", "text/html", b"<html><body>Not found</body></html>"),
                                  "application/http; msgtype=response", _rid(n + 3)))
        if i % 4 == 2:
            records.append(Record("response", url + "/logo.png",
                                  http_response("200 OK", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(64))),
                                  "application/http; msgtype=response", _rid(n + 4)))
        if i % 4 == 3:
            records.append(Record("response", url + "/old",
                                  http_response("301 Moved Permanently", "text/html", b"", f"Location: {url}\r\n"),
                                  "application/http; msgtype=response", _rid(n + 5)))
    return records


def pages(records: list[Record]) -> list[Record]:
    """The records that are documents: 200 HTML responses."""
    return [r for r in records if r.kind == "response" and r.block.startswith(b"HTTP/1.1 200")
            and b"text/html" in r.block.split(b"\r\n\r\n")[0]]


def skipped_count(records: list[Record]) -> int:
    """Records the reader must skip: all but the 200 HTML responses and conversions."""
    return sum(1 for r in records if r.kind != "conversion") - len(pages(records))


def conversion_records(texts: list[str], start: int = 1) -> list[Record]:
    """A WET file's records: warcinfo, then one text/plain conversion per text."""
    records = [Record("warcinfo", None, b"software: bft tests\r\n", "application/warc-fields", _rid(start * 1000))]
    for i, text in enumerate(texts):
        records.append(Record("conversion", f"https://example.org/wet/{start}-{i}", text.encode("utf-8"),
                              "text/plain", _rid(start * 1000 + i + 1)))
    return records


def record_bytes(record: Record) -> bytes:
    headers = [("WARC-Type", record.kind), ("WARC-Record-ID", f"<{record.record_id}>"),
               ("WARC-Date", "2026-11-30T12:00:00Z")]
    if record.url:
        headers.append(("WARC-Target-URI", record.url))
    headers += [("Content-Type", record.content_type), ("Content-Length", str(len(record.block)))]
    head = "WARC/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8") + record.block + b"\r\n\r\n"


def warc_bytes(records: list[Record], gz: bool = True) -> bytes:
    """The file: one gzip member per record (as Common Crawl writes them), or plain."""
    if gz:
        return b"".join(gzip.compress(record_bytes(r)) for r in records)
    return b"".join(record_bytes(r) for r in records)
