"""What the dashboard's buttons do: each one request to the ferryd that owns the domain or host."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from ferry.dashboard.cluster_view import ClusterView
from ferry.errors import FerryError
from ferry.util.tasks import spawn

log = logging.getLogger("ferry.dashboard")

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DOMAIN_OPS = ("pause", "unpause", "migrate")
HOST_OPS = ("evacuate", "activate")


class ActionError(Exception):
    """A button's request that cannot be done; its message goes back to the page."""


async def perform(view: ClusterView, state: dict[str, Any], body: Any) -> str:
    if not isinstance(body, dict):
        raise ActionError("an action is a JSON object")
    op = body.get("op")
    if op in DOMAIN_OPS:
        name = _name(body, "name")
        row = next((d for d in state.get("domains", []) if d.get("name") == name), None)
        if row is None:
            raise ActionError(f"no domain {name} in the cluster")
        host = _host(state, str(row.get("host")))
        if op == "migrate":
            target = _host(state, _name(body, "to"))
            # Long: it runs on; its progress shows in the migrations table.
            spawn(_migrate(view, host, name, target), f"dashboard migrate {name}")
            return f"migrating {name} from {host['host']} to {target['host']}"
        await _call(view, host, op, name=name)
        return f"{op}d {name}"
    if op in HOST_OPS:
        host = _host(state, _name(body, "host"))
        if op == "evacuate":
            spawn(_evacuate(view, host), f"dashboard evacuate {host['host']}")
            return f"evacuating {host['host']}"
        await _call(view, host, "host_activate", host=host["host"])
        return f"{host['host']} active again"
    raise ActionError(f"unknown action {op!r}")


def _name(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ActionError(f"'{key}' must be a domain or host name")
    return value


def _host(state: dict[str, Any], name: str) -> dict[str, Any]:
    host = next((h for h in state.get("hosts", []) if h.get("host") == name), None)
    if host is None:
        raise ActionError(f"no host {name} in the cluster")
    return dict(host)


async def _call(view: ClusterView, at: dict[str, Any], op: str, **args: Any) -> Any:
    def call() -> Any:
        return view.source.client_of(at).call(op, **args)

    try:
        return await asyncio.to_thread(call)
    except FerryError as err:
        raise ActionError(str(err)) from err


async def _migrate(
    view: ClusterView, host: dict[str, Any], name: str, target: dict[str, Any]
) -> None:
    """Live, to the address and relocation port the cluster publishes for the target."""
    request = {
        "name": name,
        "host": str(target.get("address") or target["host"]),
        "port": target.get("relocation_port"),
        "params": {"live": True},
    }

    def call() -> Any:
        return view.source.client_of(host).call_stream("migrate", None, **request)

    try:
        await asyncio.to_thread(call)
    except FerryError as err:
        log.warning("dashboard: migration of %s to %s: %s", name, target["host"], err)


async def _evacuate(view: ClusterView, host: dict[str, Any]) -> None:
    def call() -> Any:
        client = view.source.client_of(host)
        return client.call_stream("evacuate", None, host=host["host"], to=[], params={"live": True})

    try:
        await asyncio.to_thread(call)
    except FerryError as err:
        log.warning("dashboard: evacuation of %s: %s", host["host"], err)
