"""Faults, for real: hostile input, and one dated run interrupted twice and resumed twice,
in the default engine layout (one shared pool for generate, curate and rewrite); the
uninterrupted baseline it must end like ran with a pool per stage.

1. The driver is SIGKILLed once the first documents are filtered (the engines are still
   starting). Then a file holding a copy of a filtered document arrives in the input
   prefix, with one more past ``input.max_files``.
2. The same command resumes it with ``ray.engine_batch_retries=0`` and
   ``ray.max_failed_batches=0``; as the engine replica writes its first curate batch (whose
   rows go on to rewrite), it is SIGKILLed: its batches fail with no retry left, one failed
   batch more than tolerated, so the run stops with a clear error.
3. The same command again resumes it through an S3 endpoint that throttles, errors
   (some writes five times in a row) and drops connections, and the engine replica is
   SIGKILLed as it writes its first curate batch: Ray Data replaces it and retries its
   batches, which read back what they had written and go on from there. It must end with
   the baseline's result.

After each interruption the run folder is read with pyarrow (run_files.py), and what the
next attempt says it found and re-did is checked against those counts.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest

from .conftest import (ENGINE_ACTOR, S3_SECRET, BftProcess, EngineWatch, engine_settings, logged_at, run_bft,
                       shared_wrote)
from .run_files import RunFiles
from .s3_fault_proxy import S3FaultProxy
from .s3_runs import (BUCKET, COPY_ID, ORIGINAL_ID, RESUME_DATE, command, drop_records, env_for, names,
                      original_filtered, runs_folder, started_run)

RESUMING = re.compile(r"resuming (\S+): finished before: (.*?); (\d+) of (\d+) input file\(s\) to read again; "
                      r"rows entering at (.*)$", re.MULTILINE)


def _pairs(text: str) -> dict[str, int]:
    return {name: int(n) for name, n in (part.rsplit(" ", 1) for part in text.split(", "))}


def resume_logged(output: str) -> dict:
    """The resume block an attempt logged when it started."""
    match = RESUMING.search(output)
    assert match, "the attempt did not log that it resumed"
    return {"finished_before": _pairs(match.group(2)), "input_files_read_again": int(match.group(3)),
            "rows_entering_at": _pairs(match.group(5))}


def check_same_result(files: RunFiles, baseline) -> None:
    """The final rows and every drop record of the uninterrupted run, by where each row
    came from (a date's files hold the same rows under another prefix)."""
    assert sorted(r["id"] for r in files.kept["sft"]) == sorted(r["id"] for r in baseline.files.kept["sft"])
    assert sorted(names(files.kept["sft"])) == baseline.final_keys
    assert sorted(drop_records(files)) == baseline.drop_records


@pytest.fixture(scope="module")
def interrupted_twice(s3_corpus, s3_baseline, s3_config, s3_server, tiny_model, tmp_path_factory):
    fs, corpus = s3_corpus
    inputs = corpus.inputs(RESUME_DATE)
    # One sequence at a time: an engine killed as it gets its first batch still holds it.
    cmd = command(s3_config, RESUME_DATE, tiny_model,
                  *(f"--set={stage}.engine_kwargs.max_num_seqs=1" for stage in ("generate", "curate", "rewrite")))
    logs = tmp_path_factory.mktemp("interrupted")

    # 1. SIGKILL the driver once the original of the duplicate pair is filtered.
    first = BftProcess(cmd, env_for(s3_server, s3_server.endpoint))
    first.wait_until(lambda: original_filtered(fs, RESUME_DATE), f"{ORIGINAL_ID} in filtered/")
    run_id = started_run(fs, RESUME_DATE)
    run = f"{runs_folder(RESUME_DATE)}/{run_id}"
    # Issue 18: `bft status` of the S3 run while its driver works, and once it is dead
    status = ("status", f"s3://{run}", "--json", "--config", str(s3_config))
    during = run_bft(*status, env=env_for(s3_server, s3_server.endpoint))
    first.kill()
    killed = run_bft(*status, env=env_for(s3_server, s3_server.endpoint))
    time.sleep(1)  # let the S3 server finish writes that were in flight
    after_kill = RunFiles(fs, run)
    (logs / "attempt-1.log").write_text(first.output)
    corpus.arrive_late(fs)

    # 2. Resume, tolerating no failed batch; kill the engine as its first rows go on to rewrite.
    kill = EngineWatch(trigger=shared_wrote("curate"))
    second = BftProcess([*cmd, "--set", "ray.engine_batch_retries=0", "--set", "ray.max_failed_batches=0"],
                        env_for(s3_server, s3_server.endpoint), on_line=[kill])
    second_status = second.wait()
    time.sleep(1)
    after_failure = RunFiles(fs, run)
    (logs / "attempt-2.log").write_text(second.output)

    # 3. Resume through a faulty S3 endpoint; the engine killed (and replaced) with batches
    # half done: one has written its curate files and its rows are at rewrite.
    replaced = EngineWatch(trigger=shared_wrote("curate"))
    # the first writes of rewritten/ and sft/ files each get five 500s in a row
    with S3FaultProxy(s3_server.endpoint, fault_rate=0.1, seed=11, bursts=2,
                      burst_on=("/rewritten/", "/sft/")) as proxy:
        third = BftProcess(cmd, env_for(s3_server, proxy.endpoint), on_line=[replaced])
        third_status = third.wait(watch=lambda: replaced.children)
        faults = {"counts": dict(proxy.counts), "recovered": dict(proxy.recovered), "unrecovered": proxy.unrecovered}
    (logs / "attempt-3.log").write_text(third.output)
    return {"run_id": run_id, "run": run, "inputs": inputs, "after_kill": after_kill, "first": first,
            "status_during": during, "status_killed": killed, "late": set(corpus.late),
            "second": second, "second_status": second_status, "engine_killed": kill, "after_failure": after_failure,
            "third": third, "third_status": third_status, "replaced": replaced, "faults": faults,
            "final": RunFiles(fs, run)}


def test_hostile_input_every_bad_row_dropped_with_its_reason(s3_corpus, s3_baseline):
    _, corpus = s3_corpus
    hostile = corpus.hostile
    files = s3_baseline.files
    read_drops: dict[str, Counter] = {}
    for name, _, _, stage, reason in drop_records(files):
        if stage == "read":
            read_drops.setdefault(name, Counter())[reason] += 1
    for path in hostile.files:
        got = read_drops.get(path.name, Counter())
        if path.name in hostile.all_dropped_as:
            assert set(got) <= hostile.all_dropped_as[path.name]
            assert sum(got.values()) == hostile.read_drops[path.name]["*"], path.name
        else:
            assert got == hostile.read_drops[path.name], path.name
    # the 10 MB document was dropped at read (input.max_document_chars), a preview of its text kept
    huge = [r for r in files.dropped if r["id"] == hostile.huge_id]
    assert [(r["stage"], r["reason"]) for r in huge] == [("read", "too_large")]
    assert len(huge[0]["text"]) == 10_000
    # every good document got past the reader
    past_read = {r["id"] for r in files.kept["sft"]} | {r["id"] for r in files.dropped if r["stage"] != "read"}
    assert hostile.good_ids <= past_read
    unreadable = [r for r in files.dropped if r["reason"] in ("unreadable_file", "wrong_schema")]
    assert unreadable and all(f"s3://{BUCKET}/crawl/" in r["source"] and r["source"] in r["detail"]
                              for r in unreadable)


def test_driver_killed_then_resumed_picks_up_exactly_what_was_left(interrupted_twice):
    t = interrupted_twice
    after_kill = t["after_kill"]
    # killed after real work, before any engine answered: not a fresh start
    assert after_kill.manifest is None and after_kill.kept["filter"] and not after_kill.kept["generate"]
    assert ORIGINAL_ID in {r["id"] for r in after_kill.kept["filter"]}
    # what the second attempt says it found is what the files held at the kill
    assert resume_logged(t["second"].output) == after_kill.expected_resume(t["inputs"])
    assert f"run {t['run_id']} started earlier and did not finish; resuming it" in t["second"].output


def test_too_many_failed_batches_stop_the_run_with_a_clear_error(interrupted_twice):
    t = interrupted_twice
    output = t["second"].output
    assert t["engine_killed"].pid, "no curate batch was ever written"
    assert t["second_status"] == 1, output[-3000:]
    assert f"bft: error: run s3://{t['run']} stopped: " in output
    assert "ray.max_failed_batches=0" in output and "Traceback" not in output.split("bft: error:")[-1]
    after = t["after_failure"]
    # the killed batch was not retried, and not written: its rows wait at rewrite
    assert after.manifest is None and after.expected_resume(t["inputs"])["rows_entering_at"]["rewrite"] > 0
    # the resumed run's duplicate was caught against a document kept by the killed attempt
    dup = [r for r in after.dropped if r["id"] == COPY_ID]
    assert [(r["stage"], r["reason"]) for r in dup] == [("filter", "duplicate")] and ORIGINAL_ID in dup[0]["detail"]


def test_second_resume_rejoins_rows_at_every_stage_they_had_reached(interrupted_twice):
    t = interrupted_twice
    final, after = t["final"], t["after_failure"]
    expected = after.expected_resume(t["inputs"])
    assert final.manifest["resume"] == expected, {uri: (after.stats.get(uri), after.done_at_read_or_filter(uri),
                                                        after.input_done(uri)) for uri in t["inputs"]}
    # rows that had reached rewrite (the killed batch) came back in there, not from the start
    assert expected["rows_entering_at"]["rewrite"] > 0, expected
    # each input file read again skipped exactly the rows already done
    read_again = {s for s in final.stats if final.stats[s] != after.stats.get(s)}
    assert len(read_again) == expected["input_files_read_again"]
    for source in read_again:
        assert final.stats[source]["rows_already_done"] == after.done_at_read_or_filter(source), source
    assert final.manifest["rows_read_again"] == sum(after.done_at_read_or_filter(s) for s in read_again)


def test_interrupted_run_ends_as_if_it_had_not_been(interrupted_twice, s3_baseline, s3_corpus):
    fs, _ = s3_corpus
    t = interrupted_twice
    final = t["final"]
    assert t["third_status"] == 0, t["third"].output[-5000:]
    final.check_complete()
    final.check_nothing_lost()
    final.check_dedup()
    check_same_result(final, s3_baseline)
    runs = runs_folder(RESUME_DATE)
    assert json.loads(fs.cat(f"{runs}/_completed/{RESUME_DATE}.json"))["run_id"] == t["run_id"]
    # one run for the date: no attempt started a second one
    assert sorted(fs.ls(runs, refresh=True)) == sorted(f"{runs}/{n}" for n in ("_completed", "_started", t["run_id"]))
    assert S3_SECRET not in t["first"].output + t["second"].output + t["third"].output


def test_status_of_the_s3_run_while_it_runs_and_once_its_driver_is_killed(interrupted_twice):
    during, killed = interrupted_twice["status_during"], interrupted_twice["status_killed"]
    assert during.returncode == 3, during.stdout + during.stderr
    now = json.loads(during.stdout)
    assert now["state"] == "running" and now["stages"]["filter"]["out"] >= 1  # the original was filtered
    # the files there when it started: one of the run's inputs lands only after this attempt
    landed = [f for f in interrupted_twice["inputs"] if f.rsplit("/", 1)[-1] not in interrupted_twice["late"]]
    assert now["input_files"]["total"] == len(landed) and now["elapsed_s"] > 0
    assert killed.returncode == 1 and json.loads(killed.stdout)["state"] == "stopped", killed.stdout


def test_killed_engine_is_replaced_and_leaves_no_orphan(interrupted_twice):
    t = interrupted_twice
    kill, third = t["replaced"], t["third"]
    assert kill.pid, "no engine was seen working, so none was killed"
    # Nothing of it outlived it (a vLLM engine process would hold a GPU's memory): with
    # VLLM_ENABLE_V1_MULTIPROCESSING=0, the quickstart's setting, its engine ran inside it.
    assert not third.orphans, (kill.children, third.orphans)
    assert not [c for c in kill.child_commands if "EngineCore" in c], kill.child_commands
    after = third.lines[kill.at_line + 1:]
    # Ray saw the actor die with work in hand, started another, and the batch was retried there
    assert any("A worker died or was killed while executing a task" in line for line in after)
    new_engines = {int(m.group(1)) for line in after if (m := ENGINE_ACTOR.search(line))} - \
        {int(m.group(1)) for line in third.lines[:kill.at_line + 1] if (m := ENGINE_ACTOR.search(line))}
    assert new_engines, "no new engine actor started after the kill"
    # the killed replica's batch ran again on the new one, from the curate files it had written
    assert [line for line in after if "batch run again: generate, curate already written" in line
            or "batch run again: curate already written" in line]
    ran_on = [line for line in after if f"pid={kill.pid})" in line and (logged_at(line) or 0) > kill.at_time + 0.5]
    assert not ran_on, f"the killed engine ran on: {ran_on[:3]}"


def test_s3_faults_of_every_kind_were_retried(interrupted_twice):
    faults = interrupted_twice["faults"]
    counts, recovered = faults["counts"], faults["recovered"]
    for kind in ("throttle", "server_error", "drop"):
        assert counts.get(kind, 0) >= 1 and recovered.get(kind, 0) >= 1, faults
    # writes answered with five 500s in a row: beyond botocore's default of 5 attempts
    assert counts.get("burst", 0) == 2 and recovered["server_error"] >= 2, faults
    assert not faults["unrecovered"], faults


@pytest.mark.parametrize("settings, locked, message", [
    (["input.uri=s3://{bucket}/locked-input/", "output.uri=s3://{bucket}/open-runs"], "/{bucket}/locked-input",
     "s3://{bucket}/locked-input/: cannot list it: access denied"),
    (["input.uri=s3://{bucket}/locked-input/", "output.uri=s3://{bucket}/locked-runs"], "/{bucket}/locked-runs",
     "s3://{bucket}/locked-runs: cannot write there: access denied"),
])
def test_access_denied_fails_fast_naming_uri_and_cause(s3_corpus, s3_config, s3_server, tiny_model,
                                                      settings, locked, message):
    """Permanent errors are not retried into a hang: the run stops before Ray starts."""
    fs, _ = s3_corpus
    fs.pipe(f"{BUCKET}/locked-input/a.jsonl", b'{"text": "x"}\n')
    overrides = [arg for setting in settings for arg in ("--set", setting.format(bucket=BUCKET))]
    with S3FaultProxy(s3_server.endpoint, fault_rate=0, deny=locked.format(bucket=BUCKET)) as proxy:
        result = run_bft("run", str(s3_config), "--run-id", "denied", *engine_settings(tiny_model), *overrides,
                         env=env_for(s3_server, proxy.endpoint))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message.format(bucket=BUCKET) in result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr
    assert S3_SECRET not in result.stderr + result.stdout
