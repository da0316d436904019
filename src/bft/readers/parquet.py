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
        # Only the mapped columns (and the default id/url ones present): a crawl's HTML or
        # embeddings column is never read.
        wanted = {name.split(".")[0] for name in mapping.columns_read()}
        number = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[n for n in names if n in wanted]):
            for record in batch.to_pylist():
                number += 1
                yield number, record
