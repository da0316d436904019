"""Tokenizers, loaded once per worker process, and chat-prompt rendering.

Prompts are rendered to text with the model's chat template here, in light CPU tasks,
and handed to vLLM as plain prompts. That replaces ray.data.llm's separate chat-template,
tokenize and detokenize actor pools, which each pin a CPU and, chained over three
stages on a small machine, leave the engines waiting for cores.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# Put inside a control-token string found in message text, so that it no longer matches
# the token: invisible to a reader, and the text around it is unchanged.
ZERO_WIDTH_SPACE = "\u200b"
# Characters of the markers chat formats use for turns and tool calls.
_MARKUP_CHARS = frozenset("<>[]|")


@lru_cache(maxsize=8)
def _control_tokens(tokenizer_path: str) -> re.Pattern[str] | None:
    """The strings the tokenizer reads as one control token: its special tokens, and added
    tokens that look like markup (``<tool_call>``, ``[INST]``). Other added tokens (runs of
    spaces, whole words some tokenizers add) are plain vocabulary and stay untouched, so
    the page's text reaches the model as it was."""
    tokenizer = load_tokenizer(tokenizer_path)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    candidates = [*tokenizer.all_special_tokens,
                  *(t.content for t in added if t.special or _MARKUP_CHARS.intersection(t.content))]
    names = {t for t in candidates if len(t) > 1 and t.strip()}
    return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True)))) if names else None


def defuse_control_tokens(tokenizer_path: str, text: str) -> str:
    """``text`` with each control-token string broken up, so it stays plain text.

    vLLM tokenizes a text prompt with special tokens parsed: a web page holding an
    end-of-turn token and an assistant header would otherwise close its user turn and
    write the start of the model's answer. Only the chat template may write them."""
    pattern = _control_tokens(tokenizer_path)
    if pattern is None:
        return text
    return pattern.sub(lambda m: m[0][0] + ZERO_WIDTH_SPACE + m[0][1:], text)


def render_chat(tokenizer_path: str, messages: list[dict[str, str]]) -> str:
    """Messages to the prompt string the model expects, ending where the assistant speaks.
    Control-token strings in the messages' text are defused (:func:`defuse_control_tokens`)."""
    tokenizer = load_tokenizer(tokenizer_path)
    messages = [{**m, "content": defuse_control_tokens(tokenizer_path, m["content"])} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a chat template: plain concatenation of the turns.
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def count_tokens(tokenizer_path: str, texts: list[str]) -> list[int]:
    tokenizer = load_tokenizer(tokenizer_path)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]
