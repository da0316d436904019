"""Readers: turn input files (JSONL, JSONL.gz, Parquet) into document rows.

Each reader yields lists of row dicts with the columns of ``schema.DOC_COLUMNS`` and,
for rows that cannot be used, drop records (``reason`` set) that go to ``dropped/``.
"""

from bft.readers.base import ColumnMapping, InputError, ReadLimits, ReadStats, read_file

__all__ = ["ColumnMapping", "InputError", "ReadLimits", "ReadStats", "read_file"]
