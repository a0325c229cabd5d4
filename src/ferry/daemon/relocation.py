"""The relocation server: TCP 8002 by default, hosts-allow as xend had it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from ferry.config.host import RelocationConfig, hosts_allow_matches
from ferry.errors import FerryError, MigrationRefused
from ferry.migration.channel import MAX_MESSAGE, Channel
from ferry.migration.target import TargetHost, serve_connection

log = logging.getLogger("ferryd")


def peer_names(address: str) -> list[str]:
    """The names a peer's address resolves back to (empty if none)."""
    try:
        name, aliases, _ = socket.gethostbyaddr(address)
    except OSError:
        return []
    return [name, *aliases]


class RelocationServer:
    def __init__(self, config: RelocationConfig, host: TargetHost, local_name: str) -> None:
        self.config = config
        self.host = host
        self.local_name = local_name
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            address = str(writer.get_extra_info("peername")[0])
            task.set_name(f"relocation connection from {address}")
            channel = Channel(reader, writer, address)
            names = await asyncio.to_thread(peer_names, address)
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
