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


def _page(seed: int, n_words: int = 300) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(["pot", "soil", "root", "water", "light", "leaf", "mix", "stem", "sun", "fern",
                                "spring", "drainage", "repot", "gently", "week", "humid"]) for _ in range(n_words))


def _edited(text: str, every: int = 60) -> str:
    """The page with one word in ``every`` changed: a template or mirror of it."""
    words = text.split()
    return " ".join("CHANGED" if i % every == 0 else w for i, w in enumerate(words))


def test_near_duplicates_are_dropped_naming_the_kept_twin(ray_local):
    from bft.config import NearDedupConfig
    from bft.filters.near_dedup import NearDeduplicator

    near = NearDeduplicator.start(NearDedupConfig(shards=3))
    a, b, other = _page(1), _page(2), _page(3)
    docs = [{"id": "a", "source": "f", "source_row": 1, "text": a},
            {"id": "b", "source": "f", "source_row": 2, "text": b},
            {"id": "a-mirror", "source": "g", "source_row": 1, "text": _edited(a)}]
    assert near.near_duplicates_of(docs) == [None, None, "a"]  # within one batch
    later = [{"id": "b-template", "source": "h", "source_row": 5, "text": _edited(b, 100)},
             {"id": "other", "source": "h", "source_row": 6, "text": other}]
    assert near.near_duplicates_of(later) == ["b", None]  # across batches
    assert near.near_duplicates_of(docs) == [None, None, "a"]  # a retried batch: same answers
    # The dropped mirror claimed nothing: a near-twin of it (not of "a") is not blamed on it.
    assert near.near_duplicates_of([{"id": "c", "source": "h", "source_row": 9, "text": _page(4)}]) == [None]
    near.stop()

    # Resume: a fresh set of shards taught what the earlier attempt kept.
    fresh = NearDeduplicator.start(NearDedupConfig(shards=2))
    fresh.remember(docs[:2])
    assert fresh.near_duplicates_of([{"id": "a-again", "source": "k", "source_row": 1, "text": _edited(a)}]) == ["a"]
    fresh.stop()


def test_a_document_that_loses_on_a_later_shard_gives_its_buckets_back(ray_local):
    import ray

    from bft.filters.near_dedup import NearDupShard

    shard = NearDupShard.remote()
    assert ray.get(shard.claim.remote([([b"k1", b"k2"], "f#1", "x")])) == [None]
    assert ray.get(shard.claim.remote([([b"k2", b"k3"], "f#2", "y")])) == ["x"]  # taken: claims nothing
    assert ray.get(shard.claim.remote([([b"k3"], "f#3", "z")])) == [None]  # k3 was left free
    ray.get(shard.release.remote([([b"k1", b"k2"], "f#1"), ([b"k3"], "not-the-owner")]))
    assert ray.get(shard.claim.remote([([b"k1", b"k3"], "f#4", "w")])) == ["z"]  # k3 kept its owner
    assert ray.get(shard.claim.remote([([b"k1", b"k2"], "f#5", "v")])) == [None]  # k1, k2 given back
    ray.kill(shard)


def test_a_twin_named_after_a_document_that_then_lost_asks_again(ray_local):
    """In one batch, i claims bucket a on shard 0 (so j, which shares only a, is named after
    i), then loses on shard 1 to z of an earlier batch and gives a back: j is then kept, as
    it would be with one shard."""
    from bft.config import NearDedupConfig
    from bft.filters.near_dedup import NearDeduplicator

    near = NearDeduplicator.start(NearDedupConfig(shards=2))
    buckets = {"z": {1: [b"z1"]}, "i": {0: [b"a"], 1: [b"z1"]}, "j": {0: [b"a"]}}
    near._by_shard = lambda text: buckets[text]  # the buckets, chosen rather than hashed
    assert near.near_duplicates_of([{"id": "Z", "source": "f", "source_row": 1, "text": "z"}]) == [None]
    batch = [{"id": "I", "source": "f", "source_row": 2, "text": "i"},
             {"id": "J", "source": "f", "source_row": 3, "text": "j"}]
    assert near.near_duplicates_of(batch) == ["Z", None]
    near.stop()


def test_the_report_counts_near_duplicates_with_the_filter_code():
    from bft.filters.near_dedup import similar_pairs, word_shingles

    a, b = _page(1), _page(2)
    sets = [word_shingles(t, 5) for t in (a, _edited(a), b, _edited(b, 40), _page(3))]
    pairs = similar_pairs(sets, 0.5)
    assert sorted((x, y) for _, x, y in pairs) == [(0, 1), (2, 3)]
    assert all(s >= 0.5 for s, _, _ in pairs)


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
