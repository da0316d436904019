"""Real web-crawl samples (Dolma and FineWeb layouts) and the fail-fast error paths."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, engine_settings, run_bft

WEBDOCS = ROOT.parent / "shared" / "webdocs"


@pytest.mark.skipif(not WEBDOCS.exists(), reason="../shared/webdocs not present")
def test_webdocs_dolma_and_fineweb(tmp_path, tiny_model):
    result = run_bft("run", "examples/quickstart.yaml", "--run-id", "web",
                     "--set", f"input.uri={WEBDOCS}", "--set", f"output.uri={tmp_path}",
                     *engine_settings(tiny_model))
    assert result.returncode == 0, result.stderr[-5000:]
    manifest = json.loads(Path(result.manifest_uri).read_text())
    stages = manifest["stages"]
    assert manifest["reconciled"] is True
    assert manifest["input_files"] == 2
    assert stages["read"]["in"] == stages["read"]["out"] == 600  # 300 docs, in both layouts
    # The two files hold the same documents: every document that survives the text
    # filters in one file is a duplicate of its copy in the other.
    assert stages["filter"]["dropped_by_reason"]["duplicate"] == stages["filter"]["out"]
    filtered = pq.read_table(tmp_path / "web" / "filtered")
    assert filtered.num_rows == stages["filter"]["out"]
    assert all(u.startswith("http") for u in filtered.column("url").to_pylist())
    assert all(600 <= n <= 3000 for n in filtered.column("n_chars").to_pylist())
    sft = pq.read_table(tmp_path / "web" / "sft")
    assert sft.num_rows == manifest["final_rows"] > 0


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
