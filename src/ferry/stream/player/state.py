"""The player's playback states, the events between them, and the one table that links them.

Every change of :attr:`Playback.state` goes through :func:`next_state`, so a
model bug (resuming a finished stream, ending one that never started) is an
error at the moment it happens, not a wrong report later.

Whether the connection is being re-established is not a playback state: the
media keeps playing from the buffer meanwhile. The live status shows it
instead of the playback state (:data:`RECONNECTING`).
"""

from __future__ import annotations

import enum

from .errors import WatchError


class PlayState(enum.StrEnum):
    PREBUFFERING = "prebuffering"  # filling the buffer before the first frame
    PLAYING = "playing"
    STALLED = "stalled"  # the buffer ran dry before the end of the media
    FINISHED = "finished"  # played to the end of the complete media


class PlayEvent(enum.StrEnum):
    START = "start"  # prebuffer seconds buffered, or the whole media received
    RUN_DRY = "run-dry"  # the buffer is empty and more media is still to come
    RESUME = "resume"  # resume seconds buffered again, or the whole media received
    END = "end"  # the buffer is empty and the media is complete


# What the live status shows instead of the playback state while a broken
# connection is being resumed.
RECONNECTING = "reconnecting"

P = PlayState
TRANSITIONS: dict[tuple[PlayState, PlayEvent], PlayState] = {
    (P.PREBUFFERING, PlayEvent.START): P.PLAYING,
    (P.PLAYING, PlayEvent.RUN_DRY): P.STALLED,
    (P.STALLED, PlayEvent.RESUME): P.PLAYING,
    (P.PLAYING, PlayEvent.END): P.FINISHED,
}

_EVENT_VERBS = {
    PlayEvent.START: "start playback",
    PlayEvent.RUN_DRY: "stall",
    PlayEvent.RESUME: "resume playback",
    PlayEvent.END: "finish playback",
}


class PlayerStateError(WatchError):
    """The playback model asked for a transition that its table does not allow."""


def next_state(state: PlayState, event: PlayEvent) -> PlayState:
    """The state after ``event``, or PlayerStateError saying why not."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = ", ".join(sorted(e.value for e in allowed_events(state))) or "none"
        raise PlayerStateError(
            f"player cannot {_EVENT_VERBS[event]}: it is {state.value} (allowed: {allowed})"
        ) from None


def allowed_events(state: PlayState) -> frozenset[PlayEvent]:
    return frozenset(event for (src, event) in TRANSITIONS if src == state)
