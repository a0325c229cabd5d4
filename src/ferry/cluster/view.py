"""The whole cluster as etcd knows it: hosts with their health, domains with their owner.

Read from any host (and, through its control API, from the management
station). Ownership comes from ``domains/`` (the truth); each domain's state
and each host's capacity from what the host last published under ``hosts/``.
A host whose key is gone has lost its lease: it shows as ``lost`` with the
domains etcd last knew of it, until their keys have gone too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ferry.cluster.etcd import EtcdClient
from ferry.cluster.keys import Keys, decode

# Published more than this long ago while the lease still holds: the host's
# ferryd is not publishing (hung, or gone with its lease taken up by nobody).
STALE_S = 30.0


async def host_rows(etcd: EtcdClient, keys: Keys) -> list[dict[str, Any]]:
    hosts, maint = await asyncio.gather(
        etcd.get_prefix(keys.hosts), etcd.get_prefix(keys.maintenances)
    )
    in_maintenance = {keys.name_of(e.key, keys.maintenances): e for e in maint}
    rows = []
    for entry in hosts:
        name = keys.name_of(entry.key, keys.hosts)
        info = decode(entry.value, entry.key)
        ttl = await etcd.time_to_live(entry.lease) if entry.lease else -1
        age = time.time() - float(info.get("updated", 0))
        health = "fenced" if info.get("fenced") else "up"
        if age > STALE_S:
            health = "stale"
        rows.append(
            {
                "host": name,
                "health": health,
                "maintenance": name in in_maintenance,
                "lease_ttl_left": ttl,
                "lease_ttl": info.get("lease_ttl"),
                "published_s_ago": round(age, 1),
                "address": info.get("address"),
                "relocation_port": info.get("relocation_port"),
                "control_port": info.get("control_port"),
                "cpus": info.get("cpus"),
                "memory_mib": info.get("memory_mib"),
                "free_mib": info.get("free_mib"),
                "domains": len(info.get("domains", [])),
                "accel": info.get("accel"),
                "version": info.get("version"),
                "mode": "cluster, INSECURE (no TLS)" if info.get("insecure") else "cluster",
            }
        )
    for name in sorted(set(in_maintenance) - {r["host"] for r in rows}):
        rows.append({"host": name, "health": "lost", "maintenance": True, "mode": "cluster"})
    return sorted(rows, key=lambda r: str(r["host"]))


async def domain_rows(etcd: EtcdClient, keys: Keys) -> list[dict[str, Any]]:
    """Every owned domain, with its state as its owner last published it; and the HA
    domains that nobody runs: waiting for their restart, or whose restart failed."""
    owners, hosts, has = await asyncio.gather(
        etcd.get_prefix(keys.domains), etcd.get_prefix(keys.hosts), etcd.get_prefix(keys.has)
    )
    published: dict[tuple[str, str], dict[str, Any]] = {}
    alive: set[str] = set()
    for entry in hosts:
        host = keys.name_of(entry.key, keys.hosts)
        alive.add(host)
        for row in decode(entry.value, entry.key).get("domains", []):
            if isinstance(row, dict):
                published[(host, str(row.get("name")))] = row
    rows = []
    owned: set[tuple[str, str]] = set()
    for entry in owners:
        name = keys.name_of(entry.key, keys.domains)
        owner = decode(entry.value, entry.key)
        host = str(owner.get("host"))
        owned.add((host, name))
        row = published.get((host, name), {})
        state = row.get("state", "unknown") if host in alive else "host lost"
        rows.append(
            {
                "host": host,
                "name": name,
                "id": row.get("id"),
                "mem": row.get("mem"),
                "vcpus": row.get("vcpus"),
                "state": state,
                "flags": row.get("flags", ""),
                "since": owner.get("since"),
                "migration": owner.get("migration"),
            }
        )
    # A copy that a host publishes but does not own: arriving by migration.
    for (host, name), row in published.items():
        if (host, name) not in owned:
            rows.append(
                {"host": host, "name": name, "id": row.get("id"), "mem": row.get("mem"),
                 "vcpus": row.get("vcpus"), "state": row.get("state", "unknown"),
                 "flags": row.get("flags", ""), "since": None, "migration": None}
            )  # fmt: skip
    owned_names = {name for _, name in owned}
    for entry in has:
        name = keys.name_of(entry.key, keys.has)
        if name in owned_names:
            continue
        record = decode(entry.value, entry.key)
        found = record.get("config")
        config: dict[str, Any] = found if isinstance(found, dict) else {}
        failed = record.get("state") == "failed"
        rows.append(
            {"host": str(record.get("by") or "-"), "name": name, "id": None,
             "mem": config.get("memory"), "vcpus": config.get("vcpus"),
             "state": "restart failed" if failed else "awaiting restart",
             "flags": "", "since": record.get("at"), "migration": None,
             "error": record.get("error")}
        )  # fmt: skip
    return sorted(rows, key=lambda r: (str(r["host"]), str(r["name"])))
