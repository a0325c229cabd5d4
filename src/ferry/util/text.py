"""Text for a person, from text a peer may have written."""

from __future__ import annotations


def one_line(text: str, limit: int = 500) -> str:
    """An error for a person: one line, control characters shown escaped, bounded.

    Messages may quote what a peer sent; its newlines must not forge lines.
    """
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
