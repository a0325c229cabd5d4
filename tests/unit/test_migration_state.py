"""The migration phase and outcome tables, walked whole."""

from __future__ import annotations

import itertools

import pytest

from ferry.domain.migration_state import (
    OUTCOME_TRANSITIONS,
    PHASE_TRANSITIONS,
    Outcome,
    Phase,
    next_outcome,
    next_phase,
)
from ferry.errors import InvalidTransition
from ferry.host.outcomes import OutcomeBook


@pytest.mark.parametrize(("current", "new"), list(itertools.product(Phase, Phase)))
def test_every_phase_pair(current: Phase, new: Phase) -> None:
    if new in PHASE_TRANSITIONS[current]:
        assert next_phase("m", current, new) is new
    else:
        with pytest.raises(InvalidTransition, match=f"from phase {current} to {new}"):
            next_phase("m", current, new)


def test_only_phases_before_the_commit_can_be_aborted() -> None:
    assert {p for p in Phase if p.abortable} == {Phase.CONNECT, Phase.PREPARE, Phase.TRANSFER}
    # Every path to "done" passes through "commit".
    assert all(Phase.DONE not in PHASE_TRANSITIONS[p] for p in Phase if p.abortable)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(Outcome, Outcome)))
def test_every_outcome_pair(current: Outcome, new: Outcome) -> None:
    if new in OUTCOME_TRANSITIONS[current]:
        assert next_outcome("m", current, new) is new
    else:
        with pytest.raises(InvalidTransition):
            next_outcome("m", current, new)


def test_a_decided_outcome_never_changes_even_after_a_reload(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "migrations.json"
    book = OutcomeBook(path)
    book.begin("a" * 32)
    book.decide("a" * 32, Outcome.COMMITTED)
    again = OutcomeBook(path)
    assert again.get("a" * 32) is Outcome.COMMITTED
    with pytest.raises(InvalidTransition, match="already committed"):
        again.decide("a" * 32, Outcome.ABORTED)
    again.decide("a" * 32, Outcome.COMMITTED)  # the same decision again is harmless
    assert OutcomeBook(path).get("a" * 32) is Outcome.COMMITTED
