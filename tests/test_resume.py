"""Resume bookkeeping on a run folder written by the real writer (no Ray, no engines)."""

from __future__ import annotations

import json

import pytest

from bft.config import StorageConfig, load_config
from bft.resume import check_same_run, scan_run, write_run_record
from bft.steps.read import stats_uri
from bft.storage import Storage
from bft.writers.parquet import StageWriter

STORAGE = Storage(StorageConfig())
SRC = "/data/in.jsonl"


def doc(n: int, **extra) -> dict:
    return {"id": f"d{n}", "url": None, "source": SRC, "source_row": n, "text": f"text {n}", **extra}


def stats(run: str, rows_seen: int) -> None:
    STORAGE.write_bytes(stats_uri(run, SRC), json.dumps({"source": SRC, "rows_seen": rows_seen}).encode())


@pytest.fixture()
def run(tmp_path):
    """An interrupted run: 6 rows read; row 6 dropped by read; rows 1-4 kept and row 5
    dropped by filter; rows 1-2 generated (3 and 4 in flight when it died)."""
    uri = str(tmp_path / "run")
    writer = StageWriter(STORAGE, uri)
    writer.write("read", [], [{**doc(6), "reason": "malformed_json", "detail": "x"}], 0.0)
    writer.write("filter", [doc(1), doc(2)], [{**doc(5), "reason": "too_short", "detail": "x"}], 0.0)
    writer.write("filter", [doc(3), doc(4)], [], 0.0)
    writer.write("generate", [doc(1, instruction="q1")], [{**doc(2), "reason": "engine_error", "detail": "x"}], 0.0)
    stats(uri, 6)
    return uri


def test_finished_rows_per_stage(run):
    state = scan_run(STORAGE, run)
    finished = state.finished
    assert [finished.count(s) for s in ("read", "filter", "generate", "curate")] == [1, 5, 2, 0]
    mask = finished.mask("generate", [SRC] * 4, [1, 2, 3, 4])
    assert mask.tolist() == [True, True, False, False]
    # the same row number in another file is another row
    assert finished.mask("generate", ["/data/other.jsonl"], [1]).tolist() == [False]


def test_rows_join_where_they_stopped(run):
    state = scan_run(STORAGE, run)
    pending = {stage: sum(state.unfinished(stage).values()) for stage in ("generate", "curate", "rewrite", "sft")}
    assert pending["generate"] == 2  # rows 3 and 4
    assert len(state.unfinished("generate")) == 1  # only the filter file holding them
    assert pending["curate"] == 1  # row 1 was generated, not curated
    assert pending["rewrite"] == pending["sft"] == 0


def test_input_file_done_only_when_every_row_is_accounted_for(run, tmp_path):
    state = scan_run(STORAGE, run)
    assert state.input_done(SRC)  # 1 read drop + 5 filter rows = 6 rows seen
    stats(run, 7)  # a seventh row was read but never reached the filter's output
    assert not scan_run(STORAGE, run).input_done(SRC)
    assert not scan_run(STORAGE, str(tmp_path / "empty")).input_done(SRC)


def test_temporary_files_of_a_killed_writer_are_ignored(run):
    STORAGE.write_bytes(stats_uri(run, SRC) + ".tmp-dead", b"{half")
    with open(f"{run}/generated/part-x.parquet.tmp-dead", "wb") as fh:
        fh.write(b"PAR1 half a file")
    state = scan_run(STORAGE, run)
    assert state.finished.count("generate") == 2


def test_resume_refuses_a_changed_config(tmp_path, minimal_config_data):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal_config_data))
    cfg = load_config(str(path))
    run = str(tmp_path / "run")
    sha = {"generate": "a", "curate": "b", "rewrite": "c"}
    write_run_record(STORAGE, run, cfg, sha)
    check_same_run(STORAGE, run, cfg, sha)
    # scheduling may change between attempts (a bigger cluster, other batch sizes)
    check_same_run(STORAGE, run, load_config(str(path), ["generate.batch_size=3", "ray.num_cpus=64",
                                                         "curate.replicas=[1, 8]"]), sha)
    with pytest.raises(ValueError, match=r"curate\.threshold: 5 -> 3"):
        check_same_run(STORAGE, run, load_config(str(path), ["curate.threshold=3"]), sha)
    with pytest.raises(ValueError, match="prompt template of rewrite"):
        check_same_run(STORAGE, run, cfg, {**sha, "rewrite": "changed"})
    with pytest.raises(ValueError, match=r"generate\.engine_kwargs"):
        check_same_run(STORAGE, run, load_config(str(path), ["generate.engine_kwargs.max_model_len=2048"]), sha)


def test_rows_of_failed_batches_are_dropped_not_lost(run, tmp_path, minimal_config_data):
    """After a stream that ran to its end, rows a stage never finished were in batches
    Ray Data gave up on: they go to dropped/ as batch_failed, and counts add up again."""
    import pyarrow.parquet as pq
    import yaml

    from bft.pipeline import sweep_failed_batches

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal_config_data))
    assert sweep_failed_batches(STORAGE, run, load_config(str(path))) == 3
    dropped = pq.read_table(f"{run}/dropped").to_pylist()
    failed = sorted((r["stage"], r["source_row"]) for r in dropped if r["reason"] == "batch_failed")
    assert failed == [("curate", 1), ("generate", 3), ("generate", 4)]
    assert all("failed at" in r["detail"] and r["text"] for r in dropped if r["reason"] == "batch_failed")
    state = scan_run(STORAGE, run)
    assert all(not state.unfinished(stage) for stage in ("generate", "curate", "rewrite", "sft"))
