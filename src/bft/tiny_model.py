"""Build a small random-weight Llama model with a locally trained BPE tokenizer.

No model hub is needed: the tokenizer is trained on text shipped in this package (the
prompt templates plus a short built-in corpus, or a corpus file you pass), and the
weights are drawn from a seeded generator. The result loads in transformers and vLLM
like any local checkpoint, so the whole pipeline can run on a laptop CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Special tokens of the tiny chat format. The chat template below renders
# system/user/assistant turns with them; <|end|> doubles as end-of-sequence.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A few sentences of ordinary prose so that common English words get merges even
# when no corpus is given. Wording is our own.
_BUILTIN_CORPUS = """\
The quick review below explains how to repot a houseplant without harming its roots.
Water the soil a day before, loosen the pot, and lift the plant by its base.
Our library opens at nine on weekdays and at ten on Saturdays; it is closed on holidays.
To reset the router, hold the small button on the back for ten seconds until the light blinks.
Score: 1 Score: 2 Score: 3 Score: 4 Score: 5 [RES] [/RES]
Instruction: Explain the steps. Question: What is the best way to learn a language?
The committee met in March 2021 and approved a budget of 4.5 million dollars.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the random model. Defaults run fast on two CPU cores."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    # vLLM's CPU attention backend rejects head_dim 16; 64 is safe.
    head_dim: int = 64
    max_position_embeddings: int = 4096
    seed: int = 0


def _training_texts(corpus: Path | None) -> list[str]:
    from bft.prompts import builtin_template_texts

    texts = [_BUILTIN_CORPUS, *builtin_template_texts()]
    if corpus is not None:
        texts.append(Path(corpus).read_text(encoding="utf-8", errors="replace"))
    return texts


def build_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec(),
                     corpus: Path | None = None) -> Path:
    """Write a tokenizer and a random-weight LlamaForCausalLM to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if spec.hidden_size != spec.num_heads * spec.head_dim:
        raise ValueError(
            f"hidden_size ({spec.hidden_size}) must equal num_heads ({spec.num_heads}) "
            f"x head_dim ({spec.head_dim})"
        )
    if spec.head_dim < 32:
        raise ValueError(f"head_dim must be >= 32 for vLLM's CPU backend, got {spec.head_dim}")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    # Byte-level BPE: every string is encodable, so random generations never hit
    # unknown tokens and decoding is always valid UTF-8 (replacement chars aside).
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_texts(corpus), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "bft_tiny_model.json").write_text(json.dumps(spec.__dict__, indent=2) + "\n")
    return out
