"""When pre-copy does not converge: the downtime schedule, and when to give up.

QEMU's auto-converge throttles the guest's vCPUs by itself, pass after pass,
while the guest dirties memory faster than the link sends it. On top of it
ferry steps the downtime limit along a fixed schedule (as oVirt's convergence
schedule does), up to the operator's cap, when the pre-copy stalls: the
dirty memory left at the start of a pass did not shrink by a tenth over
``stall_passes`` passes, or ``converge_after_s`` passed since the last step
(on a slow link one pass lasts long). Past the cap, only the throttle is left;
if the migration is still not done after ``converge_timeout_s`` it is
cancelled with the reason, and the VM keeps running on the source (as xl's
``--abort-if-busy``). Every decision is kept, with when and why.

With ``--postcopy`` (an opt-in: see MigrationParams.postcopy) none of that
applies: the migration switches to post-copy when the first pass is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.migration.params import MigrationParams
from ferry.migration.progress import Progress

SCHEDULE_MS = (100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000)
AIM = 1 / 3  # the first throttle leaves the guest this share of what the stream sends
SHRINK = 0.9  # a pass "progresses" when it starts with less than 90 % of the last one's dirt


@dataclass(frozen=True)
class SetDowntime:
    limit_ms: int


@dataclass(frozen=True)
class SetFirstThrottle:
    pct: int  # QEMU's cpu-throttle-initial, before auto-converge first bites


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class StartPostcopy:
    """Switch to post-copy: the target runs the VM and pulls the pages it lacks."""


Action = SetDowntime | SetFirstThrottle | GiveUp | StartPostcopy


@dataclass
class Convergence:
    params: MigrationParams
    started: float
    limit_ms: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    _pass: int = 0
    _pass_remaining: int | None = None
    _stalled: int = 0
    _last_step: float = 0.0
    _throttle: int = 0
    _first_throttle: int = 0
    _first_pass_end: float | None = None
    switched: bool = False  # to post-copy

    def __post_init__(self) -> None:
        self.limit_ms = self.params.max_downtime_ms
        self._last_step = self.started
        self._first_throttle = self.params.throttle_initial_pct

    def observe(self, p: Progress, now: float) -> list[Action]:
        """One ``query-migrate`` sample; what to do now, if anything."""
        actions: list[Action] = []
        if self.params.postcopy:
            return self._postcopy_for(p, now)
        first = self._first_throttle_for(p, now)
        if first is not None:
            actions.append(first)
        step = self._step(p, now)
        if step is not None:
            actions.append(step)
        return actions

    def _postcopy_for(self, p: Progress, now: float) -> list[Action]:
        """Post-copy, opted into: switch once the first pass has copied all of RAM.

        What is still dirty then could not go in one stop (else QEMU would
        have finished), and every further pass re-sends what the guest
        dirties again. After the switch each page crosses once more at most.
        """
        if self.switched or p.passes < 2 or p.status != "active":
            return []
        self.switched = True
        self._note(
            now, p, "switching to post-copy",
            f"the first pass is done and {p.remaining / 1e6:.0f} MB are still dirty: the "
            "target runs the VM now and fetches those pages from here",
        )  # fmt: skip
        return [StartPostcopy()]

    def _first_throttle_for(self, p: Progress, now: float) -> SetFirstThrottle | None:
        """Size QEMU's first throttle from the measured rates, before it bites.

        Throttling the vCPUs by t scales the dirty rate by about (1 - t); the
        first throttle aims at a third of the pages the stream sends, so that
        the passes shrink from there on instead of after several steps, each
        two passes apart. Measured here (one run each), a guest dirtying
        25 MiB/s over 100 Mbit: 96 s with QEMU's throttle steps (20 + 10 %),
        75 s with 50 + 25 %, 59.3 s sizing the first throttle to half, 59.6 s
        to a third. QEMU applies it only at the fourth pass, whatever the size:
        that, not the size, is what is left to win.
        """
        if not self.params.auto_converge or self._throttle or p.passes < 2 or p.dirty_rate <= 0:
            return None
        sent_pages_s = p.rate_mbit * 1e6 / 8 / 4096
        if sent_pages_s <= 0 or sent_pages_s >= p.dirty_rate:
            return None
        wanted = 100 * (1 - AIM * sent_pages_s / p.dirty_rate)
        pct = min(99, max(self.params.throttle_initial_pct, round(wanted / 5) * 5))
        if pct <= self._first_throttle:
            return None
        self._note(
            now, p, f"first vCPU throttle set to {pct} %",
            f"the guest dirties {p.dirty_rate * 4096 / 1e6:.1f} MB/s, the stream sends "
            f"{sent_pages_s * 4096 / 1e6:.1f} MB/s of pages",
        )  # fmt: skip
        self._first_throttle = pct
        return SetFirstThrottle(pct)

    def _step(self, p: Progress, now: float) -> SetDowntime | GiveUp | None:
        if p.throttle_pct > self._throttle:
            self._throttle = p.throttle_pct
            self._note(
                now,
                p,
                f"QEMU throttles the guest's vCPUs to {p.throttle_pct} %",
                "auto-converge: the guest dirties memory faster than the link sends it",
            )
        if p.passes > self._pass:
            if self._pass >= 2 and self._pass_remaining is not None:
                shrank = p.remaining < self._pass_remaining * SHRINK
                self._stalled = 0 if shrank else self._stalled + 1
            self._pass, self._pass_remaining = p.passes, p.remaining
        if p.passes < 2:
            # The first pass copies all of RAM: however long it takes, that is
            # no sign of a guest outrunning the link. The clocks start after it.
            return None
        if self._first_pass_end is None:
            self._last_step = self._first_pass_end = now
        timeout = self.params.converge_timeout_s
        since = now - self._first_pass_end
        if timeout and since >= timeout and p.status == "active":
            return GiveUp(self._give_up_reason(p, now))
        stalled = self._stalled >= self.params.stall_passes
        slow = now - self._last_step >= self.params.converge_after_s
        if not (stalled or slow) or self.limit_ms >= self.params.max_downtime_cap_ms:
            return None
        new = next((s for s in SCHEDULE_MS if s > self.limit_ms), self.params.max_downtime_cap_ms)
        new = min(new, self.params.max_downtime_cap_ms)
        why = (
            f"{self._stalled} passes without the dirty memory shrinking"
            if stalled
            else f"not done {now - self._last_step:.0f} s after the last step"
        )
        self._note(now, p, f"downtime limit {self.limit_ms} -> {new} ms", why)
        self.limit_ms, self._stalled, self._last_step = new, 0, now
        return SetDowntime(new)

    def _note(self, now: float, p: Progress, decision: str, why: str) -> None:
        self.decisions.append(
            {"t_s": round(now - self.started, 1), "pass": p.passes, "decision": decision,
             "why": why}
        )  # fmt: skip

    def _give_up_reason(self, p: Progress, now: float) -> str:
        dirty_mb_s = p.dirty_rate * 4096 / 1e6
        link_mb_s = p.rate_mbit / 8
        return (
            f"not converging {now - (self._first_pass_end or now):.0f} s after the first pass "
            f"({p.passes} passes): "
            f"{p.remaining / 1e6:.0f} MB still dirty, the guest dirties {dirty_mb_s:.1f} MB/s "
            f"against {link_mb_s:.1f} MB/s sent, with the downtime limit at {self.limit_ms} ms "
            f"(cap {self.params.max_downtime_cap_ms}) and the vCPUs throttled to "
            f"{p.throttle_pct} %; the domain keeps running here (raise --max-downtime, or "
            "migrate when the guest is less busy)"
        )
