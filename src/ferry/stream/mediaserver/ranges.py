"""The one byte range a request asks for (RFC 9110 section 14)."""

from __future__ import annotations


class Unsatisfiable(Exception):
    """A valid range that selects no byte of the file: the answer is 416."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte range asked for, or None to send it all.

    Syntactically invalid headers and multi-range requests are ignored, which
    RFC 9110 allows; a valid single range that selects nothing raises
    :class:`Unsatisfiable`.
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    if not dash or not (first_s or last_s):
        return None
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not all(part.isascii() and part.isdigit() for part in (first_s, last_s) if part):
        return None
    if not first_s:
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise Unsatisfiable
    if last is None:
        last = size - 1
    return first, min(last, size - 1)
