"""WARC and WET reader (Common Crawl's raw crawl and its text extracts), local or S3.

Records are parsed by FastWARC and HTML is turned into its main text by Resiliparse
(both maintained by the same group, used on Common Crawl at scale):

- ``response`` records with HTTP status 200 and an HTML content type become documents:
  url from ``WARC-Target-URI``, id from ``WARC-Record-ID``; the page's main text is
  extracted (navigation, footers and scripts left out). Pages whose body cannot be decoded
  (a ``Content-Encoding`` it does not have) or whose text cannot be extracted are dropped
  (``decode_failed`` / ``extraction_failed`` / ``empty_text``), so they are counted, and the
  rest of the file is read on;
- ``conversion`` records (WET files) are text already and are read as it;
- every other record (``warcinfo``, ``request``, ``metadata``, non-200 responses, images,
  PDFs, ...) is no document: it is skipped and counted in the file's read record
  (``records_skipped``), not numbered as a row.

Compressed files are decompressed with Python's gzip module rather than FastWARC's own
reader, so a truncated file fails exactly like a truncated JSONL.gz (``input.on_bad_file``).
Every record keeps its position in the file (from 1) as ``source_row``, skipped ones
included, so row numbers stay the same whatever is skipped. In a damaged file, the
records before the damage are kept except the last, which may be cut short.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any, Iterator

from bft.readers.base import ColumnMapping
from bft.readers.jsonl import RejectedLine
from bft.storage import Storage

HTML_TYPES = ("text/html", "application/xhtml+xml")
# Bytes of an HTML page that are decoded and parsed: a page bigger than this is cut (a
# crawler's own limit is 1 MiB per record), so one huge record cannot exhaust a task.
MAX_HTML_BYTES = 4 * 1024 * 1024


class _EndAtDamage:
    """A stream that ends where its decompression fails, keeping the error for later:
    FastWARC reads ahead, and an error raised inside its read would lose the records
    before the damage, which a truncated JSONL.gz keeps."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.error: BaseException | None = None
        # read1: one decompression step per call (read() would fill its whole size first)
        self._read = getattr(stream, "read1", stream.read)

    def __getattr__(self, name: str) -> Any:  # tell, seekable, ...: the stream's own
        return getattr(self.stream, name)

    def read(self, size: int = -1) -> bytes:
        # In small pieces: the bytes decompressed before the damage still come back.
        parts, wanted = [], size if size is not None and size >= 0 else 1 << 62
        while wanted > 0 and self.error is None:
            try:
                part = self._read(min(wanted, 1 << 16))
            except (EOFError, OSError, zlib.error) as exc:
                self.error = exc
                break
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)


class SkippedRecord(str):
    """A record that is no document; its value says which kind (counted per kind)."""


def _record_id(record: Any) -> str | None:
    value = record.headers.get("WARC-Record-ID")
    return value.strip("<>") if value else None


def _dechunk(data: bytes) -> bytes:
    """A ``Transfer-Encoding: chunked`` body, joined (a body cut short keeps what it has)."""
    out, at = [], 0
    while at < len(data):
        end = data.find(b"\r\n", at)
        if end < 0:
            break
        size = int(data[at:end].split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        out.append(data[end + 2:end + 2 + size])
        at = end + 2 + size + 2
    return b"".join(out)


def http_body(data: bytes, headers: Any) -> bytes:
    """The page's bytes, with its transfer and content encodings undone, in this task, one
    record at a time: FastWARC's own decoding (``auto_decode``) leaves the stream unreadable
    after one body that lies about its encoding, which would cost the rest of the file.
    Decompressed output is bounded by ``MAX_HTML_BYTES`` (a compressed bomb stops there)."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        data = _dechunk(data)
    encoding = (headers.get("Content-Encoding") or "").strip().lower()
    if encoding in ("", "identity", "none"):
        return data
    if encoding in ("gzip", "x-gzip", "deflate"):
        # gzip header, zlib header or raw deflate (servers mean any of them by "deflate")
        for wbits in ((16 + 15,) if "gzip" in encoding else (15, -15)):
            try:
                return zlib.decompressobj(wbits).decompress(data, MAX_HTML_BYTES)
            except zlib.error:
                if wbits == -15 or "gzip" in encoding:
                    raise
    if encoding == "br":
        import brotli

        try:
            return brotli.Decompressor().process(data, output_buffer_limit=MAX_HTML_BYTES)[:MAX_HTML_BYTES]
        except brotli.error as exc:
            raise ValueError(f"brotli: {exc}") from exc
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


def html_text(payload: bytes, charset: str | None) -> str:
    """The main text of an HTML page."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    html = bytes_to_str(payload, charset or detect_encoding(payload))
    return extract_plain_text(html, main_content=True, alt_texts=False, preserve_formatting=True)


def _document(record: Any, uri: str, position: int) -> dict[str, Any] | RejectedLine | SkippedRecord:
    from fastwarc.warc import WarcRecordType

    kind = record.record_type
    doc_id, url = _record_id(record), record.headers.get("WARC-Target-URI")
    if kind == WarcRecordType.conversion:
        data = record.reader.read()
        return {"id": doc_id, "url": url, "text": data.decode("utf-8", "replace")}
    if kind != WarcRecordType.response:
        return SkippedRecord(str(kind))
    if not record.is_http:
        return SkippedRecord("response_not_http")
    status = record.http_headers.status_code
    if status != 200:
        return SkippedRecord(f"http_{status}")
    content_type = (record.http_content_type or "").lower()
    if content_type not in HTML_TYPES:
        return SkippedRecord("not_html")
    try:
        payload = http_body(record.reader.read(MAX_HTML_BYTES), record.http_headers)
    except (ValueError, OSError, zlib.error, EOFError) as exc:
        return RejectedLine(ColumnMapping.drop(uri, position, "decode_failed",
                                               f"the HTTP body of {url} cannot be decoded: {type(exc).__name__}: {exc}",
                                               doc_id, url))
    try:
        text = html_text(payload, record.http_charset)
    except Exception as exc:  # noqa: BLE001 - a page the parser cannot take costs that page only
        return RejectedLine(ColumnMapping.drop(uri, position, "extraction_failed",
                                               f"no text from the HTML of {url}: {type(exc).__name__}: {exc}",
                                               doc_id, url))
    return {"id": doc_id, "url": url, "text": text}


def iter_warc_records(storage: Storage, uri: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(record number, document fields | RejectedLine | SkippedRecord)``."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with storage.open(uri, "rb") as raw:
        stream = _EndAtDamage(gzip.GzipFile(fileobj=raw) if uri.lower().endswith(".gz") else raw)
        records = ArchiveIterator(stream, record_types=WarcRecordType.any_type, parse_http=True,
                                  auto_decode="none", stream_detect=False, fsspec_args=False)
        # Each record is passed on once the next one has been parsed: the last record
        # before damage may be cut short, and is then left to the unreadable rest.
        held: tuple[int, Any] | None = None
        for position, record in enumerate(records, start=1):
            if held is not None:
                yield held
            held = position, _document(record, uri, position)
        if stream.error is not None:
            raise stream.error
        if held is not None:
            yield held
