"""A migration's phase (source side) and outcome (target side), each with its table.

The phase says how far the source has gone, and so what a failure means:
up to ``transfer`` a failure rolls back and the VM runs on the source; from
``commit`` on the target alone decides, and a lost answer leaves the source
``in-doubt`` (VM held paused) until the target says what it did.

The outcome is the target's decision, kept on disk: ``pending`` from prepare
until the commit is written (``committed``, before the VM may resume) or the
migration is dropped (``aborted``, after its QEMU has ended). A decided
outcome never changes: that is what lets a source that lost the answer ask
again, even across a restart of either daemon.
"""

from __future__ import annotations

import enum

from ferry.errors import InvalidTransition


class Phase(enum.StrEnum):
    CONNECT = "connect"
    PREPARE = "prepare"
    TRANSFER = "transfer"
    COMMIT = "commit"
    IN_DOUBT = "in-doubt"
    DONE = "done"
    ROLLED_BACK = "rolled-back"

    @property
    def abortable(self) -> bool:
        """An abort may still undo the migration (nothing is committed yet)."""
        return self in (Phase.CONNECT, Phase.PREPARE, Phase.TRANSFER)


P = Phase
PHASE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    P.CONNECT: frozenset({P.PREPARE, P.ROLLED_BACK}),
    P.PREPARE: frozenset({P.TRANSFER, P.ROLLED_BACK}),
    P.TRANSFER: frozenset({P.COMMIT, P.ROLLED_BACK}),
    # Once the commit is sent, only the target's word ends the migration.
    P.COMMIT: frozenset({P.DONE, P.IN_DOUBT, P.ROLLED_BACK}),
    P.IN_DOUBT: frozenset({P.DONE, P.ROLLED_BACK}),
    P.DONE: frozenset(),
    P.ROLLED_BACK: frozenset(),
}


def next_phase(migration: str, current: Phase, new: Phase) -> Phase:
    """``new`` if the table allows it after ``current``, else InvalidTransition."""
    if new not in PHASE_TRANSITIONS[current]:
        raise InvalidTransition(
            f"migration {migration}: cannot go from phase {current.value} to {new.value}"
        )
    return new


class Outcome(enum.StrEnum):
    PENDING = "pending"
    COMMITTED = "committed"
    ABORTED = "aborted"

    @property
    def decided(self) -> bool:
        return self is not Outcome.PENDING


# What a target answers for a migration id it has never prepared: not a
# decision, so a source in doubt must keep its VM held and keep asking.
UNKNOWN = "unknown"

OUTCOME_TRANSITIONS: dict[Outcome, frozenset[Outcome]] = {
    Outcome.PENDING: frozenset({Outcome.COMMITTED, Outcome.ABORTED}),
    Outcome.COMMITTED: frozenset(),
    Outcome.ABORTED: frozenset(),
}


def next_outcome(migration: str, current: Outcome, new: Outcome) -> Outcome:
    if new not in OUTCOME_TRANSITIONS[current]:
        raise InvalidTransition(
            f"migration {migration}: its outcome is already {current.value}, "
            f"it cannot become {new.value}"
        )
    return new
