"""The config reference table (``bft config-reference``, README's "Config reference")."""

from __future__ import annotations

from pydantic import BaseModel, SecretStr

from bft.config.run import BftConfig


def reference_markdown() -> str:
    """The config reference table in README.md (a test keeps the two identical)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, instance: BaseModel) -> None:
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(type(value), key + ".", value)
                continue
            if isinstance(value, SecretStr) or value is None:
                shown = "`None`"
            elif isinstance(value, str):
                shown = f"`{value!r}`" if value else "`''`"
            else:
                shown = f"`{value}`"
            text = (field.description or "").replace("\n", " ").replace("|", "\\|")
            rows.append(f"| `{key}` | {shown.replace('|', chr(92) + '|')} | {text} |")

    # Every section at its defaults; model_construct skips the validator, which would
    # demand a model.
    defaults = BftConfig.model_construct(**{
        name: field.default_factory() for name, field in BftConfig.model_fields.items()
        if field.default_factory is not None})
    walk(BftConfig, "", defaults)
    return "\n".join(rows)
