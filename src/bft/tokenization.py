"""Tokenizers, loaded once per worker process, and chat-prompt rendering.

Prompts are rendered to text with the model's chat template here, in light CPU tasks,
and handed to vLLM as plain prompts. That replaces ray.data.llm's separate chat-template,
tokenize and detokenize actor pools, which each pin a CPU and, chained over three
stages on a small machine, leave the engines waiting for cores.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def render_chat(tokenizer_path: str, messages: list[dict[str, str]]) -> str:
    """Messages to the prompt string the model expects, ending where the assistant speaks."""
    tokenizer = load_tokenizer(tokenizer_path)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a chat template: plain concatenation of the turns.
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def count_tokens(tokenizer_path: str, texts: list[str]) -> list[int]:
    tokenizer = load_tokenizer(tokenizer_path)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]
