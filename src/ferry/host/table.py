"""The one owner of this host's domain state.

Which domains run here, which are arriving by migration, what each incoming
migration's outcome was, which domain IDs are taken: all of it lives in one
:class:`DomainTable`, and every change of a domain's lifecycle state goes
through :meth:`DomainTable.transition`, which refuses what the lifecycle
table does not allow and saves the record before anyone acts on the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.domain.migration_state import Outcome
from ferry.domain.state import DomainState, Event, next_state
from ferry.errors import DomainNotFound
from ferry.host.arriving_disks import discard_disks
from ferry.host.layout import HostLayout
from ferry.host.outcomes import OutcomeBook
from ferry.host.running import Incoming, RunningDomain
from ferry.hypervisor import process
from ferry.storage.disks import resolve_disk

log = logging.getLogger("ferryd")


class DomainTable:
    def __init__(self, host_name: str, layout: HostLayout) -> None:
        self.host_name = host_name
        self.layout = layout
        self.outcomes = OutcomeBook(layout.state_dir / "migrations.json")
        self._domains: dict[str, RunningDomain] = {}
        self._incoming: dict[str, Incoming] = {}
        # Handed over to another host, their QEMUs still ending: no longer
        # ours (not listed, not found), but they still hold memory and disks.
        self._leaving: list[RunningDomain] = []
        # Held while a name, a disk or memory is being claimed (create, prepare),
        # so that two requests never both see the same thing free.
        self.claim_lock = asyncio.Lock()
        # Set on every change of who is here or in what state (for whoever
        # publishes this host's domains); the waiter clears it.
        self.changed = asyncio.Event()

    # -- lookups ---------------------------------------------------------------

    def get(self, name: str) -> RunningDomain:
        try:
            return self._domains[name]
        except KeyError:
            raise DomainNotFound(
                f"domain '{name}' does not exist on host {self.host_name}"
            ) from None

    def find(self, name: str) -> RunningDomain | None:
        return self._domains.get(name)

    def running(self) -> list[RunningDomain]:
        return list(self._domains.values())

    def everyone(self) -> list[RunningDomain]:
        """Running domains and arriving ones, in domain-ID order."""
        arriving = [i.dom for i in self._incoming.values()]
        return sorted([*self._domains.values(), *arriving], key=lambda d: d.record.domid)

    def leaving(self) -> list[RunningDomain]:
        return list(self._leaving)

    async def wait_gone(self, name: str, timeout: float = 15.0) -> None:
        """Until no handed-over copy of ``name`` is left ending here (or ``timeout``).

        A domain migrated away and straight back, or created again, finds its
        name, run directory and disks free, not still held by the old QEMU.
        """
        for dom in [d for d in self._leaving if d.name == name]:
            if dom.watcher is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(dom.watcher), timeout)

    def arriving(self, name: str) -> Incoming | None:
        return next((i for i in self._incoming.values() if i.dom.name == name), None)

    def incoming(self, migration_id: str) -> Incoming | None:
        return self._incoming.get(migration_id)

    def incoming_ids(self) -> list[str]:
        return list(self._incoming)

    def disks_in_use(
        self, roots: Sequence[Path], exclude: RunningDomain | None = None
    ) -> list[tuple[str, str]]:
        return [
            (d.name, resolve_disk(disk, roots))
            for d in [*self.everyone(), *self._leaving]
            if d is not exclude
            for disk in d.record.config.disks
        ]

    def promised_mib(self) -> int:
        """Memory the domains here may still take: QEMU allocates a guest's RAM as
        the guest touches it, and an arriving domain fills all of its RAM."""
        return sum(
            max(0, d.record.config.memory - (process.rss_mib(d.pid) if d.record.pid else 0))
            for d in [*self.everyone(), *self._leaving]
        )

    # -- changes ---------------------------------------------------------------

    def add(self, dom: RunningDomain) -> None:
        self._domains[dom.name] = dom
        self.changed.set()

    def add_incoming(self, arriving: Incoming) -> None:
        self._incoming[arriving.migration_id] = arriving
        self.changed.set()

    def commit_incoming(self, migration_id: str) -> RunningDomain:
        """The arriving domain is this host's now: a running domain like any other."""
        arriving = self._incoming.pop(migration_id)
        self._domains[arriving.dom.name] = arriving.dom
        self.changed.set()
        return arriving.dom

    def leave(self, dom: RunningDomain) -> None:
        """``dom`` is handed over: another host's now, whatever its QEMU still does here."""
        if self._domains.get(dom.name) is dom:
            del self._domains[dom.name]
            self._leaving.append(dom)
            self.changed.set()

    def drop_incoming(self, migration_id: str) -> Incoming | None:
        return self._incoming.pop(migration_id, None)

    def discard(self, dom: RunningDomain) -> None:
        """``dom``'s QEMU has ended: it is no longer here, whatever it was."""
        self.changed.set()
        if dom in self._leaving:
            self._leaving.remove(dom)
        if self._domains.get(dom.name) is dom:
            del self._domains[dom.name]
        for mid, arriving in list(self._incoming.items()):
            if arriving.dom is dom:
                del self._incoming[mid]
                if arriving.deciding:
                    # The store may be committing it right now: the commit, once
                    # it hears the store's answer, settles the outcome and disks.
                    continue
                # Never committed: a copy begun here (--copy-storage) is nobody's.
                discard_disks(dom.record)
                self.decide(mid, Outcome.ABORTED)

    def transition(self, dom: RunningDomain, event: Event) -> DomainState:
        """Apply a lifecycle event to ``dom``; saved before the caller goes on."""
        dom.record.state = next_state(dom.name, dom.record.state, event)
        self.save(dom)
        self.changed.set()
        return dom.record.state

    def save(self, dom: RunningDomain) -> None:
        dom.record.save(self.layout.record_file(dom.record.key))

    def decide(self, migration_id: str, outcome: Outcome) -> None:
        self.outcomes.decide(migration_id, outcome)

    def next_domid(self) -> int:
        counter = self.layout.domid_counter
        try:
            last = int(counter.read_text())
        except (OSError, ValueError):
            last = 0
        used = {d.record.domid for d in [*self.everyone(), *self._leaving]}
        domid = last + 1
        while domid in used:
            domid += 1
        counter.write_text(str(domid))
        return domid


def event_for_qemu_status(state: DomainState, status: Any) -> Event | None:
    """The lifecycle event that brings ``state`` in line with QEMU's own status.

    For changes made behind ferryd's back (QEMU's monitor, a guest watchdog) or
    while ferryd was away: ferry follows QEMU rather than contradict it.
    """
    if not isinstance(status, dict):
        return None
    qemu = status.get("status")
    if qemu == "running" and state is DomainState.PAUSED:
        return Event.UNPAUSE
    if qemu == "running" and state is DomainState.CRASHED:
        return Event.RESTART
    if qemu in ("paused", "suspended") and state is DomainState.RUNNING:
        return Event.PAUSE
    if qemu == "guest-panicked" and state is DomainState.RUNNING:
        return Event.CRASH
    return None
