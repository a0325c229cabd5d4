"""What the dashboard shows, from the cluster's ferryds, asked with the operator's credentials.

One ferryd (the local socket, or ``--host``) answers for the cluster: its
hosts and every domain (from etcd; a standalone host: its own). Each host's
ferryd is then asked for its migrations, over mutual TLS with the same
credentials, at the address the cluster publishes for it. A host that does
not answer is shown as such; nothing stops the page for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.client.daemon_client import DaemonClient
from ferry.errors import FerryError
from ferry.pki.credentials import Credentials

ASK_TIMEOUT = 3.0
PLAYER_POINTS = 600  # a minute of the player's buffer at its 0.1 s status interval


@dataclass
class Source:
    """How to reach the cluster: one ferryd to ask first, and the credentials for the rest."""

    first: Callable[[], DaemonClient]
    credentials: Credentials | None = None
    role: str = "admin"  # the local root socket is an admin's; else the certificate's role

    def client_of(self, host: dict[str, Any]) -> DaemonClient:
        """That host's ferryd: the one we ask first if it is that host, else over TLS."""
        if self.credentials is None or not host.get("control_port"):
            return self.first()
        address = str(host.get("address") or host["host"])
        return DaemonClient(
            remote=(address, int(host["control_port"])), credentials=self.credentials
        )


@dataclass
class ClusterView:
    source: Source
    player_status: Path | None = None
    player: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=PLAYER_POINTS))

    async def snapshot(self) -> dict[str, Any]:
        hosts, domains, error = await asyncio.to_thread(self._cluster)
        asked = await asyncio.gather(*(asyncio.to_thread(self._migrations, h) for h in hosts))
        migrations: list[dict[str, Any]] = []
        recent: list[dict[str, Any]] = []
        for host, answer in zip(hosts, asked, strict=True):
            if answer is None:
                host["dashboard_error"] = "its ferryd did not answer the dashboard"
                continue
            migrations += [m | {"source": host["host"]} for m in answer.get("active", [])]
            recent += answer.get("recent", [])
        recent.sort(key=lambda r: -float(r.get("ended_at", 0)))
        self._read_player()
        return {
            "at": time.time(),
            "role": self.source.role,
            "error": error,
            "hosts": hosts,
            "domains": domains,
            "migrations": migrations,
            "recent": recent[:20],
            "player": list(self.player) if self.player_status else None,
        }

    def _cluster(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
        try:
            client = self.source.first()
            client.timeout = ASK_TIMEOUT
            hosts = list(client.call("host_list"))
            domains = list(client.call("list_all"))
        except FerryError as err:
            return [], [], str(err)
        return hosts, domains, None

    def _migrations(self, host: dict[str, Any]) -> dict[str, Any] | None:
        try:
            client = self.source.client_of(host)
            client.timeout = ASK_TIMEOUT
            answer = client.call("migrations")
        except FerryError:
            return None
        return answer if isinstance(answer, dict) else None

    def _read_player(self) -> None:
        if self.player_status is None:
            return
        try:
            status = json.loads(self.player_status.read_text())
            point = {"t": float(status["t_s"]), "buffer_s": float(status["buffer_s"]),
                     "stalls": float(status["stalls"])}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return
        if not self.player or point["t"] > self.player[-1]["t"]:
            self.player.append(point)
        elif point["t"] < self.player[-1]["t"]:
            self.player.clear()  # a new player run
            self.player.append(point)
