"""Secrets masked by value wherever bft writes text: its console (its own logs, the worker
logs Ray forwards to the driver, error messages), the manifest, the run record and the
failure records.

Masking by name (``BftConfig.redacted``) covers the config snapshot; this covers the rest:
a token that shows up inside an error message, an engine's start-up log or a URL. The
values come from the config (``SecretStr`` fields, secret-named ``env_vars`` /
``engine_kwargs`` entries, passwords in URLs) and from the environment (every variable
whose name looks like a credential, passwords in proxy URLs).

``bft submit`` keeps secret ``--set`` overrides off the job's command line (which Ray
shows in its job list and driver log): they travel in the job's environment, as
``BFT_SECRET_SETS``, and ``bft run`` applies them like ``--set``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from typing import Any, Iterable, Iterator, TextIO

import yaml

from bft.config.models import FREE_FORM_SECTIONS, REDACTED, SECRET_NAME_RE, URL_USERINFO_RE

SECRET_SETS_ENV = "BFT_SECRET_SETS"
# Shorter values are not masked: "true" or a port number must stay readable.
MIN_SECRET_CHARS = 8
# Typed config fields that hold secrets (``SecretStr``).
SECRET_FIELDS = ("storage.access_key_id", "storage.secret_access_key", "storage.session_token")
# Names that look like credentials but hold none: the shell's working directory, and
# variables that point at a credential file rather than holding it.
NOT_SECRET_NAME_RE = re.compile(r"^(OLD)?PWD$|_(FILE|PATH|DIR|HOME)$|^GOOGLE_APPLICATION_CREDENTIALS$", re.IGNORECASE)
_USERINFO_SECRET_RE = re.compile(r"[a-z][a-z0-9+.-]*://(?P<user>[^/@\s:]+)(?::(?P<password>[^/@\s]*))?@", re.IGNORECASE)


def is_secret_override(item: str) -> bool:
    """Whether a ``KEY=VALUE`` override carries a secret, at any depth of its value
    (``generate.env_vars={HF_TOKEN: ...}`` or ``storage={secret_access_key: ...}`` too)."""
    key, _, value = item.partition("=")
    try:  # parsed as ``--set`` parses it (config/loading.py)
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return (_is_secret_leaf(key, value) or any(_is_secret_leaf(k, v) for k, v in _leaves(key, parsed))
            or bool(URL_USERINFO_RE.search(value)))


def _leaves(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(f"{key}.{k}", v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(key, v)
    else:
        yield key, value


def _is_secret_leaf(key: str, value: Any) -> bool:
    parts = key.split(".")
    free_form = any(section in parts[:-1] for section in FREE_FORM_SECTIONS)
    return (key in SECRET_FIELDS or (free_form and bool(SECRET_NAME_RE.search(parts[-1])))
            or (isinstance(value, str) and bool(URL_USERINFO_RE.search(value))))


def secret_sets(environ: dict[str, str] | None = None) -> list[str]:
    """The secret overrides ``bft submit`` put in the job's environment."""
    raw = (os.environ if environ is None else environ).get(SECRET_SETS_ENV)
    return json.loads(raw) if raw else []


def _in_urls(text: str) -> list[str]:
    return [m.group("password") or m.group("user") for m in _USERINFO_SECRET_RE.finditer(text)]


def environment_secrets(environ: dict[str, str] | None = None) -> set[str]:
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items()
             if SECRET_NAME_RE.search(name) and not NOT_SECRET_NAME_RE.search(name) and name != SECRET_SETS_ENV}
    for value in environ.values():
        found.update(_in_urls(value))
    found.update(item.partition("=")[2] for item in secret_sets(environ))
    return found


def config_secrets(snapshot: Any, by_name: bool = False, key: str = "") -> set[str]:
    """Secret values in a config snapshot: secret-named entries of the free-form sections,
    passwords in URLs."""
    found: set[str] = set()
    if isinstance(snapshot, dict):
        for k, v in snapshot.items():
            found |= config_secrets(v, by_name or k in FREE_FORM_SECTIONS, str(k))
    elif isinstance(snapshot, list):
        for v in snapshot:
            found |= config_secrets(v, by_name, key)
    elif isinstance(snapshot, str):
        if by_name and SECRET_NAME_RE.search(key):
            found.add(snapshot)
        found.update(_in_urls(snapshot))
    return found


def configured_secrets(cfg: Any) -> set[str]:
    """Every secret value of a loaded config: its ``SecretStr`` fields, and what
    :func:`config_secrets` finds in the rest."""
    typed = {getattr(cfg.storage, f.split(".", 1)[1]) for f in SECRET_FIELDS}
    return {v.get_secret_value() for v in typed if v is not None} | config_secrets(cfg.model_dump(mode="json"))


class Masker:
    """Replaces every known secret value in a text."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None
        self.loaded_environment = False

    def add(self, values: Iterable[str | None]) -> None:
        new = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_CHARS and v != REDACTED}
        # and as they appear inside JSON text (the manifest, records): quotes and
        # backslashes escaped
        new |= {json.dumps(v)[1:-1] for v in new}
        if new - self.values:
            self.values |= new
            # longest first: a secret that contains another is masked whole
            self.pattern = re.compile("|".join(map(re.escape, sorted(self.values, key=len, reverse=True))))

    def mask(self, text: str) -> str:
        if not self.loaded_environment:  # in any process, the first use learns its environment's secrets
            self.loaded_environment = True
            self.add(environment_secrets())
        return self.pattern.sub(REDACTED, text) if self.pattern is not None and text else text


MASKER = Masker()


def mask(text: str) -> str:
    """``text`` with every secret this process knows of replaced by ``**********``."""
    return MASKER.mask(text)


def learn(cfg: Any) -> None:
    """Add a loaded config's secrets to what this process masks."""
    MASKER.add(configured_secrets(cfg))


class MaskedStream:
    """A text stream that masks secrets in everything written to it."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def masked_console() -> Iterator[None]:
    """Mask this process's stdout and stderr while in the block (enter it before logging is
    set up, so its handlers write through the mask; Ray prints forwarded worker logs to
    ``sys.stdout``/``sys.stderr``, looked up at each write)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, MaskedStream):
        sys.stdout = MaskedStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, MaskedStream):
        sys.stderr = MaskedStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
