"""bft: turn web documents into instruction-tuning data by back-and-forth translation."""

__version__ = "0.1.0"
