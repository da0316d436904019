"""Shared reader logic: column mapping, stable ids and the per-file read loop."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from bft.config import InputConfig
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

    def _first(self, record: dict[str, Any], explicit: str | None, defaults: tuple[str, ...]) -> Any:
        for name in (explicit,) if explicit else defaults:
            value = lookup(record, name)
            if value is not None:
                return value
        return None

    def to_doc(self, record: dict[str, Any], source: str, position: int) -> dict[str, Any]:
        """A document row, or a drop record (with ``reason``) when the text is unusable."""
        url = self._first(record, self.url, DEFAULT_URL_COLUMNS)
        url = None if url is None else str(url)
        raw_id = self._first(record, self.id, DEFAULT_ID_COLUMNS)
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
        doc_id = str(raw_id) if raw_id is not None else content_id(text, url)
        return {"id": doc_id, "url": url, "source": source, "source_row": position, "text": text}

    @staticmethod
    def drop(source: str, position: int, reason: str, detail: str, raw_id: Any = None,
             url: str | None = None, text: str | None = None) -> dict[str, Any]:
        doc_id = str(raw_id) if raw_id is not None else f"{source}#{position}"
        return {"id": doc_id, "url": url, "source": source, "source_row": position, "reason": reason,
                "detail": f"{source}, row {position}: {detail}", "text": text}


@dataclass
class ReadStats:
    """What one input file held; written next to the outputs so counts reconcile."""

    source: str
    rows_seen: int = 0
    rows_ok: int = 0
    rows_dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def count(self, row: dict[str, Any]) -> None:
        self.rows_seen += 1
        if "reason" in row:
            self.rows_dropped += 1
            self.drop_reasons[row["reason"]] = self.drop_reasons.get(row["reason"], 0) + 1
        else:
            self.rows_ok += 1


def read_file(storage: Storage, uri: str, fmt: str, mapping: ColumnMapping,
              rows_per_block: int) -> Iterator[tuple[list[dict], list[dict], ReadStats]]:
    """Yield ``(docs, drops, stats)`` chunks of at most ``rows_per_block`` rows.

    ``stats`` is the running per-file tally; the last chunk carries the final one.
    """
    from bft.readers.jsonl import iter_jsonl_records
    from bft.readers.parquet import iter_parquet_records

    if fmt == "auto":
        fmt = detect_format(uri) or ""
    if fmt == "jsonl":
        records = iter_jsonl_records(storage, uri)
    elif fmt == "parquet":
        records = iter_parquet_records(storage, uri, mapping, rows_per_block)
    else:
        raise InputError(f"{uri}: cannot tell the format from the name; set input.format")

    stats = ReadStats(source=uri)
    docs: list[dict] = []
    drops: list[dict] = []
    saw_text_column = False
    for position, record in records:
        if "reason" in record:  # the format reader already rejected it (e.g. bad JSON)
            row = record
        else:
            row = mapping.to_doc(record, uri, position)
            saw_text_column = saw_text_column or row.get("reason") != "missing_text"
        stats.count(row)
        (drops if "reason" in row else docs).append(row)
        if len(docs) + len(drops) >= rows_per_block:
            yield docs, drops, stats
            docs, drops = [], []
    objects = stats.rows_seen - stats.drop_reasons.get("malformed_json", 0) - stats.drop_reasons.get("not_an_object", 0)
    if objects > 0 and not saw_text_column:
        raise InputError(
            f"{uri}: no record has the text column '{mapping.text}'; "
            f"set input.text_column to the field that holds the document text")
    yield docs, drops, stats
