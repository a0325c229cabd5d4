"""The convergence policy on made-up pre-copy runs: when it steps, how far, when it gives up."""

from __future__ import annotations

from dataclasses import replace

from ferry.cli.migrate_cli import DEFAULT_START_DOWNTIME_MS
from ferry.migration.convergence import (
    Convergence,
    GiveUp,
    SetDowntime,
    SetFirstThrottle,
    StartPostcopy,
)
from ferry.migration.params import MigrationParams
from ferry.migration.progress import Progress

MB = 1_000_000


def sample(passes: int, remaining_mb: float, throttle: int = 0, dirty: float = 1000) -> Progress:
    return Progress(
        status="active", elapsed_s=0, transferred=0, remaining=int(remaining_mb * MB),
        total=256 * MB, rate_mbit=100, dirty_rate=dirty, passes=passes, downtime_ms=None,
        expected_downtime_ms=None, setup_ms=None, throttle_pct=throttle,
    )  # fmt: skip


def run(policy: Convergence, passes: list[tuple[float, int, float, int]]) -> list[object]:
    """(time, pass, remaining MB, throttle) samples; the actions taken."""
    actions = []
    for t, n, rem, thr in passes:
        actions += policy.observe(sample(n, rem, thr), t)
    return actions


def test_a_converging_migration_is_left_alone() -> None:
    policy = Convergence(MigrationParams(), 0.0)
    shrinking = [(i * 2.0, i, 100 / 2**i, 0) for i in range(1, 8)]
    assert run(policy, shrinking) == []
    assert policy.decisions == [] and policy.limit_ms == 100


def test_stalled_passes_step_the_limit_along_the_schedule_up_to_the_cap() -> None:
    policy = Convergence(MigrationParams(max_downtime_cap_ms=300), 0.0)
    stuck = [(i * 1.0, i, 90.0, 0) for i in range(1, 20)]
    actions = run(policy, stuck)
    assert actions == [SetDowntime(150), SetDowntime(200), SetDowntime(300)]
    assert policy.limit_ms == 300  # never past the cap
    assert all("passes without the dirty memory shrinking" in d["why"] for d in policy.decisions)


def test_a_slow_link_steps_on_time_even_within_one_long_pass() -> None:
    policy = Convergence(MigrationParams(converge_after_s=20), 0.0)
    # The first pass copies all of RAM: an hour of it is no reason to step.
    assert run(policy, [(5.0, 1, 120.0, 0), (3600.0, 1, 60.0, 0)]) == []
    assert run(policy, [(3601.0, 2, 50.0, 0), (3619.0, 2, 40.0, 0)]) == []
    assert run(policy, [(3621.0, 2, 30.0, 0)]) == [SetDowntime(150)]
    assert "not done 20 s after the last step" in policy.decisions[-1]["why"]


def test_the_throttle_is_reported_as_it_changes() -> None:
    policy = Convergence(MigrationParams(), 0.0)
    run(policy, [(1.0, 1, 90, 0), (2.0, 2, 80, 30), (3.0, 2, 80, 30), (4.0, 3, 60, 50)])
    said = [d["decision"] for d in policy.decisions]
    assert said == [
        "QEMU throttles the guest's vCPUs to 30 %",
        "QEMU throttles the guest's vCPUs to 50 %",
    ]


def test_the_first_throttle_is_sized_from_the_measured_rates() -> None:
    policy = Convergence(MigrationParams(), 0.0)
    busy = 6000.0  # pages/s: 24.6 MB/s against the 12.5 MB/s that 100 Mbit sends
    assert policy.observe(sample(1, 200, dirty=busy), 5.0) == []  # the first pass proves nothing
    actions = policy.observe(sample(2, 90, dirty=busy), 10.0)
    assert actions == [SetFirstThrottle(85)]  # 1 - 12.5/24.6/3 = 83 %, to 5 %
    assert "dirties 24.6 MB/s, the stream sends 12.5 MB/s" in policy.decisions[-1]["why"]
    assert policy.observe(sample(2, 90, dirty=busy), 11.0) == []  # said once
    policy.observe(sample(3, 90, throttle=75, dirty=busy), 20.0)
    assert policy.observe(sample(3, 90, throttle=75, dirty=busy * 4), 21.0) == []  # QEMU has it


def test_no_first_throttle_without_auto_converge_or_when_the_link_keeps_up() -> None:
    off = Convergence(MigrationParams(auto_converge=False), 0.0)
    assert off.observe(sample(2, 90, dirty=6000), 10.0) == []
    calm = Convergence(MigrationParams(), 0.0)
    assert calm.observe(sample(2, 90, dirty=2000), 10.0) == []


def test_past_the_timeout_it_gives_up_with_the_numbers() -> None:
    policy = Convergence(MigrationParams(converge_timeout_s=60), 0.0)
    # A long first pass does not count: the clock starts at its end (t = 10).
    actions = run(policy, [(9.0, 1, 200.0, 0), (10.0, 2, 90.0, 99), (69.0, 8, 88.0, 99)])
    assert not any(isinstance(a, GiveUp) for a in actions)
    actions = run(policy, [(71.0, 9, 88.0, 99)])
    assert isinstance(actions[-1], GiveUp)
    reason = actions[-1].reason
    assert "not converging 61 s after the first pass (9 passes)" in reason
    assert "88 MB still dirty" in reason
    assert "throttled to 99 %" in reason and "keeps running here" in reason


def test_no_timeout_means_never_giving_up() -> None:
    policy = Convergence(replace(MigrationParams(), converge_timeout_s=0), 0.0)
    assert not any(isinstance(a, GiveUp) for a in run(policy, [(1e6, 5, 90.0, 99)]))


def test_the_command_line_starts_where_the_settings_do() -> None:
    assert MigrationParams().max_downtime_ms == DEFAULT_START_DOWNTIME_MS


def test_postcopy_switches_once_after_the_first_pass_and_nothing_else() -> None:
    policy = Convergence(MigrationParams(postcopy=True, max_downtime_cap_ms=500), 0.0)
    assert run(policy, [(1.0, 1, 200.0, 0), (5.0, 1, 100.0, 0)]) == []
    # A busy guest: without post-copy this would throttle and step the limit.
    busy = [(10.0 + i, 2 + i, 90.0, 20) for i in range(10)]
    assert run(policy, busy) == [StartPostcopy()]
    assert policy.switched and policy.limit_ms == 100
    [decision] = policy.decisions
    assert decision["decision"] == "switching to post-copy" and "90 MB" in decision["why"]


def test_postcopy_does_not_switch_a_stream_that_is_no_longer_active() -> None:
    policy = Convergence(MigrationParams(postcopy=True), 0.0)
    held = replace(sample(2, 5.0), status="pre-switchover")
    assert policy.observe(held, 3.0) == [] and not policy.switched
