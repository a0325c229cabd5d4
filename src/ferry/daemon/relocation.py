"""The relocation server: TCP 8002 by default, mutual TLS, hosts-allow as xend had it
but matched whole, against the certificate's names and the address."""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

from ferry.config.host import RelocationConfig, hosts_allow_matches
from ferry.daemon.listener import Connection, Limits, Listener
from ferry.errors import MigrationRefused
from ferry.migration.channel import MAX_MESSAGE, Channel
from ferry.migration.target import TargetHost, refuse, serve_connection
from ferry.pki.credentials import Credentials
from ferry.pki.identity import Role
from ferry.util.metrics import Metrics

log = logging.getLogger("ferryd")

# Bounds on what peers can take before they have proved anything: a flood of
# connections must not exhaust descriptors, memory or the DNS threads.
MAX_CONNECTIONS = 64
MAX_PER_PEER = 8
DNS_TIMEOUT = 5.0
DNS_THREADS = 4


def peer_names(address: str) -> list[str]:
    """The names of a peer's address that resolve forward to that address again.

    A PTR record alone proves nothing (whoever controls the address's reverse
    zone writes what it likes): a name counts only if it resolves back to the
    very address the connection came from (forward-confirmed reverse DNS).
    """
    try:
        name, aliases, _ = socket.gethostbyaddr(address)
    except OSError:
        return []
    confirmed = []
    for candidate in dict.fromkeys([name, *aliases]):
        try:
            infos = socket.getaddrinfo(candidate, None, type=socket.SOCK_STREAM)
        except OSError:
            continue
        if any(info[4][0] == address for info in infos):
            confirmed.append(candidate)
    return confirmed


class RelocationServer:
    def __init__(
        self,
        config: RelocationConfig,
        host: TargetHost,
        local_name: str,
        credentials: Credentials | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.host = host
        self.local_name = local_name
        self.credentials = credentials
        self.listener = Listener(
            "relocation",
            config.address,
            config.port,
            credentials,
            self._serve,
            Limits(total=MAX_CONNECTIONS, per_peer=MAX_PER_PEER, line=MAX_MESSAGE),
        )
        # Its own threads: a slow reverse DNS must not stall the default pool.
        self._dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="relocation-dns")

    async def start(self) -> None:
        await self.listener.start()

    @property
    def port(self) -> int:
        """The port it listens on (the configured one, or the one given for port 0)."""
        return self.listener.port

    async def close(self) -> None:
        await self.listener.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, conn: Connection) -> None:
        channel = Channel(conn.reader, conn.writer, conn.address, conn.peer)
        refusal = conn.refusal or await self._refusal(conn)
        if refusal is not None:
            await refuse(channel, MigrationRefused(refusal, "access"), self.metrics)
            return
        if self.credentials is None:
            kinds = frozenset({"hello", "data", "status"})
        elif conn.peer is None:
            # QEMU's own TLS protects the memory stream; nothing else goes plain.
            kinds = frozenset({"data"})
        else:
            kinds = frozenset({"hello", "status"})
        await serve_connection(channel, self.host, self.local_name, kinds, self.metrics)

    async def _refusal(self, conn: Connection) -> str | None:
        """Why this peer may not talk to us, or None."""
        peer = conn.peer
        if peer is not None and peer.role is not Role.HOST:
            return (
                f"host {self.local_name} takes relocations from hosts only, "
                f"not from the certificate of {peer}"
            )
        if peer is None and self.credentials is not None:
            return None  # a memory stream: its token and QEMU's TLS decide
        names = list(peer.names()) if peer is not None else await self._names(conn.address)
        if hosts_allow_matches(self.config.hosts_allow, conn.address, names):
            return None
        who = f"{conn.address} ({', '.join(names)})" if names else conn.address
        log.warning("relocation refused for %s by hosts-allow", who)
        return f"host {self.local_name} does not allow relocations from {who} (hosts-allow)"

    async def _names(self, address: str) -> list[str]:
        if not self.config.hosts_allow:
            return []  # everyone is allowed: no lookup to wait for
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(DNS_TIMEOUT):
                return await loop.run_in_executor(self._dns, peer_names, address)
        except TimeoutError:
            log.warning(
                "reverse DNS of %s took over %.0f s; judged by address", address, DNS_TIMEOUT
            )
            return []
