from __future__ import annotations

import pytest

from bft.config import FilterConfig
from bft.filters import quality
from bft.filters.dedup import normalize, text_hash
from bft.filters.length import check_length
from bft.filters.quality import check_quality

CFG = FilterConfig()
PROSE = ("Repotting a plant is easiest in spring, when new growth helps it recover. Choose a pot "
         "slightly wider than the old one and make sure it drains. Water the day before, ease the "
         "plant out, loosen circling roots and set it at the same depth in fresh compost. Keep it "
         "out of direct sun for a week while it settles, and wait before feeding it again, because "
         "fresh compost already holds enough nutrients for the first month or two.")


def test_length_bounds():
    assert check_length("x" * 600, CFG) is None and check_length("x" * 3000, CFG) is None
    assert check_length("x" * 599, CFG).reason == "too_short"
    assert check_length("x" * 3001, CFG).reason == "too_long"


def test_clean_prose_passes():
    assert check_quality(PROSE, CFG) is None


def test_repeated_lines():
    text = "\n".join(["Cheap loans approved in minutes, apply online today."] * 6 + [PROSE[:200]])
    assert quality.duplicate_line_fraction(text) > 0.5
    assert check_quality(text, CFG).reason == "repeated_lines"


def test_repeated_ngrams_without_repeated_lines():
    text = " ".join(f"best cheap flights to city number {i} book now" for i in range(30))
    assert quality.duplicate_line_fraction(text) == 0
    assert check_quality(text, CFG).reason == "repeated_ngrams"


def test_uppercase():
    assert check_quality(PROSE.upper(), CFG).reason == "uppercase"


def test_navigation_page_is_boilerplate():
    text = "\n".join(["Home", "About", "Shop", "Blog", "Careers", "Press", "Contact us",
                      "Sign in to your account to see your orders and saved items"])
    assert check_quality(text, CFG).reason == "boilerplate"


def test_boilerplate_phrases():
    text = PROSE + " Accept cookie settings. Privacy policy. Terms of use. All rights reserved. Sign in."
    assert check_quality(text, CFG).reason == "boilerplate"


def test_thresholds_are_configurable():
    text = "\n".join(["Same line here.", "Same line here.", PROSE])
    assert check_quality(text, CFG) is None
    assert check_quality(text, FilterConfig(max_duplicate_line_fraction=0.01)).reason == "repeated_lines"


def test_dedup_normalization():
    assert normalize("  Hello\n\tWORLD  ") == "hello world"
    assert normalize("ﬁne") == "fine"  # NFKC ligature
    assert text_hash("A  b\nC") == text_hash("a b c")
    assert text_hash("a b c") != text_hash("a b d")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_dedup_actors_keep_first_copy_across_batches(ray_local):
    from bft.filters.dedup import Deduplicator

    dedup = Deduplicator.start(3)
    docs = [{"id": f"d{i}", "source": "f", "source_row": i, "text": f"text {i % 4}"} for i in range(10)]
    first = dedup.duplicates_of(docs[:5])
    second = dedup.duplicates_of(docs[5:])
    assert first == [None, None, None, None, "d0"]
    assert second == ["d1", "d2", "d3", "d0", "d1"]
    # A retried batch (same occurrences) gets the same answer, not "duplicate of itself".
    assert dedup.duplicates_of(docs[:5]) == first
    # Same id in another place is still a duplicate.
    assert dedup.duplicates_of([{"id": "d0", "source": "g", "source_row": 1, "text": "TEXT 0"}]) == ["d0"]
    dedup.stop()


def test_token_budget_drops_documents_that_cannot_fit(tiny_model):
    from bft.config import load_config
    from bft.filters.token_length import check_token_lengths, token_budgets
    from bft.planning import load_templates

    cfg = load_config(None, [f"model={tiny_model}", "generate.engine_kwargs.max_model_len=700",
                             "curate.engine_kwargs.max_model_len=700", "rewrite.engine_kwargs.max_model_len=2048",
                             "rewrite.sampling.max_tokens=256", "curate.sampling.max_tokens=64",
                             "generate.sampling.max_tokens=64"])
    budgets = token_budgets(cfg, load_templates(cfg))
    assert [b.stage for b in budgets] == ["generate", "curate", "rewrite"]
    # curate's prompt is longer than generate's and also reserves room for the instruction
    assert budgets[1].max_document_tokens < budgets[0].max_document_tokens
    short, long = "A short document.", "word " * 3000
    (ok, n_short), (drop, n_long) = check_token_lengths([short, long], budgets)
    assert ok is None and 0 < n_short < n_long
    assert drop.reason == "too_many_tokens" and "generate" in drop.detail
