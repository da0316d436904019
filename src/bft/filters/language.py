"""Language identification (``filters.languages``, ``filters.min_language_score``).

py3langid carries its model (naive Bayes over byte n-grams, ~100 languages) inside its wheel,
so nothing is downloaded at run time. The first ``SAMPLE_CHARS`` characters decide: enough
for a confident answer, and the cost stays flat for long pages.
"""

from __future__ import annotations

from functools import lru_cache

from bft.config import ConfigError, FilterConfig
from bft.filters.base import Drop

SAMPLE_CHARS = 2000


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    # Normalised probabilities, so the score reads as a confidence from 0 to 1.
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> set[str]:
    return set(_identifier().nb_classes)


def check_languages(cfg: FilterConfig) -> None:
    """A language the model does not know would drop every document: refuse it up front."""
    unknown = sorted(set(cfg.languages or ()) - known_languages())
    if unknown:
        raise ConfigError(f"filters.languages: {unknown} not among the languages py3langid detects "
                          f"(ISO 639-1 codes such as en, de, fr, zh): {sorted(known_languages())}")


def detect(text: str) -> tuple[str, float]:
    """``(ISO 639-1 code, confidence)`` of ``text``."""
    language, score = _identifier().classify(text[:SAMPLE_CHARS])
    return str(language), float(score)


def check_language(text: str, cfg: FilterConfig) -> Drop | None:
    if not cfg.languages:
        return None
    language, score = detect(text)
    if language not in cfg.languages:
        return Drop("language", f"detected {language} (score {score:.2f}), not in filters.languages {cfg.languages}")
    if score < cfg.min_language_score:
        return Drop("language", f"detected {language} with score {score:.2f} < filters.min_language_score "
                                f"{cfg.min_language_score}")
    return None
