"""The player's one error that callers see."""

from __future__ import annotations

from ferry.errors import FerryError


class WatchError(FerryError):
    """A watch could not start or its stream could not be read."""
