"""The relocation server: TCP 8002 by default, hosts-allow as xend had it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

from ferry.config.host import RelocationConfig, hosts_allow_matches
from ferry.errors import FerryError, MigrationRefused
from ferry.migration.channel import MAX_MESSAGE, Channel
from ferry.migration.target import TargetHost, serve_connection

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
    def __init__(self, config: RelocationConfig, host: TargetHost, local_name: str) -> None:
        self.config = config
        self.host = host
        self.local_name = local_name
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_peer: collections.Counter[str] = collections.Counter()
        # Its own threads: a slow reverse DNS must not stall the default pool.
        self._dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="relocation-dns")

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve,
                host=self.config.address or None,
                port=self.config.port,
                limit=MAX_MESSAGE,
                reuse_address=True,
            )
        except OSError as err:
            where = f"{self.config.address or '*'}:{self.config.port}"
            raise FerryError(f"cannot listen for relocations on {where}: {err.strerror}") from err
        log.info("relocation server on %s:%d", self.config.address or "*", self.config.port)

    @property
    def port(self) -> int:
        """The port it listens on (the configured one, or the one given for port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._dns.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        address = str(writer.get_extra_info("peername")[0])
        channel = Channel(reader, writer, address)
        if len(self._tasks) >= MAX_CONNECTIONS or self._per_peer[address] >= MAX_PER_PEER:
            log.warning("relocation connection from %s refused: too many connections", address)
            await channel.send_error(
                MigrationRefused(f"host {self.local_name} has too many relocation connections")
            )
            await channel.close()
            return
        self._tasks.add(task)
        self._per_peer[address] += 1
        task.set_name(f"relocation connection from {address}")
        try:
            names = await self._names(address)
            if not hosts_allow_matches(self.config.hosts_allow, address, names):
                who = f"{address} ({', '.join(names)})" if names else address
                log.warning("relocation refused for %s by hosts-allow", who)
                await channel.send_error(
                    MigrationRefused(
                        f"host {self.local_name} does not allow relocations from {who} "
                        "(hosts-allow)"
                    )
                )
                await channel.close()
                return
            await serve_connection(channel, self.host, self.local_name)
        finally:
            self._tasks.discard(task)
            self._per_peer[address] -= 1
            if self._per_peer[address] <= 0:
                del self._per_peer[address]

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
