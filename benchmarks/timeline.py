"""When each batch of a run was in each stage: the profile that found bft's stalls.

Every stage file records when its batch entered the stage and when it was written
(Parquet metadata ``bft.started_at`` / ``bft.finished_at``). Printed against the run's
start, they show whether stages overlap (streaming) or wait for each other.

    python benchmarks/timeline.py out/benchmark/work/docs-160/bft/bench
"""

from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq

from bft.config import StorageConfig
from bft.stages import FOLDERS
from bft.storage import Storage, join
from bft.writers.parquet import FINISHED_KEY, STARTED_KEY, parquet_files


def batch_spans(run_uri: str, storage: Storage) -> dict[str, list[tuple[float, float, int]]]:
    manifest = json.loads(storage.read_bytes(join(run_uri, "manifest.json")))
    t0 = manifest["started_at"]
    spans: dict[str, list[tuple[float, float, int]]] = {}
    for stage, folder in FOLDERS.items():
        for uri in parquet_files(storage, join(run_uri, folder)):
            with storage.open(uri, "rb") as fh:
                meta = pq.ParquetFile(fh)
                md = meta.schema_arrow.metadata or {}
                spans.setdefault(stage, []).append((float(md[STARTED_KEY]) - t0, float(md[FINISHED_KEY]) - t0,
                                                    meta.metadata.num_rows))
    return {stage: sorted(s) for stage, s in spans.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_uri", help="a finished run folder (local or s3://)")
    args = parser.parse_args()
    for stage, spans in batch_spans(args.run_uri, Storage(StorageConfig())).items():
        print(f"{stage:9s} {len(spans):4d} batches, first in at {spans[0][0]:7.1f} s, "
              f"last out at {max(s[1] for s in spans):7.1f} s")
        for start, end, rows in spans:
            print(f"          {start:7.1f} -> {end:7.1f} s  {rows:5d} rows")


if __name__ == "__main__":
    main()
