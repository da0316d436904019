"""Prompt templates: plain text files with ``### system`` / ``### user`` sections.

Templates live in ``bft/templates/`` and any stage can point at its own file instead
(``generate.prompt_template: my_prompt.txt``), so prompts change without touching
Python. Placeholders are the names a stage fills (``{{document}}``, and ``{{instruction}}``
after generate; each step declares its ``PLACEHOLDERS``); they are replaced literally, so
braces inside web documents are never interpreted.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Callable

SECTION_RE = re.compile(r"^###\s*(system|user)\s*$", re.MULTILINE)
PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
# Tags a template frames its values with (<document>...</document>, <request>,
# <document id="web">).
TAG_RE = re.compile(r"</?\s*([A-Za-z][\w-]*)(?:\s[^<>]*)?>")
# What a look-alike tag inside a value starts with instead of "<" (single left angle
# quotation mark): the text reads the same, but cannot close the template's own block.
DEFUSED = "\u2039"


class TemplateError(ValueError):
    """A prompt template file is malformed."""


@dataclass(frozen=True)
class Shot:
    """A worked example shown before the real task: the template filled with ``values``,
    answered with ``answer`` (generate: a seed pair's response as the document, its
    instruction as the answer)."""

    id: str
    values: dict[str, str] = field(hash=False)
    answer: str


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed prompt template: optional system text and a user text."""

    source: str
    system: str | None
    user: str
    sha256: str = ""
    """SHA-256 of the template file as stored (what ``sha256sum FILE`` prints), recorded
    with every output row: any change to the file, however small, shows."""
    run_tags: frozenset[str] = field(default=frozenset(), compare=False)
    """Frame tags of the run's other templates, defused in values too: a document must
    read the same in every pass (``<request>`` in a page defused in curate's prompt but
    not in generate's would change its block, and its cached prefix would not match)."""
    shot_pool: tuple[Shot, ...] = field(default=(), compare=False, repr=False)
    """Examples to draw from (``generate.few_shot``); empty: no examples."""
    shots_per_prompt: int = 0
    shot_seed: int = 0

    def draw(self, key: str) -> list[Shot]:
        """The examples shown with the document ``key``: the same for the same key and seed
        in every process (``random.Random`` seeds a string through SHA-512, not ``hash()``)."""
        if not self.shots_per_prompt or not self.shot_pool:
            return []
        rng = random.Random(f"{self.shot_seed}\0{key}")
        picks = rng.sample(range(len(self.shot_pool)), min(self.shots_per_prompt, len(self.shot_pool)))
        return [self.shot_pool[i] for i in picks]

    def longest_shots(self, measure: Callable[[list[str]], list[int]] | None = None) -> list[Shot]:
        """The examples that make the longest prompt (what the token budget allows for),
        by ``measure`` (texts -> sizes, e.g. token counts; default: characters)."""
        texts = ["\n".join([*shot.values.values(), shot.answer]) for shot in self.shot_pool]
        sizes = measure(texts) if measure and texts else [len(t) for t in texts]
        ranked = sorted(range(len(texts)), key=lambda i: -sizes[i])
        return [self.shot_pool[i] for i in ranked[:self.shots_per_prompt]]

    @property
    def placeholders(self) -> set[str]:
        return set(PLACEHOLDER_RE.findall((self.system or "") + self.user))

    @property
    def frame_tags(self) -> set[str]:
        """Names of the tags the template itself writes (``document``, ``request``)."""
        return {name.lower() for name in TAG_RE.findall((self.system or "") + self.user)}

    @cached_property
    def _look_alike(self) -> re.Pattern[str] | None:
        tags = self.frame_tags | self.run_tags
        return re.compile(r"<(?=\s*/?\s*(?:%s)\b)" % "|".join(map(re.escape, sorted(tags))),
                          re.IGNORECASE) if tags else None

    def messages(self, shots: tuple[Shot, ...] | list[Shot] = (), **values: str) -> list[dict[str, str]]:
        """Render to chat messages, filling placeholders with ``values``; ``shots`` come
        first, each as a user turn and the assistant's answer. Web text cannot
        end the block it sits in: a tag in a value that the template also writes (a page
        holding ``</document>`` and a task of its own) is defused (its ``<`` replaced)."""
        look_alike = self._look_alike

        def safe(value: str) -> str:
            return look_alike.sub(DEFUSED, value) if look_alike else value

        def fill(text: str) -> str:
            return PLACEHOLDER_RE.sub(lambda m: safe(values[m.group(1)]), text)

        out = []
        if self.system:
            out.append({"role": "system", "content": fill(self.system)})
        for shot in shots:
            out.append({"role": "user", "content": PLACEHOLDER_RE.sub(lambda m: safe(shot.values[m.group(1)]),
                                                                      self.user)})
            out.append({"role": "assistant", "content": shot.answer})
        out.append({"role": "user", "content": fill(self.user)})
        return out


def parse_template(text: str, source: str, required: set[str], allowed: set[str]) -> PromptTemplate:
    """Parse template text; ``required`` placeholders must all appear, and no other than
    ``allowed`` may. ``text`` is the file decoded as is (no newline translation), so its
    hash is the file's."""
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    text = text.replace("\r\n", "\n")  # a file saved on Windows renders the same prompt
    sections: dict[str, str] = {}
    matches = list(SECTION_RE.finditer(text))
    if not matches:
        raise TemplateError(f"{source}: no '### user' section found")
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = match.group(1)
        if name in sections:
            raise TemplateError(f"{source}: section '### {name}' appears twice")
        sections[name] = text[match.end():end].strip("\n")
    if "user" not in sections or not sections["user"].strip():
        raise TemplateError(f"{source}: the '### user' section is missing or empty")
    template = PromptTemplate(source=source, system=sections.get("system") or None,
                              user=sections["user"], sha256=sha256)
    unknown = template.placeholders - allowed
    if unknown:
        raise TemplateError(
            f"{source}: unknown placeholder(s) {sorted(unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    missing = required - template.placeholders
    if missing:
        raise TemplateError(f"{source}: missing placeholder(s) {sorted('{{%s}}' % m for m in missing)}")
    return template


def load_template(stage: str, path: str | None, required: set[str], allowed: set[str]) -> PromptTemplate:
    """Load a stage's template: the file at ``path``, or the built-in one."""
    if path is None:
        data = resources.files("bft.templates").joinpath(f"{stage}.txt").read_bytes()
        return parse_template(data.decode("utf-8"), f"builtin:{stage}.txt", required, allowed)
    file = Path(path)
    if not file.is_file():
        raise TemplateError(f"{path}: prompt template file not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text ({exc})") from None
    return parse_template(text, str(file), required, allowed)


def same_frames(templates: dict[str, PromptTemplate]) -> dict[str, PromptTemplate]:
    """The templates of one run, each defusing every template's frame tags (see
    ``PromptTemplate.run_tags``)."""
    tags = frozenset().union(*(t.frame_tags for t in templates.values()))
    return {name: replace(t, run_tags=tags) for name, t in templates.items()}


def builtin_template_texts() -> list[str]:
    """Texts of the built-in templates (used to train the tiny tokenizer)."""
    folder = resources.files("bft.templates")
    return [f.read_text("utf-8") for f in folder.iterdir() if f.name.endswith(".txt")]
