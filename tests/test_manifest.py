"""The manifest is computed from written files; a lost file must show as unreconciled."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from bft.config import StorageConfig
from bft.steps.read import stats_uri
from bft.storage import Storage
from bft.writers.manifest import batch_failures, build_manifest
from bft.writers.parquet import StageWriter

STORAGE = Storage(StorageConfig())


def doc(i: int, **extra) -> dict:
    return {"id": f"d{i}", "url": f"https://x/{i}", "source": "in.jsonl", "source_row": i,
            "text": f"text {i}", **extra}


def fake_run(run_uri: str) -> StageWriter:
    """10 rows read (1 malformed), 9 filtered to 6, 6 generated, 2 curated out, 2 rewritten."""
    writer = StageWriter(STORAGE, run_uri)
    STORAGE.write_bytes(stats_uri(run_uri, "in.jsonl"), json.dumps(
        {"source": "in.jsonl", "rows_seen": 10, "rows_ok": 9, "rows_dropped": 1,
         "started_at": 100.0, "finished_at": 101.0}).encode())
    writer.write("read", [], [doc(99, reason="malformed_json", detail="x")], 100.0)
    writer.write("filter", [doc(i, n_chars=6, n_tokens=2) for i in range(6)],
                 [doc(i, reason="too_short", detail="x") for i in range(6, 9)], 101.0)
    gen = [doc(i, instruction="q", generate_prompt_tokens=10, generate_completion_tokens=3) for i in range(6)]
    writer.write("generate", gen[:3], [], 102.0)
    writer.write("generate", gen[3:], [], 102.5)
    cur = [dict(r, score=5, curate_prompt_tokens=20, curate_completion_tokens=4) for r in gen[:2]]
    writer.write("curate", cur, [dict(r, reason="below_threshold", detail="x", prompt_tokens=20,
                                      completion_tokens=4, score=2) for r in gen[2:]], 103.0)
    rew = [dict(r, response="a", rewrite_prompt_tokens=30, rewrite_completion_tokens=5) for r in cur]
    writer.write("rewrite", rew, [], 104.0)
    writer.write("sft", [dict(r, messages=[{"role": "user", "content": "q"}]) for r in rew], [], 105.0)
    return writer


def test_counts_tokens_and_reconciliation(tmp_path):
    run_uri = str(tmp_path / "run")
    fake_run(run_uri)
    manifest = build_manifest(STORAGE, run_uri, run_id="run", config={}, started_at=99.0)
    stages = manifest["stages"]
    assert manifest["reconciled"] is True, manifest["reconciliation_problems"]
    assert [stages[s]["in"] for s in stages] == [10, 9, 6, 6, 2, 2]
    assert [stages[s]["out"] for s in stages] == [9, 6, 6, 2, 2, 2]
    assert stages["read"]["dropped_by_reason"] == {"malformed_json": 1}
    assert stages["curate"]["dropped_by_reason"] == {"below_threshold": 4}
    assert stages["generate"]["prompt_tokens"] == 60 and stages["generate"]["completion_tokens"] == 18
    # curate's tokens include the rows it dropped: the engine spent them too
    assert stages["curate"]["prompt_tokens"] == 6 * 20
    assert stages["generate"]["wall_s"] > 0
    assert manifest["dropped_by_reason"] == {"below_threshold": 4, "malformed_json": 1, "too_short": 3}


def test_a_lost_file_breaks_reconciliation(tmp_path):
    run_uri = tmp_path / "run"
    fake_run(str(run_uri))
    victim = sorted((run_uri / "generated").iterdir())[0]
    victim.unlink()
    manifest = build_manifest(STORAGE, str(run_uri), run_id="run", config={}, started_at=0.0)
    assert manifest["reconciled"] is False
    assert any(p.startswith("generate:") for p in manifest["reconciliation_problems"])


def test_restart_from_another_run_starts_at_that_stage(tmp_path):
    run_uri = tmp_path / "run"
    fake_run(str(run_uri))
    for folder in ("filtered", "generated", "_stats"):
        for f in (run_uri / folder).rglob("*"):
            if f.is_file():
                f.unlink()
    for f in (run_uri / "dropped").iterdir():
        if not f.name.startswith("curate-"):
            f.unlink()
    manifest = build_manifest(STORAGE, str(run_uri), run_id="run", config={}, started_at=0.0,
                              start_stage="curate", first_stage_input=6)
    assert list(manifest["stages"]) == ["curate", "rewrite", "sft"]
    assert manifest["reconciled"] is True


def test_retried_batch_overwrites_instead_of_duplicating(tmp_path):
    run_uri = tmp_path / "run"
    writer = StageWriter(STORAGE, str(run_uri))
    rows = [doc(i, n_chars=1, n_tokens=1) for i in range(3)]
    writer.write("filter", rows, [], 1.0)
    writer.write("filter", [dict(r) for r in rows], [], 2.0)
    assert len(list((run_uri / "filtered").iterdir())) == 1
    assert not list((run_uri / "filtered").glob("*.tmp-*"))


def test_cached_prompt_tokens_are_summed_only_when_every_answered_row_has_them(tmp_path):
    def rewrite_stage(run_uri: str, *cached: int | None) -> dict:
        writer = StageWriter(STORAGE, run_uri)
        writer.write("rewrite", [doc(i, response="a", rewrite_prompt_tokens=30, rewrite_cached_tokens=c)
                                 for i, c in enumerate(cached)],
                     [doc(8, reason="empty_output", detail="x", prompt_tokens=30, cached_tokens=20),
                      # dropped without an engine reply (its batch failed): no tokens, not a gap
                      doc(9, reason="batch_failed", detail="x")], 1.0)
        return build_manifest(STORAGE, run_uri, run_id="r", config={}, started_at=0.0)["stages"]["rewrite"]

    # kept and dropped rows count
    assert rewrite_stage(str(tmp_path / "a"), 12, 12)["cached_prompt_tokens"] == 12 + 12 + 20
    # one answered row that does not say (a ray.data.llm pool's): no partial sum passed off as whole
    assert rewrite_stage(str(tmp_path / "b"), 12, None)["cached_prompt_tokens"] is None
    # fake_run's rows say nothing of the prefix cache
    fake_run(str(tmp_path / "c"))
    stages = build_manifest(STORAGE, str(tmp_path / "c"), run_id="c", config={}, started_at=0.0)["stages"]
    assert stages["generate"]["cached_prompt_tokens"] is None


def test_a_batch_run_again_with_another_split_replaces_both_its_files(tmp_path):
    run_uri = tmp_path / "run"
    writer = StageWriter(STORAGE, str(run_uri))
    rows = [doc(i, instruction="q", generate_prompt_tokens=1) for i in range(3)]
    writer.write("generate", rows[:2], [dict(rows[2], reason="instruction_too_short", detail="x")], 1.0)
    writer.write("generate", rows, [], 2.0, replace=True)  # the rerun keeps all three
    kept = pq.read_table(run_uri / "generated").column("id").to_pylist()
    assert sorted(kept) == ["d0", "d1", "d2"] and not list((run_uri / "dropped").glob("generate-*"))


def test_rows_with_the_same_ids_and_texts_from_two_sources_are_both_kept_once(tmp_path):
    """Issue 17: files were named from (stage, id, text), so the second batch overwrote the first."""
    run_uri = str(tmp_path / "run")
    writer = StageWriter(STORAGE, run_uri)
    first = [doc(i, n_chars=6, n_tokens=2) for i in range(3)]
    second = [dict(row, source="other-shard.jsonl") for row in first]  # same ids, same texts
    writer.write("filter", first, [], 1.0)
    writer.write("filter", second, [], 1.0)
    kept = pq.read_table(tmp_path / "run" / "filtered").to_pylist()
    assert sorted((r["source"], r["id"]) for r in kept) == sorted(
        (r["source"], r["id"]) for r in first + second)


def test_a_filter_batch_run_again_with_another_split_leaves_each_row_once(tmp_path):
    run_uri = tmp_path / "run"
    writer = StageWriter(STORAGE, str(run_uri))
    rows = [doc(i, n_chars=6, n_tokens=2) for i in range(4)]
    writer.write("filter", rows[:3], [dict(rows[3], reason="near_duplicate", detail="x")], 1.0)
    # re-executed (lineage after a node loss): its near-duplicate now kept, another one dropped
    writer.write("filter", [rows[0], rows[1], rows[3]], [dict(rows[2], reason="duplicate", detail="x")], 2.0)
    kept = pq.read_table(run_uri / "filtered").column("id").to_pylist()
    dropped = pq.read_table(run_uri / "dropped").column("id").to_pylist()
    assert sorted(kept + dropped) == ["d0", "d1", "d2", "d3"] and dropped == ["d2"]
    # and again with nothing dropped: the earlier drop file goes too
    writer.write("filter", rows, [], 3.0)
    assert sorted(pq.read_table(run_uri / "filtered").column("id").to_pylist()) == ["d0", "d1", "d2", "d3"]
    assert not list((run_uri / "dropped").glob("*.parquet"))


def test_a_stage_losing_more_than_the_failed_share_fails_the_run():
    def stages(lost: int, of: int) -> dict:
        return {"generate": {"in": of, "dropped_by_reason": {"batch_failed": lost} if lost else {}}}

    assert batch_failures(stages(0, 100), 0.1, None)["failed"] == []
    assert batch_failures(stages(10, 100), 0.1, None)["failed"] == []  # at the share: tolerated
    assert batch_failures(stages(11, 100), 0.1, "E: x")["failed"] == ["generate"]
    assert batch_failures(stages(5, 5), 1.0, None)["failed"] == ["generate"]  # every row lost fails always
    assert batch_failures(stages(11, 100), 0.1, "E: x")["stages"]["generate"] == {"rows": 11, "of": 100,
                                                                                    "share": 0.11}


def test_the_error_shown_for_a_failed_batch_is_the_innermost_one(tmp_path):
    from bft.engines.vllm_engine import EngineStopped
    from bft.writers.failures import error_line, first_error, read_failures, record_failure

    try:
        try:
            raise RuntimeError("CPU Generator does not use offset\nmore detail")
        except RuntimeError as inner:
            raise EngineStopped(f"the engine stopped: {inner!r}") from inner
    except EngineStopped as exc:
        assert error_line(exc) == "RuntimeError: CPU Generator does not use offset"
    run_uri = str(tmp_path / "run")
    record_failure(STORAGE, run_uri, "MapBatches(SharedEngine)", "ActorDiedError: The actor died", "ray")
    record_failure(STORAGE, run_uri, "generate", "RuntimeError: boom", "engine")
    # the engine's own line wins over Ray's account of the replica dying
    assert first_error(read_failures(STORAGE, run_uri)) == "RuntimeError: boom"
