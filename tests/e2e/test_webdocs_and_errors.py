"""Real web-crawl samples (Dolma and FineWeb layouts) and the fail-fast error paths."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, engine_settings, run_bft
from .report_checks import check_page_renders, check_report_against_files

WEBDOCS = ROOT.parent / "shared" / "webdocs"


needs_webdocs = pytest.mark.skipif(not WEBDOCS.exists(), reason="../shared/webdocs not present")


# Documents up to 1,000 characters only: about 50 of the 300 reach the models, which keeps
# this run's model work (not what it tests) short.
MAX_CHARS = 1000


@pytest.fixture(scope="module")
def webdocs_run(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("webdocs")
    result = run_bft("run", "examples/quickstart.yaml", "--run-id", "web", "--report",
                     "--set", f"input.uri={WEBDOCS}", "--set", f"output.uri={out}",
                     "--set", f"filters.max_chars={MAX_CHARS}", *engine_settings(tiny_model))
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "web", result


@needs_webdocs
def test_webdocs_dolma_and_fineweb(webdocs_run):
    run, result = webdocs_run
    manifest = json.loads(Path(result.manifest_uri).read_text())
    stages = manifest["stages"]
    assert manifest["reconciled"] is True
    assert manifest["input_files"] == 2
    assert stages["read"]["in"] == stages["read"]["out"] == 600  # 300 docs, in both layouts
    # The two files hold the same documents: every document that survives the text
    # filters in one file is a duplicate of its copy in the other.
    assert stages["filter"]["dropped_by_reason"]["duplicate"] == stages["filter"]["out"]
    filtered = pq.read_table(run / "filtered")
    assert filtered.num_rows == stages["filter"]["out"]
    assert all(u.startswith("http") for u in filtered.column("url").to_pylist())
    assert all(600 <= n <= MAX_CHARS for n in filtered.column("n_chars").to_pylist())
    sft = pq.read_table(run / "sft")
    assert sft.num_rows == manifest["final_rows"] > 0


@needs_webdocs
def test_webdocs_report_matches_the_files_and_renders(webdocs_run, tmp_path):
    run, result = webdocs_run
    assert f"report:   {run}/report/report.html" in result.stdout
    report = json.loads((run / "report" / "report.json").read_text())
    check_report_against_files(report, fsspec.filesystem("file"), str(run))
    assert report["documents_in"] == 600 and report["dropped"]["duplicate"] >= 1
    check_page_renders(run / "report" / "report.html", report, tmp_path / "webdocs-report.png")


@needs_webdocs
def test_report_command_on_a_finished_run(webdocs_run, tmp_path):
    run, _ = webdocs_run
    first = json.loads((run / "report" / "report.json").read_text())
    again = run_bft("report", str(run), "--out", str(tmp_path / "again"), "--no-embed",
                    "--set", "report.sample_size=20", "--set", "report.examples=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"report:   {tmp_path / 'again' / 'report.html'}" in again.stdout
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["funnel"] == first["funnel"] and report["scores"] == first["scores"]
    assert report["sample"] == {"size": min(20, first["funnel"]["rewrite"]), "of": first["funnel"]["rewrite"],
                                "seed": 0}
    assert len(report["examples"]) == 4 and report["embeddings"]["enabled"] is False
    assert "Off: turned off" in (tmp_path / "again" / "report.html").read_text()


def test_report_command_errors_name_the_problem(tmp_path):
    missing = run_bft("report", str(tmp_path / "no-such-run"))
    assert missing.returncode == 2 and f"{tmp_path / 'no-such-run'}: no run there" in missing.stderr
    bad = run_bft("report", str(tmp_path), "--set", "report.sample_size=-1")
    assert bad.returncode == 2 and "report.sample_size" in bad.stderr


def test_wrong_text_column_fails_fast_naming_column_and_file(tmp_path, tiny_model):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": 1, "body": "x" * 800}) + "\n")
    started = time.time()
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"input.uri={docs}",
                     "--set", f"output.uri={tmp_path / 'out'}", f"--set=model={tiny_model}")
    assert result.returncode == 2
    assert "'text'" in result.stderr and str(docs) in result.stderr and "input.text_column" in result.stderr
    assert "Started a local Ray instance" not in result.stderr  # failed before Ray started
    assert time.time() - started < 60


def test_invalid_config_fails_before_ray(tmp_path, tiny_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_model}\ncurate:\n  threshold: 9\nfilters:\n  min_charz: 3\n")
    result = run_bft("run", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "curate.threshold" in result.stderr and "filters.min_charz" in result.stderr
    assert "Ray" not in result.stderr


def test_missing_input_names_uri(tmp_path, tiny_model):
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"input.uri={tmp_path / 'nothing-here'}",
                     "--set", f"output.uri={tmp_path / 'out'}", f"--set=model={tiny_model}")
    assert result.returncode == 2 and "nothing-here: no input files found" in result.stderr


def test_missing_model_fails_before_ray_naming_the_field(tmp_path, tiny_model):
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"output.uri={tmp_path / 'out'}",
                     "--set", f"model={tiny_model}", "--set", "rewrite.model=/nonexistent/model")
    assert result.returncode == 2
    assert "rewrite.model: cannot load a tokenizer from '/nonexistent/model'" in result.stderr
    assert "Started a local Ray instance" not in result.stderr
