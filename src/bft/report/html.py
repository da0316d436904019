"""The report page: one self-contained HTML file (figures inlined as PNG data URIs, no
scripts, no network). Layout and styles live in ``template.html``."""

from __future__ import annotations

import base64
from html import escape
from importlib import resources
from string import Template
from typing import Any

from bft.writers.cost import cost_line

TEXT_LIMIT = 700  # characters of a document/response shown in a table cell


def _img(figures: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(figures[name]).decode()
    return f'<img alt="{escape(alt)}" data-figure="{name}" src="data:image/png;base64,{data}">'


def _clip(text: Any) -> str:
    text = "" if text is None else str(text)
    return escape(text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + " …")


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{round(value, 3):,g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], text_columns: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i in text_columns:
                cells.append(f'<td class="text">{_clip(value)}</td>')
            elif isinstance(value, (int, float)) or value is None:
                cells.append(f'<td class="num">{_fmt(value)}</td>')
            else:
                cells.append(f"<td>{escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{value}</b><span>{escape(label)}</span></div>' for label, value in items) + "</div>"


def _summary(r: dict[str, Any]) -> str:
    final = r["funnel"].get("sft", 0)
    docs = r["documents_in"]
    div = r["diversity"]
    faith = r["faithfulness"]
    emb = r["embeddings"]
    items = [
        ("documents in", _fmt(docs)),
        ("final pairs" + (f" ({final / docs:.1%} of input)" if docs else ""), _fmt(final)),
        ("mean curation score", _fmt(r["scores"]["mean"])),
        ("ratings without a score", _fmt(r["scores"]["unparseable_share"], percent=True)),
        ("unique trigrams per 1k instructions", _fmt(div["instructions"]["unique_trigrams_per_1k"])),
        ("instructions with a near-duplicate", _fmt(div["near_duplicate_instructions"]["share"], percent=True)),
        ("median share of response copied from document",
         _fmt(faith["copied_trigram_share"].get("median"), percent=True)),
        ("responses with numbers/names not in the document",
         _fmt(faith["responses_with_unsupported_tokens_share"], percent=True)),
    ]
    if emb.get("enabled"):
        items.append(("mean cosine distance, instructions",
                      _fmt(emb.get("instructions", {}).get("mean_pairwise_cosine_distance"))))
    return _cards(items)


def _funnel(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    check = r["manifest"]
    if not check["found"]:
        note = '<p class="note">No manifest in this run folder (unfinished run?): counts are from the files.</p>'
    elif check["counts_agree"] and check["reconciled"]:
        note = "<p>The manifest's counts match the files and reconcile (every input row is in the final set or dropped).</p>"
    else:
        problems = check["differences"] or ["the manifest says its counts do not reconcile"]
        note = '<p class="warn">' + "<br>".join(escape(p) for p in problems) + "</p>"
    rows = [[stage, n, sum(r["dropped_by_stage"].get(stage, {}).values()),
             ", ".join(f"{k} {v}" for k, v in r["dropped_by_stage"].get(stage, {}).items())]
            for stage, n in r["funnel"].items()]
    return ("<h2>Funnel</h2>" + note
            + f'<div class="figures">{_img(figures, "funnel", "documents after each stage")}'
            + f'{_img(figures, "drops", "drops by stage and reason")}</div>'
            + _table(["stage", "rows out", "dropped", "reasons"], rows))


def _scores(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    s = r["scores"]
    text = (f"<p>{_fmt(s['rated'])} pairs rated; mean score {_fmt(s['mean'])}; "
            f"{_fmt(s['unparseable'])} ratings had no readable score ({_fmt(s['unparseable_share'], True)}), "
            f"{_fmt(s['out_of_range'])} a score outside 1–5; kept at ≥ {_fmt(s['threshold'])}: "
            f"{_fmt(s['kept_share'], True)}. Correlation of score with document length: "
            f"{_fmt(s['score_vs_document_chars_pearson'])}.</p>")
    return ("<h2>Curation scores</h2>" + text
            + f'<div class="figures">{_img(figures, "scores", "curation score histogram")}'
            + f'{_img(figures, "score_vs_length", "score vs document length")}</div>')


def _lengths(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    rows = []
    for kind, units in r["lengths"].items():
        for unit, d in units.items():
            rows.append([kind, unit, d.get("n"), d.get("mean"), d.get("p10"), d.get("median"), d.get("p90"), d.get("max")])
    note = r["lengths_note"]
    return ("<h2>Lengths</h2>" + (f'<p class="note">{escape(note)}</p>' if note else "")
            + f'<div class="figures">{_img(figures, "lengths", "length distributions")}</div>'
            + _table(["text", "unit", "n", "mean", "p10", "median", "p90", "max"], rows))


def _diversity(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    d = r["diversity"]
    rows = [[kind, d[kind]["n"], d[kind]["unique_trigrams_per_1k"], d[kind]["distinct_trigram_ratio"]]
            for kind in ("instructions", "responses")]
    near = d["near_duplicate_instructions"]
    lead = d["leading_words"]
    near_rows = [[e["jaccard"], e["a"], e["b"]] for e in near["examples"]]
    return ("<h2>Diversity</h2>"
            + _table(["texts", "n", "unique trigrams per 1k", "distinct / all trigrams"], rows)
            + f"<p>{_fmt(lead['distinct'])} distinct leading words over {_fmt(d['instructions']['n'])} "
              f"instructions. Near-duplicate instructions (character 5-gram Jaccard ≥ {near['threshold']}): "
              f"{_fmt(near['pairs'])} pairs; {_fmt(near['texts_with_a_near_duplicate'])} instructions "
              f"({_fmt(near['share'], True)}) have one.</p>"
            + f'<div class="figures">{_img(figures, "leading_words", "leading words of instructions")}</div>'
            + (_table(["Jaccard", "instruction", "near-duplicate"], near_rows, {1, 2}) if near_rows else ""))


def _faithfulness(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    f = r["faithfulness"]
    share = f["copied_trigram_share"]
    worst = [[w["instruction"], w["response"], ", ".join(w["unsupported"]), w["copied_trigram_share"], w["url"]]
             for w in f["worst"]]
    return ("<h2>Rewrite faithfulness</h2>"
            + f"<p>Over {_fmt(f['n'])} final pairs: median {_fmt(share.get('median'), True)} of a response's word "
              f"trigrams occur in its document (mean {_fmt(share.get('mean'), True)}); "
              f"{_fmt(f['unsupported_tokens_per_response'])} numbers/names per response appear nowhere in the "
              f"document; {_fmt(f['responses_with_unsupported_tokens'])} responses "
              f"({_fmt(f['responses_with_unsupported_tokens_share'], True)}) have at least one.</p>"
            + f'<div class="figures">{_img(figures, "faithfulness", "rewrite faithfulness")}</div>'
            + ("<h3>Least supported rewrites</h3>"
               + _table(["instruction", "response", "not in the document", "copied share", "url"], worst, {0, 1})
               if worst else ""))


def _embeddings(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    e = r["embeddings"]
    if not e.get("enabled"):
        return ("<h2>Embedding view</h2>"
                + f'<p class="note">Off: {escape(e["reason"])}. To turn it on: <code>{escape(e["enable"])}</code>, '
                  "and run <code>bft report</code> again.</p>")
    rows = [[kind, e[kind]["n"], e[kind]["mean_pairwise_cosine_distance"]] for kind in ("instructions", "responses")]
    image = (f'<div class="figures">{_img(figures, "embeddings", "embedding projection")}</div>'
             if "embeddings" in figures else "")
    return ("<h2>Embedding view</h2>" + f"<p>Model: {escape(e['model'])}.</p>"
            + _table(["texts", "n", "mean pairwise cosine distance"], rows) + image)


def _examples(r: dict[str, Any]) -> str:
    rows = [[e["instruction"], e["score"], e["response"], e["url"]] for e in r["examples"]]
    return ("<h2>Examples</h2>" + f"<p>{len(rows)} random final pairs.</p>"
            + _table(["instruction", "score", "rewritten response", "source url"], rows, {0, 2}))


def _throughput(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    if not r["throughput"]:
        return '<h2>Throughput</h2><p class="note">No manifest: throughput unknown.</p>'
    rows = [[stage, t["in"], t["out"], t["wall_s"], t["rows_per_s"], t.get("prompt_tokens"),
             t.get("cached_prompt_tokens"), _fmt(t.get("prefix_cache_hit_share"), percent=True),
             t.get("completion_tokens"), t.get("completion_tokens_per_s")] for stage, t in r["throughput"].items()]
    pools = "; ".join(f"{escape(pool['kind'])}: {escape(' + '.join(pool['stages']))}"
                      for pool in r.get("engines") or [])
    return ("<h2>Throughput</h2>"
            + "<p>Stage wall times overlap: stages stream into each other."
            + (f" Engine pools: {pools}." if pools else "")
            + " Cached prompt tokens were served from vLLM's prefix cache (– where the engine pool does not "
              "report them).</p>"
            + f'<div class="figures">{_img(figures, "throughput", "throughput per stage")}</div>'
            + _table(["stage", "in", "out", "wall s", "rows/s", "prompt tokens", "cached prompt tokens",
                      "prefix cache hits", "completion tokens", "completion tok/s"], rows)
            + (f'<p class="cost">{escape(line)}.</p>' if (line := cost_line(r.get("cost"))) else ""))


def _models(r: dict[str, Any]) -> str:
    if not r.get("models"):
        return ""
    rows = []
    for stage, model in r["models"].items():
        adapter = r["adapters"].get(stage)
        rows.append([stage, model, f"{adapter['uri']} (sha256 {adapter['sha256'][:16]}…, "
                                   f"{adapter.get('direction') or 'LoRA'})" if adapter else "none: the base model"])
    seed = (f" The dataset also holds {r['seed_rows']:,} seed pairs (<code>output.seed_mix</code>, "
            f"<code>origin: seed</code>), not measured here." if r.get("seed_rows") else "")
    return ("<h2>Models</h2>" + f"<p>Which model and LoRA adapter made each stage's outputs.{seed}</p>"
            + _table(["stage", "model", "adapter"], rows))


def render(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    template = Template(resources.files("bft.report").joinpath("template.html").read_text(encoding="utf-8"))
    body = "".join([_summary(report), _funnel(report, figures), _scores(report, figures),
                    _lengths(report, figures), _diversity(report, figures), _faithfulness(report, figures),
                    _embeddings(report, figures), _examples(report), _throughput(report, figures),
                    _models(report)])
    sample = report["sample"]
    meta = (f"{escape(report['run_uri'])} · generated {escape(report['generated_at'])} by bft "
            f"{escape(report['bft_version'])} · text measures over {sample['size']:,} of {sample['of']:,} "
            f"final pairs (seed {sample['seed']})")
    return template.substitute(title=escape(f"bft quality report: {report['run_id']}"), meta=meta, body=body)
