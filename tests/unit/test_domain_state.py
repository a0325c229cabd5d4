import pytest

from ferry.domain.state import TRANSITIONS, DomainState, Event, allowed_events, next_state
from ferry.errors import InvalidTransition


def test_pause_unpause_cycle() -> None:
    state = next_state("vm", DomainState.SHUTOFF, Event.START)
    assert state is DomainState.RUNNING
    state = next_state("vm", state, Event.PAUSE)
    assert state is DomainState.PAUSED
    assert next_state("vm", state, Event.UNPAUSE) is DomainState.RUNNING


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (DomainState.PAUSED, Event.PAUSE),
        (DomainState.RUNNING, Event.UNPAUSE),
        (DomainState.SHUTOFF, Event.PAUSE),
        (DomainState.MIGRATING_OUT, Event.MIGRATE_OUT),
        (DomainState.MIGRATING_IN, Event.PAUSE),
        (DomainState.RUNNING, Event.START),
    ],
)
def test_refused_transitions_say_why(state: DomainState, event: Event) -> None:
    with pytest.raises(InvalidTransition) as err:
        next_state("virt_server", state, event)
    assert "virt_server" in str(err.value)
    assert state.value in str(err.value)


def test_every_state_can_end_except_shutoff() -> None:
    for state in DomainState:
        ends = Event.SHUTDOWN in allowed_events(state) or Event.MIGRATE_OUT_DONE in allowed_events(
            state
        )
        assert ends == (state is not DomainState.SHUTOFF), state


def test_every_state_is_reachable_from_shutoff() -> None:
    seen = {DomainState.SHUTOFF}
    frontier = [DomainState.SHUTOFF]
    while frontier:
        state = frontier.pop()
        for (src, _event), dst in TRANSITIONS.items():
            if src == state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(DomainState)


def test_xm_flags_are_six_letters() -> None:
    assert DomainState.RUNNING.xm_flags == "r-----"
    assert DomainState.PAUSED.xm_flags == "--p---"
    assert all(len(s.xm_flags) == 6 for s in DomainState)
