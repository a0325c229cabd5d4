"""This host's etcd lease: granted once, renewed, and known to be valid until when.

Everything the host owns in etcd is bound to this one lease. Its validity is
measured on this host's monotonic clock from the moment a renewal was *sent*
(not answered): etcd restarts the TTL when it receives the renewal, which is
later, so the host always believes its lease ends a little before etcd does.
A host that fences at ``valid_until - margin`` has therefore stopped its VMs
before any other host can see the lease expire (Patroni's rule: demote
before the key can expire).

The lease id is kept in a file, so a ferryd restarted within the TTL keeps
the same lease and what is bound to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ferry.cluster.etcd import EtcdClient
from ferry.errors import ClusterError
from ferry.util.tasks import spawn

log = logging.getLogger("ferryd")


class LeaseState(enum.Enum):
    HELD = "held"  # renewed in time
    LATE = "late"  # renewals fail; still valid for more than the fencing margin
    EXPIRING = "expiring"  # valid for less than the margin: the host must fence now
    LOST = "lost"  # expired (or never granted): nothing is owned under it


_TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.LOST: frozenset({LeaseState.HELD}),
    LeaseState.HELD: frozenset({LeaseState.LATE, LeaseState.EXPIRING, LeaseState.LOST}),
    LeaseState.LATE: frozenset({LeaseState.HELD, LeaseState.EXPIRING, LeaseState.LOST}),
    LeaseState.EXPIRING: frozenset({LeaseState.HELD, LeaseState.LOST}),
}

Listener = Callable[[LeaseState, LeaseState], None]


class HostLease:
    def __init__(self, etcd: EtcdClient, ttl: int, id_file: Path) -> None:
        if ttl < 3:
            raise ClusterError(f"a lease TTL of {ttl} s is too short (at least 3 s)")
        self.etcd = etcd
        self.ttl = ttl
        self.id_file = id_file
        self.id = 0
        self.state = LeaseState.LOST
        self.valid_until = 0.0  # monotonic
        self.confirmed_at = 0.0  # monotonic: when the last good renewal was sent
        # Renewals since this object began, by result (for the metrics).
        self.renewals = {"ok": 0, "failed": 0}
        self._listeners: list[Listener] = []
        self._renewed: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Set on every confirmation: the deadline watcher starts its count again.
        self._wake = asyncio.Event()

    @property
    def interval(self) -> float:
        # Three tries within one TTL (ttl > 2 x loop_wait, with a retry to spare).
        return self.ttl / 4

    @property
    def margin(self) -> float:
        """Fence this long before the lease may expire: pausing every VM takes
        milliseconds; the rest covers a host that was itself slow to run."""
        return self.ttl / 4

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_renewed(self, listener: Callable[[], None]) -> None:
        self._renewed.append(listener)

    def remaining(self) -> float:
        return max(0.0, self.valid_until - time.monotonic())

    def _move(self, new: LeaseState) -> None:
        old = self.state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise ClusterError(f"lease {self.id:x}: no transition {old.value} -> {new.value}")
        self.state = new
        log.log(
            logging.INFO if new is LeaseState.HELD else logging.WARNING,
            "etcd lease %x: %s -> %s (valid for %.1f s more)",
            self.id, old.value, new.value, self.remaining(),
        )  # fmt: skip
        for listener in self._listeners:
            listener(old, new)

    def previous_id(self) -> int:
        """The lease id a previous run left in the id file (0: none)."""
        return _read_id(self.id_file)

    async def acquire(self) -> bool:
        """Take up the lease of a previous run if it is still alive, else a new one.

        True if the previous lease was taken up (what it owned is still ours).
        """
        previous = _read_id(self.id_file)
        if previous:
            sent = time.monotonic()
            left = await self.etcd.keepalive(previous)
            if left > 0:
                self.id = previous
                self._confirmed(sent, left)
                log.info("etcd lease %x of the previous run taken up (%d s left)", previous, left)
                return True
        sent = time.monotonic()
        self.id = await self.etcd.grant(self.ttl)
        self.id_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.id_file.with_suffix(".tmp")
        tmp.write_text(f"{self.id}\n")
        tmp.replace(self.id_file)
        self._confirmed(sent, self.ttl)
        log.info("etcd lease %x granted (TTL %d s)", self.id, self.ttl)
        return False

    def _confirmed(self, sent: float, left: int) -> None:
        self.confirmed_at = sent
        self.valid_until = sent + left
        self._wake.set()
        self._move(LeaseState.HELD)
        for listener in self._renewed:
            listener()

    async def renew(self) -> None:
        """One renewal; the state follows what etcd said (or that it said nothing)."""
        sent = time.monotonic()
        try:
            left = await self.etcd.keepalive(self.id)
        except ClusterError as err:
            # Unavailable or refused, a renewal that failed is only that: the
            # deadline (this host's clock) decides, and renewals go on until it.
            log.warning("etcd lease %x not renewed: %s", self.id, err)
            self.renewals["failed"] += 1
            if self.state is LeaseState.HELD:
                self._move(LeaseState.LATE)
            self._check_deadline()
            return
        if self.state is LeaseState.LOST:
            return  # too late: declared lost on this host's clock, whatever etcd says
        if left <= 0:
            self.renewals["failed"] += 1
            self.valid_until = 0.0
            self._move(LeaseState.LOST)
            return
        self.renewals["ok"] += 1
        self._confirmed(sent, left)

    def _check_deadline(self) -> None:
        if self.state is LeaseState.LOST:
            return
        left = self.valid_until - time.monotonic()
        if left <= 0:
            self._move(LeaseState.LOST)
        elif left <= self.margin and self.state is not LeaseState.EXPIRING:
            self._move(LeaseState.EXPIRING)

    def start(self) -> None:
        self._tasks = [
            spawn(self._renewals(), f"renew etcd lease {self.id:x}"),
            spawn(self._deadlines(), f"deadlines of etcd lease {self.id:x}"),
        ]

    async def _renewals(self) -> None:
        while self.state is not LeaseState.LOST:
            # Late, retry at once (each try is bounded by the client's timeout).
            await asyncio.sleep(self.interval if self.state is LeaseState.HELD else 0.2)
            await self.renew()

    async def _deadlines(self) -> None:
        """Declare EXPIRING and LOST on time, even while a renewal hangs."""
        while self.state is not LeaseState.LOST:
            left = self.valid_until - time.monotonic()
            wait = left - self.margin if left > self.margin else left
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait) + 0.001):
                    await self._wake.wait()
            self._wake.clear()
            self._check_deadline()
        log.error("etcd lease %x is lost: this host owns nothing in the cluster now", self.id)

    async def close(self, revoke: bool = False) -> None:
        """Stop renewing. ``revoke``: give everything up now (a host leaving the cluster)."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if revoke and self.id:
            with contextlib.suppress(ClusterError):
                await self.etcd.revoke(self.id)
            with contextlib.suppress(FileNotFoundError):
                self.id_file.unlink()


def _read_id(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0
