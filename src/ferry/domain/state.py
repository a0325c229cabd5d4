"""The domain lifecycle: states, events, and the one table that links them.

Every change of a domain's state goes through :func:`next_state`, so a request
that makes no sense in the current state (pausing a paused domain, migrating a
domain that is already moving) is refused with a reason instead of reaching
QEMU.
"""

from __future__ import annotations

import enum

from ferry.errors import InvalidTransition


class DomainState(enum.StrEnum):
    SHUTOFF = "shutoff"
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING_OUT = "migrating-out"
    MIGRATING_IN = "migrating-in"
    CRASHED = "crashed"

    @property
    def xm_flags(self) -> str:
        """xm list's six-letter state column (r b p s c d)."""
        return _XM_FLAGS[self]


_XM_FLAGS = {
    DomainState.SHUTOFF: "---s--",
    DomainState.RUNNING: "r-----",
    DomainState.PAUSED: "--p---",
    DomainState.MIGRATING_OUT: "r----m",
    DomainState.MIGRATING_IN: "--p--m",
    DomainState.CRASHED: "----c-",
}


class Event(enum.StrEnum):
    START = "start"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    SHUTDOWN = "shutdown"  # the guest powered off, or was destroyed
    CRASH = "crash"
    RESTART = "restart"  # a crashed or rebooted guest runs again
    MIGRATE_OUT = "migrate-out"
    MIGRATE_OUT_ABORT_RUNNING = "migrate-out-abort-running"
    MIGRATE_OUT_ABORT_PAUSED = "migrate-out-abort-paused"
    MIGRATE_OUT_DONE = "migrate-out-done"
    MIGRATE_IN = "migrate-in"
    MIGRATE_IN_COMMIT = "migrate-in-commit"
    MIGRATE_IN_COMMIT_PAUSED = "migrate-in-commit-paused"


S = DomainState
TRANSITIONS: dict[tuple[DomainState, Event], DomainState] = {
    (S.SHUTOFF, Event.START): S.RUNNING,
    (S.RUNNING, Event.PAUSE): S.PAUSED,
    (S.PAUSED, Event.UNPAUSE): S.RUNNING,
    (S.RUNNING, Event.SHUTDOWN): S.SHUTOFF,
    (S.PAUSED, Event.SHUTDOWN): S.SHUTOFF,
    (S.CRASHED, Event.SHUTDOWN): S.SHUTOFF,
    (S.MIGRATING_IN, Event.SHUTDOWN): S.SHUTOFF,
    (S.MIGRATING_OUT, Event.SHUTDOWN): S.SHUTOFF,
    (S.RUNNING, Event.CRASH): S.CRASHED,
    (S.CRASHED, Event.RESTART): S.RUNNING,
    (S.RUNNING, Event.MIGRATE_OUT): S.MIGRATING_OUT,
    (S.PAUSED, Event.MIGRATE_OUT): S.MIGRATING_OUT,
    (S.MIGRATING_OUT, Event.MIGRATE_OUT_ABORT_RUNNING): S.RUNNING,
    (S.MIGRATING_OUT, Event.MIGRATE_OUT_ABORT_PAUSED): S.PAUSED,
    (S.MIGRATING_OUT, Event.MIGRATE_OUT_DONE): S.SHUTOFF,
    (S.SHUTOFF, Event.MIGRATE_IN): S.MIGRATING_IN,
    (S.MIGRATING_IN, Event.MIGRATE_IN_COMMIT): S.RUNNING,
    (S.MIGRATING_IN, Event.MIGRATE_IN_COMMIT_PAUSED): S.PAUSED,
}

_EVENT_VERBS = {
    Event.START: "start",
    Event.PAUSE: "pause",
    Event.UNPAUSE: "unpause",
    Event.SHUTDOWN: "shut down",
    Event.CRASH: "mark as crashed",
    Event.RESTART: "restart",
    Event.MIGRATE_OUT: "migrate",
    Event.MIGRATE_IN: "receive",
}


def next_state(domain: str, state: DomainState, event: Event) -> DomainState:
    """The state after ``event``, or InvalidTransition saying why not."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        verb = _EVENT_VERBS.get(event, event.value)
        raise InvalidTransition(f"cannot {verb} domain '{domain}': it is {state.value}") from None


def allowed_events(state: DomainState) -> frozenset[Event]:
    return frozenset(event for (src, event) in TRANSITIONS if src == state)
