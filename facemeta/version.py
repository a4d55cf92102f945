"""The version of facemeta (a leaf: the command line, the service and exported models read it)."""

__version__ = "0.1.0"
