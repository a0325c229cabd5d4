"""``ferry host evacuate``: this host in maintenance, and every domain live-migrated away.

Run by the ferryd of the host being emptied (it is every migration's
source). The maintenance key goes in first, so no new domain lands here
while the others leave (``create`` and ``prepare`` both refuse). Targets are
the hosts etcd shows up and not in maintenance (or those the operator
named), each domain to the one with the most memory left after what this
evacuation already sent there. At most ``parallel`` migrations run at once.
A migration that fails leaves its domain here, as every failed migration
does, and the evacuation goes on with the others and reports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ferry.daemon.cluster_member import ClusterMember
from ferry.daemon.services import Services
from ferry.domain.state import DomainState
from ferry.errors import ClusterError, FerryError
from ferry.host.running import RunningDomain
from ferry.migration.params import MigrationParams
from ferry.storage.new_disk import copied_disks

log = logging.getLogger("ferryd")

Emit = Callable[[dict[str, Any]], None]
MAX_PARALLEL = 8
MOVABLE = (DomainState.RUNNING, DomainState.PAUSED)


def plan_targets(
    domains: Sequence[tuple[str, int]], hosts: Sequence[dict[str, Any]]
) -> dict[str, str]:
    """Each domain (name, MiB) to the host with the most memory left, largest first."""
    free = {str(h["host"]): int(h.get("free_mib") or 0) for h in hosts}
    plan: dict[str, str] = {}
    for name, mib in sorted(domains, key=lambda d: -d[1]):
        target = max(free, key=lambda h: (free[h], h))
        plan[name] = target
        free[target] -= mib
    return plan


class Evacuation:
    def __init__(self, services: Services) -> None:
        self.services = services

    def _member(self) -> ClusterMember:
        member = self.services.cluster
        if member is None:
            raise ClusterError(
                f"host {self.services.host.name} is standalone (no [cluster] etcd): no host "
                "knows where its domains could go, and it has no maintenance; migrate them "
                "one by one"
            )
        return member

    async def run(
        self, targets: Sequence[str], parallel: int, params: MigrationParams, emit: Emit
    ) -> dict[str, Any]:
        s = self.services
        me = s.host.name
        member = self._member()
        if not 1 <= parallel <= MAX_PARALLEL:
            raise FerryError(f"--parallel {parallel}: expected 1..{MAX_PARALLEL}")
        candidates = await self._candidates(targets)
        await member.ownership.set_maintenance(me, True, by=f"evacuate on {me}")
        emit({"event": "maintenance", "host": me})
        domains = [d for d in s.table.running() if d.record.state in MOVABLE]
        if domains and not candidates:
            raise ClusterError(
                f"host {me} is in maintenance, but no host is up and out of maintenance to "
                "take its domains"
            )
        plan = plan_targets([(d.name, d.record.config.memory) for d in domains], candidates)
        # Dialled by the address a host publishes, else by its name (the TLS
        # check wants the target's certificate to name whichever it is).
        where = {
            str(h["host"]): (
                str(h.get("address") or h["host"]),
                int(h.get("relocation_port") or 8002),
            )
            for h in candidates
        }
        emit({"event": "plan", "plan": plan})
        gate = asyncio.Semaphore(parallel)
        results = await asyncio.gather(
            *(self._move(d, plan[d.name], where[plan[d.name]], params, gate, emit) for d in domains)
        )
        moved = [r for r in results if r.get("ok")]
        failed = [r for r in results if not r.get("ok")]
        left = [d.name for d in s.table.running()]
        log.info("evacuation of %s: %d moved, %d failed", me, len(moved), len(failed))
        return {"host": me, "maintenance": True, "moved": moved, "failed": failed, "left": left}

    async def _candidates(self, targets: Sequence[str]) -> list[dict[str, Any]]:
        me = self.services.host.name
        hosts = await self._member().hosts()
        usable = [
            h for h in hosts
            if h["host"] != me and h.get("health") == "up" and not h.get("maintenance")
        ]  # fmt: skip
        if not targets:
            return usable
        by_name = {str(h["host"]): h for h in usable}
        for name in targets:
            if name not in by_name:
                known = {str(h["host"]): h for h in hosts}
                why = (
                    "is this host" if name == me
                    else "is not in the cluster" if name not in known
                    else "is in maintenance" if known[name].get("maintenance")
                    else f"is {known[name].get('health')}"
                )  # fmt: skip
                raise ClusterError(f"cannot evacuate {me} to {name}: {name} {why}")
        return [by_name[n] for n in targets]

    async def _move(
        self,
        dom: RunningDomain,
        target: str,
        address: tuple[str, int],
        params: MigrationParams,
        gate: asyncio.Semaphore,
        emit: Emit,
    ) -> dict[str, Any]:
        name = dom.name
        if params.copy_storage and not copied_disks(dom.record.config):
            # Copy what only this host sees; a domain on shared storage just moves.
            params = replace(params, copy_storage=False, sync_writes=False)
        async with gate:
            emit({"event": "start", "domain": name, "target": target})

            def progress(p: dict[str, Any]) -> None:
                emit({"event": "progress", "domain": name, "target": target} | p)

            try:
                result = await self.services.outgoing.migrate(
                    name, address[0], address[1], params, progress
                )
            except FerryError as err:
                emit({"event": "failed", "domain": name, "target": target, "error": str(err)})
                return {"ok": False, "domain": name, "target": target, "error": str(err)}
        emit({"event": "done", "domain": name, "target": target, "total_s": result["total_s"]})
        return {"ok": True, "domain": name, "target": target, "total_s": result["total_s"]}

    async def activate(self, host: str) -> None:
        await self._member().ownership.set_maintenance(host, False, by="")
