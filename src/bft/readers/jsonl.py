"""JSON Lines reader (plain or gzip-compressed, local or S3)."""

from __future__ import annotations

import gzip
import json
from typing import Any, Iterator

from bft.readers.base import ColumnMapping
from bft.storage import Storage


class RejectedLine(dict):
    """A line that is no record (bad JSON or bytes, not an object): its drop record. A type
    of its own, so no field of a real record (a ``reason`` key) can pass for one."""


def iter_jsonl_records(storage: Storage, uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)``; unusable lines come as :class:`RejectedLine` drop records.

    Lines are split as bytes and decoded one by one, so a bad byte costs its line
    (dropped as ``invalid_utf8``, text kept with replacement characters), not the file.
    """
    with storage.open(uri, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if uri.lower().endswith(".gz") else raw
        for number, data in enumerate(stream, start=1):
            if not data.strip():
                continue
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, RejectedLine(ColumnMapping.drop(
                    uri, number, "invalid_utf8", f"not UTF-8 (byte {exc.start}: {exc.reason})",
                    text=data.decode("utf-8", "replace").rstrip("\n")))
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                yield number, RejectedLine(ColumnMapping.drop(uri, number, "malformed_json", f"invalid JSON ({msg})",
                                                              text=line.rstrip("\n")))
                continue
            if not isinstance(record, dict):
                yield number, RejectedLine(ColumnMapping.drop(uri, number, "not_an_object",
                                                              f"JSON {type(record).__name__}, expected an object",
                                                              text=line.rstrip("\n")))
                continue
            yield number, record
