"""Token-length bound: every LLM stage's prompt must fit its ``max_model_len``.

For each stage the budget for the document is::

    max_model_len - max_tokens (completion) - prompt overhead - instruction allowance

where the overhead is the token count of the stage's rendered prompt with empty
placeholders, and the instruction allowance (curate, rewrite) is generate's max_tokens.
Documents over any stage's budget are dropped here, before any GPU time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from bft.config import BftConfig, ConfigError
from bft.filters.base import Drop
from bft.prompts import PromptTemplate
from bft.stages import LLM_STAGES, STEPS, producer_of
from bft.tokenization import count_tokens, load_tokenizer, render_chat


@dataclass(frozen=True)
class TokenBudget:
    stage: str
    tokenizer: str
    max_document_tokens: int


def token_budgets(cfg: BftConfig, templates: dict[str, PromptTemplate]) -> list[TokenBudget]:
    """Per-stage document budgets. Loads every stage's tokenizer, so a wrong model path
    fails here, in the driver, naming the field, before any engine starts."""
    budgets = []
    for name in LLM_STAGES:
        stage = cfg.llm_stage(name)
        field = f"{name}.tokenizer" if stage.tokenizer else f"{name}.model"
        try:
            load_tokenizer(stage.tokenizer_path)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ConfigError(f"{field}: cannot load a tokenizer from {stage.tokenizer_path!r} "
                              f"({type(exc).__name__}); the driver needs the tokenizer files too") from None
        if stage.max_model_len is None:
            continue
        empty = dict.fromkeys(STEPS[name].PLACEHOLDERS, "")
        # With examples (few_shot), the longest ones: any document's prompt must fit with them.
        longest = templates[name].longest_shots(lambda texts: count_tokens(stage.tokenizer_path, texts))
        prompt = render_chat(stage.tokenizer_path, templates[name].messages(longest, **empty))
        overhead = count_tokens(stage.tokenizer_path, [prompt])[0]
        # Room for what earlier stages write into this stage's prompt (the instruction).
        allowance = sum(cfg.llm_stage(producer).sampling.max_tokens for placeholder in templates[name].placeholders
                        if (producer := producer_of(placeholder)) is not None)
        budgets.append(TokenBudget(name, stage.tokenizer_path,
                                   stage.max_model_len - stage.sampling.max_tokens - overhead - allowance))
    return budgets


def check_token_lengths(texts: list[str], budgets: list[TokenBudget]) -> list[tuple[Drop | None, int]]:
    """Per text: the first stage it does not fit (or ``None``) and its token count under the
    first stage's tokenizer (reported as ``n_tokens``)."""
    results: list[tuple[Drop | None, int]] = [(None, 0)] * len(texts)
    counts_by_tokenizer: dict[str, list[int]] = {}
    for budget in budgets:
        if budget.tokenizer not in counts_by_tokenizer:
            counts_by_tokenizer[budget.tokenizer] = count_tokens(budget.tokenizer, texts)
        counts = counts_by_tokenizer[budget.tokenizer]
        for i, n in enumerate(counts):
            drop, first = results[i]
            if not first:
                first = n
            if drop is None and n > budget.max_document_tokens:
                drop = Drop("too_many_tokens",
                            f"{n} tokens > {budget.max_document_tokens} that fit {budget.stage}'s "
                            f"max_model_len with its prompt and completion")
            results[i] = (drop, first)
    return results
