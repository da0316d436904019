"""JSON Lines reader (plain or gzip-compressed, local or S3)."""

from __future__ import annotations

import gzip
import io
import json
from typing import Any, Iterator

from bft.readers.base import ColumnMapping
from bft.storage import Storage


def iter_jsonl_records(storage: Storage, uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)``; unparseable lines come as drop records."""
    with storage.open(uri, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if uri.lower().endswith(".gz") else raw
        # Decode leniently: a bad byte should cost one line, not the file.
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="\n")
        for number, line in enumerate(text, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, ColumnMapping.drop(uri, number, "malformed_json", f"invalid JSON ({exc.msg})",
                                                 text=line.rstrip("\n"))
                continue
            if not isinstance(record, dict):
                yield number, ColumnMapping.drop(uri, number, "not_an_object",
                                                 f"JSON {type(record).__name__}, expected an object",
                                                 text=line.rstrip("\n"))
                continue
            yield number, record
