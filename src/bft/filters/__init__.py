"""Document filters. Each check returns ``None`` to keep a document or a ``Drop``."""

from bft.filters.base import Drop

__all__ = ["Drop"]
