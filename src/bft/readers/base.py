"""Shared reader logic: column mapping, stable ids and the per-file read loop."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from bft.config import InputConfig
from bft.schema import row_key
from bft.storage import Storage, detect_format

# When the config names no column, these are tried in order. They cover Dolma
# (id, text, metadata.url), FineWeb (id, text, url) and C4 (text, url).
DEFAULT_ID_COLUMNS = ("id",)
DEFAULT_URL_COLUMNS = ("url", "metadata.url")


class InputError(ValueError):
    """A whole input file cannot be used (wrong columns, unreadable)."""


_MISSING = object()


def _resolve(record: dict[str, Any], dotted: str) -> Any:
    """``record['a']['b']`` for ``'a.b'`` (a literal key with dots wins), or ``_MISSING``."""
    if dotted in record:
        return record[dotted]
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def lookup(record: dict[str, Any], dotted: str) -> Any:
    value = _resolve(record, dotted)
    return None if value is _MISSING else value


def _clean(value: str) -> str:
    """``value`` made storable: lone surrogates (from ``\\ud800``-style JSON escapes)
    cannot be written as UTF-8, so they become U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def content_id(text: str, url: str | None) -> str:
    """Stable id for sources without one: the same url + text always gets the same id."""
    digest = hashlib.sha1(f"{url or ''}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha1-{digest[:24]}"


@dataclass(frozen=True)
class ColumnMapping:
    """Where the text, id and url of a document are in an input record."""

    text: str = "text"
    id: str | None = None
    url: str | None = None

    @classmethod
    def from_config(cls, cfg: InputConfig) -> ColumnMapping:
        return cls(text=cfg.text_column, id=cfg.id_column, url=cfg.url_column)

    def columns_read(self) -> list[str]:
        """The fields a record's document is made from: text, id and url (or the defaults tried)."""
        return [self.text, *((self.id,) if self.id else DEFAULT_ID_COLUMNS),
                *((self.url,) if self.url else DEFAULT_URL_COLUMNS)]

    def _first(self, record: dict[str, Any], explicit: str | None, defaults: tuple[str, ...]) -> Any:
        for name in (explicit,) if explicit else defaults:
            value = lookup(record, name)
            if value is not None:
                return value
        return None

    def to_doc(self, record: dict[str, Any], source: str, position: int) -> dict[str, Any]:
        """A document row, or a drop record (with ``reason``) when the text is unusable."""
        url = self._first(record, self.url, DEFAULT_URL_COLUMNS)
        url = None if url is None else _clean(str(url))
        raw_id = self._first(record, self.id, DEFAULT_ID_COLUMNS)
        raw_id = None if raw_id is None else _clean(str(raw_id))
        text = lookup(record, self.text)
        if text is None:
            return self.drop(source, position, "missing_text",
                             f"no '{self.text}' field", raw_id, url)
        if not isinstance(text, str):
            return self.drop(source, position, "invalid_text",
                             f"'{self.text}' is {type(text).__name__}, not a string", raw_id, url,
                             text=repr(text)[:10000])
        if not text.strip():
            return self.drop(source, position, "empty_text", "text is empty", raw_id, url)
        if (clean := _clean(text)) != text:
            return self.drop(source, position, "invalid_utf8", "text holds unpaired surrogate escapes",
                             raw_id, url, text=clean)
        doc_id = raw_id if raw_id is not None else content_id(text, url)
        return {"id": doc_id, "url": url, "source": source, "source_row": position, "text": text}

    @staticmethod
    def drop(source: str, position: int, reason: str, detail: str, raw_id: Any = None,
             url: str | None = None, text: str | None = None) -> dict[str, Any]:
        doc_id = _clean(str(raw_id)) if raw_id is not None else row_key(source, position)
        return {"id": doc_id, "url": url, "source": source, "source_row": position, "reason": reason,
                "detail": f"{source}, row {position}: {detail}", "text": text}


# Text kept in the drop record of a row too large to take in.
PREVIEW_CHARS = 10_000


@dataclass(frozen=True)
class ReadLimits:
    """How much of one row a reader takes in (``input.max_line_bytes``, ``input.max_document_chars``)."""

    max_line_bytes: int
    max_document_chars: int

    @classmethod
    def from_config(cls, cfg: InputConfig | None = None) -> ReadLimits:
        cfg = cfg or InputConfig()
        return cls(cfg.max_line_bytes, cfg.max_document_chars)

    def check_document(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row``, or its ``too_large`` drop record when its text is over the limit."""
        if "reason" in row or len(row["text"]) <= self.max_document_chars:
            return row
        drop = ColumnMapping.drop(row["source"], row["source_row"], "too_large",
                                  f"text of {len(row['text'])} characters, over input.max_document_chars="
                                  f"{self.max_document_chars}", row["id"], row["url"], text=row["text"][:PREVIEW_CHARS])
        return drop


@dataclass
class ReadStats:
    """What one input file held; written next to the outputs so counts reconcile."""

    source: str
    rows_seen: int = 0
    rows_ok: int = 0
    rows_dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    # WARC records that are no document (requests, metadata, non-200, not HTML), by kind:
    # not rows, so not in rows_seen.
    records_skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, kind: str) -> None:
        self.records_skipped[kind] = self.records_skipped.get(kind, 0) + 1

    def count(self, row: dict[str, Any]) -> None:
        self.rows_seen += 1
        if "reason" in row:
            self.rows_dropped += 1
            self.drop_reasons[row["reason"]] = self.drop_reasons.get(row["reason"], 0) + 1
        else:
            self.rows_ok += 1


# Errors that make the rest of a file unreadable: truncated or corrupt compression,
# a file that is not Parquet, a missing text column, I/O that failed every retry.
FILE_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def read_file(storage: Storage, uri: str, fmt: str, mapping: ColumnMapping, rows_per_block: int,
              on_bad_file: str = "fail", limits: ReadLimits | None = None,
              ) -> Iterator[tuple[list[dict], list[dict], ReadStats]]:
    """Yield ``(docs, drops, stats)`` chunks of at most ``rows_per_block`` rows.

    ``stats`` is the running per-file tally; the last chunk carries the final one.
    When the file cannot be read to its end, ``on_bad_file="fail"`` raises
    :class:`InputError` naming it; ``"skip"`` keeps the rows read so far and records the
    unreadable rest as one dropped row (reason ``unreadable_file``, or ``wrong_schema``
    when the text column is missing; numbered after the last row read), so the failure
    is counted and visible in ``dropped/``.
    """
    from bft.readers.jsonl import RejectedLine, iter_jsonl_records
    from bft.readers.parquet import iter_parquet_records
    from bft.readers.warc import SkippedRecord, iter_warc_records

    limits = limits or ReadLimits.from_config()
    if fmt == "auto":
        fmt = detect_format(uri) or ""
    if fmt == "jsonl":
        records = iter_jsonl_records(storage, uri, limits.max_line_bytes)
    elif fmt == "parquet":
        records = iter_parquet_records(storage, uri, mapping, rows_per_block)
    elif fmt == "warc":
        records = iter_warc_records(storage, uri)
        mapping = ColumnMapping()  # the reader's own fields: text, id, url
    else:
        raise InputError(f"{uri}: cannot tell the format from the name; set input.format")

    stats = ReadStats(source=uri)
    docs: list[dict] = []
    drops: list[dict] = []
    saw_text_column = fmt == "warc"  # no columns to map: the reader makes the fields
    position = 0
    try:
        for position, record in records:
            if isinstance(record, SkippedRecord):  # a WARC record that is no document
                stats.skip(record)
                continue
            if isinstance(record, RejectedLine):  # the format reader rejected it (bad JSON, unparseable HTML)
                row = record
            else:
                row = mapping.to_doc(record, uri, position)
                saw_text_column = saw_text_column or row.get("reason") != "missing_text"
                row = limits.check_document(row)
            stats.count(row)
            (drops if "reason" in row else docs).append(row)
            if len(docs) + len(drops) >= rows_per_block:
                yield docs, drops, stats
                docs, drops = [], []
        objects = stats.rows_seen - sum(stats.drop_reasons.get(r, 0)
                                        for r in ("malformed_json", "not_an_object", "invalid_utf8"))
        if objects > 0 and not saw_text_column and on_bad_file == "fail":
            raise InputError(
                f"{uri}: no record has the text column '{mapping.text}'; "
                f"set input.text_column to the field that holds the document text")
    except FILE_ERRORS as exc:
        where = f"after row {position}" if position else "before its first row"
        cause = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        cause = cause.removeprefix(f"{uri}: ")
        if on_bad_file == "fail":
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{uri}: unreadable {where}: {cause} (input.on_bad_file=fail; "
                             f"'skip' records the file in dropped/ and goes on)") from exc
        reason = "wrong_schema" if isinstance(exc, InputError) else "unreadable_file"
        row = ColumnMapping.drop(uri, position + 1, reason, f"file unreadable {where}: {cause}")
        stats.count(row)
        drops.append(row)
    yield docs, drops, stats
