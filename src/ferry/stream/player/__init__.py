"""A measuring media player: plays an HTTP stream in real time and records continuity.

It behaves as a real player does. Bytes arrive from the network into a buffer
measured in seconds of media (bytes are turned into seconds with the manifest
``<url>.json``: duration / size). Playback starts once ``prebuffer`` seconds are
buffered and then drains the buffer at one second of media per second of wall
time (monotonic clock). When the buffer is full (``buffer_seconds``) the player
stops reading, so the server is held back by TCP as it would be by a real one.

What it records:

- *stalls*: the buffer ran empty before the end of the media; playback resumes
  once ``resume`` seconds are buffered again. Start and length of each.
- *outages*: gaps of at least ``outage_min`` seconds in which the player wanted
  bytes and none came. For each: when, how long, the buffer level when the bytes
  stopped and, if the buffer ran dry, after how long (``drained_after_s``). When
  the source is paused on purpose this is the classic measurement of a player's
  buffer in seconds (``buffer_drain_s``).
- *reconnects*: on a reset or an early end of the body the player reconnects
  with ``Range: bytes=<received>-``, checks the 206 and its Content-Range, and
  counts it; it gives up after ``reconnect_window`` seconds without success.
- the longest gap between received bytes, the buffer level every
  ``sample_interval``, the byte count and whether the sha256 of all bytes
  matches the manifest's.

Exit status (:attr:`WatchReport.exit_code`) is a bit mask, 0 when all is well:
``EXIT_STALLED`` (4) playback stalled, ``EXIT_RECONNECTED`` (8) the connection
had to be re-established, ``EXIT_MISMATCH`` (16) the bytes differ from the
manifest's size or sha256, ``EXIT_INCOMPLETE`` (32) the player gave up before
the end of the media. 1 is left for errors that stop a watch from starting and
2 for usage errors.

Layout: :mod:`.report` (the report and live status), :mod:`.state`
(playback states and their transitions), :mod:`.playback` (the buffer model),
:mod:`.connection` (one HTTP request), :mod:`.session` (reading and resuming
the stream), :mod:`.runner` (a watch from start to report).
"""

from __future__ import annotations

from .connection import USER_AGENT, fetch_manifest
from .errors import WatchError
from .playback import Playback
from .report import (
    EXIT_ERROR,
    EXIT_INCOMPLETE,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_RECONNECTED,
    EXIT_STALLED,
    Outage,
    Reconnect,
    Stall,
    Status,
    WatchReport,
)
from .runner import DEFAULT_ASSUME_KBPS, watch, watch_async
from .state import RECONNECTING, PlayerStateError, PlayEvent, PlayState

__all__ = [
    "DEFAULT_ASSUME_KBPS",
    "EXIT_ERROR",
    "EXIT_INCOMPLETE",
    "EXIT_MISMATCH",
    "EXIT_OK",
    "EXIT_RECONNECTED",
    "EXIT_STALLED",
    "RECONNECTING",
    "USER_AGENT",
    "Outage",
    "PlayEvent",
    "PlayState",
    "Playback",
    "PlayerStateError",
    "Reconnect",
    "Stall",
    "Status",
    "WatchError",
    "WatchReport",
    "fetch_manifest",
    "watch",
    "watch_async",
]
