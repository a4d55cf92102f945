"""How the commands print text that came from users or files (names, paths, reasons) on one terminal line."""

from __future__ import annotations


def shown(text: str) -> str:
    """Text as printed on one terminal line: as is when printable, else escaped (no control,
    bidi-override or line-separator character reaches the terminal)."""
    return text if text.isprintable() else ascii(text)
