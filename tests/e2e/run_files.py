"""A run folder read straight from its files with fsspec and pyarrow, never through bft:
the independent side of every count an end-to-end test compares with what bft says (its
manifest, the resume block of a resumed attempt, its report).

Rows are identified as bft documents them: by where they came from, ``(source, source_row)``,
and a segment of a long document by its ``segment`` too.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]

# The documented layout (README "Outputs"), written out here rather than imported.
STAGE_FOLDERS = {"filter": "filtered", "generate": "generated", "curate": "curated",
                 "rewrite": "rewritten", "sft": "sft"}
ORDER = ("read", "filter", "generate", "curate", "rewrite", "sft")
PREVIOUS = dict(zip(ORDER[1:], ORDER))
# Drop reasons no healthy run may have: they stand for rows an engine or a batch lost.
LOST = ("batch_failed", "engine_error")


SEED_PAIRS = "seed-pairs.parquet"  # sft/'s seed pairs (output.seed_mix): not a stage file


def parquet_paths(fs, folder: str) -> list[str]:
    return sorted(p for p in fs.find(folder) if p.endswith(".parquet") and not p.endswith(f"/{SEED_PAIRS}")
                  ) if fs.exists(folder) else []


def key(row: dict) -> tuple[str, int, int | None]:
    return row["source"], row["source_row"], row.get("segment")


def normalized(text: str) -> str:
    """Case, Unicode form and runs of whitespace folded: the README's "normalized text"."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class RunFiles:
    """Everything a run folder holds, read once. ``fs``: an fsspec filesystem (local or
    s3fs); ``run``: the run folder's path on it (no ``s3://``)."""

    def __init__(self, fs, run: str):
        fs.invalidate_cache()
        self.run = run
        self.schemas: dict[str, list[list[str]]] = {}
        self.kept: dict[str, list[dict]] = {}
        for stage, folder in STAGE_FOLDERS.items():
            self.kept[stage] = self._rows(fs, f"{run}/{folder}", stage)
        self.dropped = self._rows(fs, f"{run}/dropped", "dropped")
        seed_file = f"{run}/{STAGE_FOLDERS['sft']}/{SEED_PAIRS}"
        self.seed_rows = pq.read_table(fs.open(seed_file, "rb")).to_pylist() if fs.exists(seed_file) else []
        stats_dir = f"{run}/_stats/read"
        self.stats = {}
        for path in (fs.find(stats_dir) if fs.exists(stats_dir) else []):
            if path.endswith(".json"):
                record = json.loads(fs.cat(path))
                self.stats[record["source"]] = record
        manifest = f"{run}/manifest.json"
        self.manifest = json.loads(fs.cat(manifest)) if fs.exists(manifest) else None

    def _rows(self, fs, folder: str, name: str) -> list[dict]:
        rows: list[dict] = []
        self.schemas[name] = []
        for path in parquet_paths(fs, folder):
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh)
            self.schemas[name].append(table.schema.names)
            rows += table.to_pylist()
        return rows

    # --- what each stage finished --------------------------------------------------------

    def finished(self, stage: str) -> set[tuple[str, int, int | None]]:
        """Rows ``stage`` is done with: in its output folder, or dropped by it."""
        done = {key(r) for r in self.dropped if r["stage"] == stage}
        if stage != "read":
            done |= {key(r) for r in self.kept[stage]}
        return done

    def done_at_read_or_filter(self, source: str) -> int:
        """Whole documents of ``source`` finished at read or filter (segments not counted)."""
        return sum(1 for s, _, g in self.finished("read") | self.finished("filter") if s == source and g is None)

    def segments_added(self) -> int:
        """Rows the cutting of long documents added: segment rows beyond one per document."""
        segments = [r for r in self.kept["filter"] + self.dropped if r.get("segment") is not None
                    and r.get("stage", "filter") == "filter"]
        return len(segments) - len({(r["source"], r["source_row"]) for r in segments})

    def input_done(self, source: str) -> bool:
        """bft reads a file again while it holds a segmented document (README "Resume")."""
        stats = self.stats.get(source)
        segmented = any(s == source and g is not None for s, _, g in self.finished("filter"))
        return stats is not None and not segmented and self.done_at_read_or_filter(source) >= stats["rows_seen"]

    def expected_resume(self, inputs: list[str]) -> dict:
        """What re-running this run must find (the manifest's ``resume`` block)."""
        return {
            "finished_before": {stage: len(self.finished(stage)) for stage in ORDER},
            "input_files_read_again": sum(1 for uri in inputs if not self.input_done(uri)),
            "rows_entering_at": {stage: len({key(r) for r in self.kept[PREVIOUS[stage]]} - self.finished(stage))
                                 for stage in ORDER[2:]},
        }

    # --- checks ---------------------------------------------------------------------------

    def stage_counts(self) -> dict[str, dict]:
        """Per stage: rows in, out, dropped by reason, from the files alone."""
        counts: dict[str, dict] = {}
        rows_in = sum(s["rows_seen"] for s in self.stats.values())
        for stage in ORDER:
            drops = Counter(r["reason"] for r in self.dropped if r["stage"] == stage)
            out = sum(s["rows_ok"] for s in self.stats.values()) if stage == "read" else len(self.kept[stage])
            counts[stage] = {"in": rows_in, "out": out, "dropped_by_reason": dict(drops)}
            rows_in = out
        return counts

    def check_complete(self, input_rows: int | None = None) -> None:
        """Every input row ends exactly once (final dataset or dropped/), no stage holds a
        row twice, and the manifest says what the files say."""
        for stage, rows in self.kept.items():
            keys = [key(r) for r in rows]
            assert len(keys) == len(set(keys)), f"{stage}: rows written twice {_repeats(keys)}"
        ends = [key(r) for r in self.kept["sft"]] + [key(r) for r in self.dropped]
        assert len(ends) == len(set(ends)), f"rows ending twice: {_repeats(ends)}"
        seen = sum(s["rows_seen"] for s in self.stats.values())
        added = self.segments_added()
        assert len(ends) == seen + added, f"{seen} rows read (+{added} segments), {len(ends)} ended in sft/ or dropped/"
        if input_rows is not None:
            assert seen == input_rows
        m = self.manifest
        assert m is not None, f"{self.run}: no manifest"
        assert m["reconciled"] is True, m["reconciliation_problems"]
        assert m["invariant"] == {"input_rows": seen, "segments_added": added, "final_rows": len(self.kept["sft"]),
                                  "dropped_rows": len(self.dropped), "holds": True}
        assert m["stages"]["filter"]["segments_added"] == added
        for stage, expected in self.stage_counts().items():
            entry = m["stages"][stage]
            got = {"in": entry["in"], "out": entry["out"], "dropped_by_reason": entry["dropped_by_reason"]}
            assert got == expected, f"manifest {stage}: {got} != files {expected}"

    def check_nothing_lost(self) -> None:
        """No row was lost by an engine or a failed batch (the sweep would have relabelled
        any row a stage lost as ``batch_failed``, and counts would still reconcile)."""
        lost = [(r["stage"], r["reason"], r["detail"][:200]) for r in self.dropped if r["reason"] in LOST]
        assert not lost, f"{len(lost)} row(s) lost: {lost[:3]}"
        if self.manifest:
            assert not set(self.manifest["dropped_by_reason"]) & set(LOST), self.manifest["dropped_by_reason"]

    def check_dedup(self) -> None:
        """Among documents that reached dedup (kept by filter, or dropped there as
        duplicates), each normalized text is kept once and its copies name the kept one."""
        groups: dict[str, list[dict]] = {}
        for row in self.kept["filter"] + [r for r in self.dropped if r["reason"] == "duplicate"]:
            groups.setdefault(normalized(row["text"]), []).append(row)
        for rows in groups.values():
            kept = [r for r in rows if r.get("reason") is None]
            assert len(kept) == 1, f"{len(kept)} copies kept of one text: {[key(r) for r in kept]}"
            for copy in rows:
                if copy is not kept[0]:
                    assert kept[0]["id"] in copy["detail"], (copy["detail"], kept[0]["id"])

    def check_columns(self, documented: dict[str, list[str]], may_be_empty: tuple[str, ...] = (),
                      null_columns: tuple[str, ...] = ()) -> None:
        """Every file has the documented columns, and no column is empty in every row
        (``may_be_empty``: folders exempt from the latter; ``null_columns``: columns)."""
        for name, folder in [*STAGE_FOLDERS.items(), ("dropped", "dropped")]:
            rows = self.dropped if name == "dropped" else self.kept[name]
            assert self.schemas[name], f"no Parquet under {folder}/"
            for names in self.schemas[name]:
                assert names == documented[folder], f"{folder}/: {names} != {documented[folder]}"
            for column in [c for c in documented[folder] if c not in null_columns] if folder not in may_be_empty else ():
                assert any(r[column] not in (None, "", []) for r in rows), f"{folder}/: column {column} is empty"


def _repeats(keys: list) -> list:
    return [k for k, n in Counter(keys).items() if n > 1][:5]


def documented_columns() -> dict[str, list[str]]:
    """Columns of each output folder, as the README's Outputs table lists them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Outputs", 1)[1]
    table = section[section.index("| folder |"):].split("\n\n", 1)[0]
    columns: dict[str, list[str]] = {}
    previous: list[str] = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        folder = cells[0].strip("`").rstrip("/")
        if folder not in (*STAGE_FOLDERS.values(), "dropped"):
            continue
        names: list[str] = []
        for span in re.findall(r"`([^`]+)`", cells[2]):
            inherit = span.startswith("...")
            for name in re.split(r",(?![^{]*\})", span.removeprefix("...")):
                name = name.strip()
                braces = re.fullmatch(r"\{([^}]+)\}(.*)", name)
                names += [f"{b}{braces.group(2)}" for b in braces.group(1).split(",")] if braces else [name]
            if inherit:
                names = previous + names
        columns[folder] = names
        previous = names
    return columns
