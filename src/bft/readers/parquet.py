"""Parquet reader (local or S3), streamed one record batch at a time."""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow.parquet as pq

from bft.readers.base import ColumnMapping, InputError
from bft.storage import Storage


def iter_parquet_records(storage: Storage, uri: str, mapping: ColumnMapping,
                         batch_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, record)`` for every row of the file."""
    with storage.open(uri, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        top_level = mapping.text.split(".")[0]
        names = parquet.schema_arrow.names
        if top_level not in names:
            raise InputError(
                f"{uri}: text column '{mapping.text}' not found (columns: {', '.join(names)}); "
                f"set input.text_column")
        number = 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            for record in batch.to_pylist():
                number += 1
                yield number, record
