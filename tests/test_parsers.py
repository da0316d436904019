"""Parsers against the outputs models really produce, including broken ones."""

from __future__ import annotations

import pytest

from bft.filters.base import Drop
from bft.steps import curate, generate, rewrite


# --- curate: "Score: N" ------------------------------------------------------------------

@pytest.mark.parametrize("raw, score", [
    ("Clear, complete and written as an assistant.\nScore: 5", 5),
    ("Reasoning...\n**Score:** 4", 4),
    ("score = 3/5", 3),
    ("Score: 4.0", 4),
    ("First I thought Score: 2 but on reflection it is better.\nScore: 4", 4),  # two scores: the last wins
    ("Score: 5\n\n", 5),
    ("SCORE:1", 1),
])
def test_score_parses(raw, score):
    parsed = curate.parse_score(raw)
    assert not isinstance(parsed, Drop), parsed
    assert parsed[0] == score


def test_reasoning_is_kept():
    assert curate.parse_score("It is off-topic and promotional.\nScore: 1") == (
        1, "It is off-topic and promotional.")


@pytest.mark.parametrize("raw, reason", [
    ("", "unparseable_score"),
    ("   \n ", "unparseable_score"),
    ("This answer is great, five stars!", "unparseable_score"),
    ("Score: N", "unparseable_score"),
    ("Score: 7", "score_out_of_range"),
    ("Score: 0", "score_out_of_range"),
    ("Score: -2", "score_out_of_range"),
    ("Score: 4.5", "score_out_of_range"),
])
def test_score_failures(raw, reason):
    parsed = curate.parse_score(raw)
    assert isinstance(parsed, Drop) and parsed.reason == reason


def test_threshold():
    cfg = curate.Config(threshold=4)
    assert curate.parse("ok\nScore: 4", cfg) == {"score": 4, "curate_reasoning": "ok"}
    drop = curate.parse("meh\nScore: 3", cfg)
    assert isinstance(drop, Drop) and drop.reason == "below_threshold"
    assert drop.fields == {"score": 3}  # every scored pair keeps its score, kept or not


# --- rewrite: [RES]...[/RES] -------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("[RES]Boil the water first.[/RES]", "Boil the water first."),
    ("Sure! Here it is:\n[RES]\nLine one.\nLine two.\n[/RES]\nHope this helps", "Line one.\nLine two."),
    ("[res] lower case [/res]", "lower case"),
    ("[RES]first[/RES] [RES]second[/RES]", "first"),
    ("[ RES ]spaced[ / RES ]", "spaced"),
])
def test_response_extracted(raw, expected):
    assert rewrite.extract_response(raw) == expected


@pytest.mark.parametrize("raw, reason", [
    ("", "empty_output"),
    ("Just an answer without tags.", "missing_response_tag"),
    ("[RES]The answer was cut off because max_tok", "missing_end_tag"),
    ("[RES]   [/RES]", "empty_response"),
    ("[/RES] backwards [RES]", "missing_end_tag"),
])
def test_response_failures(raw, reason):
    result = rewrite.extract_response(raw)
    assert isinstance(result, Drop) and result.reason == reason


def test_min_response_chars():
    drop = rewrite.parse("[RES]ok[/RES]", rewrite.Config(min_response_chars=5))
    assert isinstance(drop, Drop) and drop.reason == "response_too_short"


# --- generate: instruction cleaning ------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("How do I repot a houseplant?", "How do I repot a houseplant?"),
    ('Instruction: "How do I repot a houseplant?"', "How do I repot a houseplant?"),
    ("**User request:** Explain Rayleigh scattering.", "Explain Rayleigh scattering."),
    ("  “Give me a 3-day Lisbon itinerary.”  ", "Give me a 3-day Lisbon itinerary."),
    ("Question:   What   is  a heat pump?", "What is a heat pump?"),
    ("Write a guide.\n\n\n\nInclude steps.", "Write a guide.\n\nInclude steps."),
])
def test_clean_instruction(raw, expected):
    assert generate.clean_instruction(raw) == expected


@pytest.mark.parametrize("raw, reason", [
    ("", "empty_instruction"),
    ('""', "empty_instruction"),
    ("Why?", "instruction_too_short"),
    ("x" * 700, "instruction_too_long"),
])
def test_instruction_failures(raw, reason):
    result = generate.parse(raw, generate.Config())
    assert isinstance(result, Drop) and result.reason == reason
