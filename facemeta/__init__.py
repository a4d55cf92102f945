"""facemeta: face recognition trained to work in domains it never saw."""

__version__ = "0.1.0"
