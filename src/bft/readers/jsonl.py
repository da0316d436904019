"""JSON Lines reader (plain or gzip-compressed, local or S3)."""

from __future__ import annotations

import gzip
import io
import json
from typing import IO, Any, Iterator

from bft.config import InputConfig
from bft.readers.base import PREVIEW_CHARS, ColumnMapping
from bft.storage import Storage

DEFAULT_MAX_LINE_BYTES = InputConfig().max_line_bytes
SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of a line too large


class RejectedLine(dict):
    """A line that is no record (bad JSON or bytes, not an object): its drop record. A type
    of its own, so no field of a real record (a ``reason`` key) can pass for one."""


def bounded_lines(stream: IO[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """``(line, size)`` for each line of ``stream``; a line over ``limit`` bytes comes as
    its first ``limit + 1`` bytes and its full size, the rest skipped in bounded reads."""
    while data := stream.readline(limit + 1):
        size = len(data)
        tail = data
        while size > limit and not tail.endswith(b"\n"):
            tail = stream.readline(SKIP_CHUNK)
            if not tail:  # the file ends inside the line
                break
            size += len(tail)
        yield data, size


def iter_jsonl_records(storage: Storage, uri: str,
                       max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)``; unusable lines come as :class:`RejectedLine` drop records.

    Lines are split as bytes and decoded one by one, so a bad byte costs its line
    (dropped as ``invalid_utf8``, text kept with replacement characters), not the file.
    A line over ``max_line_bytes`` is never held whole (``too_large``).
    """
    with storage.open(uri, "rb") as raw:
        # Buffered, so a line is read in bounded pieces (fsspec's own readline has no limit).
        stream = gzip.GzipFile(fileobj=raw) if uri.lower().endswith(".gz") else io.BufferedReader(raw, 1 << 20)
        for number, (data, size) in enumerate(bounded_lines(stream, max_line_bytes), start=1):
            if size > max_line_bytes:
                yield number, RejectedLine(ColumnMapping.drop(
                    uri, number, "too_large", f"line of {size} bytes, over input.max_line_bytes={max_line_bytes}",
                    text=data[:PREVIEW_CHARS].decode("utf-8", "replace")))
                continue
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
