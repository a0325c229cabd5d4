"""``ferry-fencer``: holds this host's etcd lease and fences its QEMUs, ferryd running or not.

One per host, started by ferryd when it is not running, and left running when
ferryd stops or dies, so that a restart of ferryd changes nothing in the
cluster. It knows the QEMUs by their command line (the run directory's domain
sockets), not through ferryd, and acts on them with signals:

- lease **expiring** (renewals failed, less than the margin left): SIGSTOP
  every QEMU of the host. No vCPU runs and QEMU submits no new disk write;
- lease **held** again in time (same lease, so same ownership): SIGCONT them;
- lease **lost**: SIGKILL every QEMU of the host. Their ownership has lapsed,
  and another host may run them now. Then a new lease is sought.

At start, a lease left by a previous fencer that has expired means the same:
every QEMU still running here is ended. While no lease is held yet, the QEMUs
stay stopped. A fencer that dies stops renewing: ferryd sees the status file
go stale and starts a new one, which takes up the same lease if it is still
alive.

Written status (``cluster.lease_status``) tells ferryd the lease's id, state
and deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ferry.cluster.etcd import EtcdClient, parse_endpoints
from ferry.cluster.lease import HostLease, LeaseState
from ferry.cluster.lease_status import LeaseStatus
from ferry.errors import ClusterError, FerryError
from ferry.hypervisor import process
from ferry.pki.credentials import Credentials

log = logging.getLogger("ferry-fencer")

MAX_EVENTS = 32


def fencer_files(run_dir: Path) -> dict[str, Path]:
    return {
        "status": run_dir / "fencer.json",
        "lock": run_dir / "fencer.lock",
        "lease_id": run_dir / "etcd-lease",
        "pid": run_dir / "fencer.pid",
    }


class Fencer:
    def __init__(self, lease: HostLease, run_dir: Path) -> None:
        self.lease = lease
        self.run_dir = run_dir
        self.files = fencer_files(run_dir)
        # QEMUs a previous fencer stopped are ours to let go or kill now.
        previous = LeaseStatus.read(self.files["status"])
        self.stopped: set[int] = {
            pid for pid in (previous.stopped if previous else []) if process.is_alive(pid)
        }
        self.events: list[dict[str, object]] = previous.events if previous else []
        # Counters go on from where a previous fencer left them (they are
        # Prometheus counters: a reset would read as a restart of ferryd).
        self.renewals_before = dict(previous.renewals) if previous else {}
        self.event_counts: dict[str, int] = dict(previous.event_counts) if previous else {}
        self.lost_at: float | None = None
        lease.on_change(self._changed)
        lease.on_renewed(self.write_status)

    # -- the host's QEMUs ------------------------------------------------------

    def qemus(self) -> list[int]:
        marker = str(self.run_dir / "domains").encode() + b"/"
        return sorted(process.processes(b"-qmp", marker))

    def _signal(self, sig: signal.Signals, pids: list[int]) -> list[int]:
        done = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                done.append(pid)
            except ProcessLookupError:
                pass
        return done

    def stop_all(self, why: str) -> None:
        start = time.monotonic()
        pids = self._signal(signal.SIGSTOP, self.qemus())
        self.stopped.update(pids)
        self._event("stopped", why, pids, since_confirmed=start - self.lease.confirmed_at)

    def let_go(self) -> None:
        pids = self._signal(signal.SIGCONT, sorted(self.stopped))
        self.stopped.clear()
        if pids:
            self._event("continued", "the lease was renewed in time", pids)

    def kill_all(self, why: str) -> None:
        pids = self._signal(signal.SIGKILL, self.qemus())
        # A stopped process takes SIGKILL as it is; nothing to continue.
        self.stopped.clear()
        self._event("killed", why, pids)

    def _event(self, kind: str, why: str, pids: list[int], **extra: float) -> None:
        event: dict[str, object] = {"event": kind, "why": why, "pids": pids, "at": time.time()}
        event.update({k: round(v, 3) for k, v in extra.items()})
        self.events = [*self.events, event][-MAX_EVENTS:]
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        level = logging.INFO if kind == "continued" else logging.ERROR
        log.log(level, "FENCING: %s %d QEMU(s): %s", kind, len(pids), why)
        self.write_status()

    # -- the lease -------------------------------------------------------------

    def _changed(self, old: LeaseState, new: LeaseState) -> None:
        if new is LeaseState.EXPIRING:
            self.stop_all(f"lease {self.lease.id:x} expires in {self.lease.remaining():.1f} s")
        elif new is LeaseState.LOST:
            self.kill_all(f"lease {self.lease.id:x} is lost")
            self.lost_at = time.monotonic()
        elif new is LeaseState.HELD and old is not LeaseState.LOST:
            self.let_go()
        self.write_status()

    def write_status(self) -> None:
        LeaseStatus(
            pid=os.getpid(),
            lease_id=self.lease.id,
            state=self.lease.state.value,
            valid_until=self.lease.valid_until,
            margin=self.lease.margin,
            ttl=self.lease.ttl,
            stopped=sorted(self.stopped),
            events=self.events,
            renewals={
                result: self.renewals_before.get(result, 0) + count
                for result, count in self.lease.renewals.items()
            },
            event_counts=self.event_counts,
        ).write(self.files["status"])

    async def acquire(self) -> None:
        """Until a lease is held; the QEMUs here stay stopped until then."""
        had_lease = self.lease.previous_id() != 0
        delay = 0.2
        while True:
            try:
                taken_up = await self.lease.acquire()
                break
            except ClusterError as err:
                if self.qemus() and not self.stopped:
                    self.stop_all(f"no etcd lease can be confirmed: {err}")
                log.warning("no etcd lease yet: %s", err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if taken_up:
            self.let_go()
        elif had_lease and self.qemus():
            self.kill_all("the previous lease expired while nobody renewed it")
        else:
            self.let_go()
        self.write_status()

    async def run(self) -> None:
        while True:
            await self.acquire()
            self.lease.start()
            while self.lease.state is not LeaseState.LOST:
                await asyncio.sleep(self.lease.interval)
            await self.lease.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ferry-fencer", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--etcd", action="append", required=True, help="an etcd client URL")
    parser.add_argument("--ttl", type=int, default=6)
    parser.add_argument("--pki-dir", type=Path, help="this host's credentials (https:// etcd)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    files = fencer_files(args.run_dir)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    lock = files["lock"].open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FerryError(f"a fencer already runs for {args.run_dir}") from None
    files["pid"].write_text(f"{os.getpid()}\n")
    endpoints = parse_endpoints(args.etcd, "ferry-fencer --etcd")
    credentials = Credentials(args.pki_dir) if args.pki_dir else None
    lease = HostLease(EtcdClient(endpoints, credentials, timeout=args.ttl / 4), args.ttl,
                      files["lease_id"])  # fmt: skip
    fencer = Fencer(lease, args.run_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(fencer.run())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    # Stopping the fencer (not crashing it) is for a host leaving the cluster
    # or its tests; the lease is left to expire, never revoked, so that a
    # QEMU still running here is never left unfenced with its keys gone.
    task.cancel()
    waiter.cancel()
    await lease.close()
    await lease.etcd.close()
    lock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s ferry-fencer[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(args))
    except FerryError as err:
        print(f"ferry-fencer: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
