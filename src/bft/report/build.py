"""A run's quality report, from read to write in one place: load the run's files,
compute every figure, draw the plots, write ``report.json`` and ``report.html``."""

from __future__ import annotations

import datetime
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from bft import __version__
from bft.config import ReportConfig
from bft.report import counts, diversity, embeddings, html, plots
from bft.report.faithfulness import faithfulness
from bft.report.run_data import RunData, check_run_folder, load_run, read_manifest
from bft.storage import Storage, join
from bft.tokenization import count_tokens, load_tokenizer
from bft.writers.cost import cost_line

log = logging.getLogger(__name__)

REPORT_DIR = "report"
HTML_NAME = "report.html"
JSON_NAME = "report.json"


@dataclass
class Report:
    data: dict[str, Any]  # what report.json holds
    html_uri: str
    json_uri: str


def _tokenizer_path(settings: ReportConfig, manifest: dict[str, Any] | None) -> str | None:
    if settings.tokenizer:
        return settings.tokenizer
    generate = ((manifest or {}).get("config") or {}).get("generate") or {}
    return generate.get("tokenizer") or generate.get("model") or None


def _token_counter(settings: ReportConfig, manifest: dict[str, Any] | None) -> tuple[Any, str]:
    """Texts -> token counts with the run's tokenizer, or ``None`` and why not."""
    path = _tokenizer_path(settings, manifest)
    if not path:
        return None, "the run's manifest names no model and report.tokenizer is not set"
    try:
        load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        return None, f"no tokenizer loads from {path!r} here ({type(exc).__name__}); set report.tokenizer"
    return (lambda texts: count_tokens(path, texts) if texts else []), ""


def _lengths(data: RunData) -> tuple[dict[str, Any], dict[str, dict[str, list[int]]]]:
    """Length summaries and the series to plot: documents the models saw (filter output),
    every generated instruction, every rewritten response."""
    series = {
        "characters": {"documents": data.doc_chars, "instructions": data.instruction_chars,
                       "responses": data.response_chars},
        "tokens": {"documents": data.doc_tokens, "instructions": data.instruction_tokens,
                   "responses": data.response_tokens},
    }
    summary = {kind: {unit: counts.distribution(series[unit][kind]) for unit in series}
               for kind in series["characters"]}
    return summary, series


def _examples(sample: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    chosen = random.Random(seed + 1).sample(sample, min(k, len(sample)))
    return [{key: p[key] for key in ("id", "instruction", "score", "response", "url")} for p in chosen]


def build_report(storage: Storage, run_uri: str, settings: ReportConfig | None = None) -> Report:
    """Write ``report.html`` and ``report.json`` for the run at ``run_uri`` to
    ``settings.out_uri`` (default: ``<run>/report/``)."""
    settings = settings or ReportConfig()
    run_uri = run_uri.rstrip("/")
    check_run_folder(storage, run_uri)  # before anything else warns about missing parts
    manifest = read_manifest(storage, run_uri)
    counter, tokens_off = _token_counter(settings, manifest)
    data = load_run(storage, run_uri, manifest, settings.sample_size, settings.seed, counter)

    funnel = counts.funnel(data.tallies, manifest)
    dropped, dropped_by_stage = counts.drops(data.tallies)
    threshold = (((manifest or {}).get("config") or {}).get("curate") or {}).get("threshold")
    lengths, length_series = _lengths(data)
    instructions = [p["instruction"] or "" for p in data.sample]
    responses = [p["response"] or "" for p in data.sample]
    log.info("report: diversity and faithfulness over %d pairs", len(data.sample))
    faith, copied, unsupported = faithfulness(data.sample, settings.worst_examples)
    near = diversity.near_duplicates(instructions, settings.near_duplicate_jaccard, settings.seed)
    embedding = embeddings.embedding_view(instructions, responses, settings.embed_sample_size, settings.seed,
                                          enabled=settings.embed)
    leading = diversity.leading_words(instructions)

    report: dict[str, Any] = {
        "run_id": (manifest or {}).get("run_id") or run_uri.rsplit("/", 1)[-1],
        "run_uri": run_uri,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bft_version": __version__,
        "documents_in": counts.documents_in(data.tallies, manifest),
        "funnel": funnel,
        "dropped": dropped,
        "dropped_by_stage": dropped_by_stage,
        "manifest": counts.manifest_check(manifest, funnel, dropped_by_stage),
        "sample": {"size": len(data.sample), "of": data.final_pairs, "seed": settings.seed},
        "scores": counts.score_summary(data.scores, data.score_doc_chars, data.unparseable_scores,
                                       data.out_of_range_scores, threshold),
        "lengths": lengths,
        "lengths_note": f"Token lengths of instructions and responses left out: {tokens_off}." if tokens_off else "",
        "diversity": {
            "instructions": diversity.unique_trigrams(instructions, settings.seed),
            "responses": diversity.unique_trigrams(responses, settings.seed),
            "leading_words": leading,
            "near_duplicate_instructions": near,
        },
        "faithfulness": faith,
        "embeddings": embedding.summary,
        "examples": _examples(data.sample, settings.examples, settings.seed),
        "throughput": counts.throughput(manifest),
        "engines": (manifest or {}).get("engines"),
        # GPU-seconds per stage and, with cost.gpu_hour_usd, the cost per 1,000 pairs
        "cost": (manifest or {}).get("cost"),
        # What made the pairs: each stage's model and LoRA adapter (path + digest), and
        # the seed pairs added to the dataset (output.seed_mix, not in the measures above).
        "models": (manifest or {}).get("models"),
        "adapters": (manifest or {}).get("adapters") or {},
        "seed_rows": (manifest or {}).get("seed_rows", 0),
    }

    log.info("report: drawing figures")
    figures = {
        "funnel": plots.funnel(report["documents_in"], funnel),
        "drops": plots.drops(dropped_by_stage),
        "scores": plots.scores(report["scores"]),
        "score_vs_length": plots.score_vs_length(data.scores, data.score_doc_chars),
        "lengths": plots.lengths(length_series),
        "leading_words": plots.leading_words(leading["top"]),
        "faithfulness": plots.faithfulness(copied, unsupported),
    }
    if report["throughput"]:
        figures["throughput"] = plots.throughput(report["throughput"])
    if embedding.points:
        figures["embeddings"] = plots.embeddings(embedding.points)
    report["figures"] = sorted(figures)

    out = (settings.out_uri or join(run_uri, REPORT_DIR)).rstrip("/")
    json_uri, html_uri = join(out, JSON_NAME), join(out, HTML_NAME)
    storage.write_bytes(json_uri, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    storage.write_bytes(html_uri, html.render(report, figures).encode())
    return Report(report, html_uri, json_uri)


def key_figures(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    funnel = " -> ".join(f"{stage} {n}" for stage, n in report["funnel"].items())
    scores = report["scores"]
    div = report["diversity"]
    faith = report["faithfulness"]
    lines = [
        f"documents in {report['documents_in']}: {funnel}",
        "dropped: " + (", ".join(f"{k}={v}" for k, v in report["dropped"].items()) or "none"),
        f"scores 1-5: {list(scores['histogram'].values())}  mean {scores['mean']}  "
        f"no readable score {scores['unparseable'] + scores['out_of_range']}/{scores['rated']}",
        f"instructions: {div['instructions']['unique_trigrams_per_1k']} unique trigrams per 1k, "
        f"{div['leading_words']['distinct']} leading words, "
        f"{div['near_duplicate_instructions']['texts_with_a_near_duplicate']} with a near-duplicate",
        f"responses: median copied trigram share {faith['copied_trigram_share'].get('median')}, "
        f"{faith['responses_with_unsupported_tokens']}/{faith['n']} with numbers/names not in the document",
    ]
    if line := cost_line(report.get("cost")):
        lines.append(line)
    emb = report["embeddings"]
    lines.append("embeddings: " + (
        f"mean cosine distance instructions {emb['instructions']['mean_pairwise_cosine_distance']}, "
        f"responses {emb['responses']['mean_pairwise_cosine_distance']}" if emb.get("enabled")
        else f"off ({emb['reason']}); enable: {emb['enable']}"))
    return "\n".join(lines)
