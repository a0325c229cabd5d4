"""The player's playback states: every transition the table allows, and no other."""

from __future__ import annotations

import itertools

import pytest

from ferry.errors import FerryError
from ferry.stream.player import Playback, PlayerStateError, PlayEvent, PlayState, WatchError
from ferry.stream.player import playback as playback_module
from ferry.stream.player.state import TRANSITIONS, allowed_events, next_state

PAIRS = list(itertools.product(PlayState, PlayEvent))
ALLOWED = [pair for pair in PAIRS if pair in TRANSITIONS]
REFUSED = [pair for pair in PAIRS if pair not in TRANSITIONS]


def test_the_table_is_walked_completely() -> None:
    assert len(ALLOWED) == 4 and len(ALLOWED) + len(REFUSED) == len(PlayState) * len(PlayEvent)


@pytest.mark.parametrize(("state", "event"), ALLOWED, ids=lambda x: str(x))
def test_every_allowed_transition_is_accepted(state: PlayState, event: PlayEvent) -> None:
    assert next_state(state, event) is TRANSITIONS[(state, event)]
    assert event in allowed_events(state)


@pytest.mark.parametrize(("state", "event"), REFUSED, ids=lambda x: str(x))
def test_every_other_transition_is_refused_with_a_one_line_reason(
    state: PlayState, event: PlayEvent
) -> None:
    with pytest.raises(PlayerStateError) as caught:
        next_state(state, event)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("player cannot ") and f"it is {state.value}" in message
    assert event not in allowed_events(state)
    # A model bug surfaces as the player's own error, which the CLI prints as it is.
    assert isinstance(caught.value, WatchError) and isinstance(caught.value, FerryError)


def test_every_state_is_reachable_and_finished_is_the_end() -> None:
    reached = {PlayState.PREBUFFERING}
    frontier = [PlayState.PREBUFFERING]
    while frontier:
        state = frontier.pop()
        for event in allowed_events(state):
            target = next_state(state, event)
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(PlayState)
    assert allowed_events(PlayState.FINISHED) == frozenset()


def test_the_playback_model_moves_only_through_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[tuple[PlayState, PlayEvent]] = []

    def recording(state: PlayState, event: PlayEvent) -> PlayState:
        taken.append((state, event))
        return next_state(state, event)

    monkeypatch.setattr(playback_module, "next_state", recording)
    pb = Playback(seconds_per_byte=0.001, prebuffer=0.5, resume=0.2, t0=0.0)
    pb.add(0.0, 600, complete=False)  # 0.6 s buffered: playback starts
    pb.advance(1.0)  # ran dry at 0.6
    pb.add(1.0, 300, complete=True)  # the rest: resumes, and plays to the end
    pb.advance(2.0)
    assert taken == [
        (PlayState.PREBUFFERING, PlayEvent.START),
        (PlayState.PLAYING, PlayEvent.RUN_DRY),
        (PlayState.STALLED, PlayEvent.RESUME),
        (PlayState.PLAYING, PlayEvent.END),
    ]
    assert pb.state is PlayState.FINISHED and pb.finished_at == pytest.approx(1.3)
    # Once finished, nothing moves it: more time is no event.
    pb.advance(5.0)
    assert pb.state is PlayState.FINISHED and len(taken) == 4
