"""The control API: JSON lines on a root-only unix socket, and on TCP with mutual TLS.

A request is one line ``{"op": NAME, "args": {...}}``; the answer is one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message"}}``.

Who may ask what:

- the unix socket serves root (or the user ferryd runs as) only: the socket
  lives in a 0700 directory and every peer's credentials are checked; it may
  ask everything;
- the TCP port (8003, for the management station) serves certificates of the
  cluster CA: an ``admin`` may ask everything, a ``viewer`` only what reads
  (:data:`VIEWER_OPS`), and a host's certificate nothing.

``console_attach`` turns the connection, after its reply, into the domain's
serial console: bytes both ways until either side closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.config.host import ControlConfig
from ferry.daemon.evacuation import Evacuation
from ferry.daemon.listener import Connection, Limits, Listener
from ferry.daemon.services import Services
from ferry.errors import AccessDenied, FerryError, ProtocolError, error_to_wire
from ferry.migration.params import MigrationParams
from ferry.pki.identity import Role
from ferry.storage import images
from ferry.util.text import one_line

log = logging.getLogger("ferryd")

MAX_REQUEST = 1 << 20
# What a viewer's certificate may ask: what reads, nothing that changes.
VIEWER_OPS = frozenset({"ping", "list", "info", "list_all", "host_list", "migrations"})
CONSOLE_CHUNK = 65536
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
_DETACHED = object()  # the request took the connection over (a console)
StreamingHandler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[Any]]


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _emitter(writer: asyncio.StreamWriter) -> Callable[[dict[str, Any]], None]:
    def emit(progress: dict[str, Any]) -> None:
        # The client may have gone (Ctrl-C, closed terminal): the work carries
        # on regardless, and so does the daemon.
        if not writer.is_closing():
            writer.write(json.dumps({"progress": progress}).encode() + b"\n")

    return emit


def _arg(args: dict[str, Any], key: str, kind: type) -> Any:
    value = args.get(key)
    if not isinstance(value, kind):
        raise ProtocolError(f"request argument '{key}' must be a {kind.__name__}")
    return value


class ControlServer:
    def __init__(
        self, services: Services, socket_path: Path, tcp: ControlConfig | None = None
    ) -> None:
        self.services = services
        self.domains = services.lifecycle
        self.socket_path = socket_path
        self._server: asyncio.Server | None = None
        self.tcp: Listener | None = None
        if tcp is not None and tcp.enabled and services.credentials is not None:
            self.tcp = Listener(
                "control API",
                tcp.address,
                tcp.port,
                services.credentials,
                self._serve_tcp,
                Limits(total=32, per_peer=8, line=MAX_REQUEST),
            )
        self.handlers: dict[str, Handler] = {
            "ping": self._ping,
            "list": self._list,
            "info": self._info,
            "list_all": self._list_all,
            "host_list": self._host_list,
            "create": self._create,
            "pause": self._pause,
            "unpause": self._unpause,
            "shutdown": self._shutdown,
            "destroy": self._destroy,
            "migrate_abort": self._migrate_abort,
            "host_activate": self._host_activate,
            "disk_create": self._disk_create,
            "save": self._save,
            "migrations": self._migrations,
            "restore": self._restore,
        }
        # Requests that write progress lines before their one final reply.
        self.streaming: dict[str, StreamingHandler] = {
            "migrate": self._migrate,
            "evacuate": self._evacuate,
        }
        self.evacuation = Evacuation(services)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.socket_path), limit=MAX_REQUEST
        )
        os.chmod(self.socket_path, 0o600)
        if self.tcp is not None:
            await self.tcp.start()

    async def close(self) -> None:
        if self.tcp is not None:
            await self.tcp.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name("control connection")
        try:
            uid = _peer_uid(writer)
            if uid not in (0, os.getuid()):
                await self._reply(
                    writer, ProtocolError("permission denied: ferryd serves root only")
                )
                return
            await self._requests(reader, writer, Role.ADMIN, "root")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_tcp(self, conn: Connection) -> None:
        if conn.refusal is not None:
            await self._reply(conn.writer, AccessDenied(conn.refusal))
            return
        if conn.peer is None:
            await self._reply(
                conn.writer,
                AccessDenied(
                    f"ferryd on {self.services.host.name} takes control requests over TLS "
                    "only, with a certificate of the cluster CA"
                ),
            )
            return
        log.info("control connection from %s (%s)", conn.peer, conn.address)
        await self._requests(conn.reader, conn.writer, conn.peer.role, str(conn.peer))

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role: Role, who: str
    ) -> None:
        try:
            while line := await reader.readline():
                reply = await self._dispatch(line, reader, writer, role, who)
                if reply is _DETACHED:
                    return  # the connection was a console's; it is over now
                await self._reply(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as err:
            log.debug("control connection closed: %s", err)

    async def _dispatch(
        self,
        line: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        who: str,
    ) -> Any:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ProtocolError("a request is a JSON object with a string 'op'")
            op = request["op"]
            if op not in self.handlers and op not in self.streaming and op != "console_attach":
                raise ProtocolError(f"unknown request '{op}'")
            if role is not Role.ADMIN and op not in VIEWER_OPS:
                raise AccessDenied(f"{who} may not '{op}': only an admin's certificate may")
            if role is Role.HOST:
                raise AccessDenied(f"{who}: a host's certificate carries no operator rights")
            args = request.get("args", {})
            if not isinstance(args, dict):
                raise ProtocolError("request 'args' must be an object")
            if op == "console_attach":
                await self._console_attach(args, reader, writer)
                return _DETACHED
            if op in self.streaming:
                return {"ok": True, "result": await self.streaming[op](args, writer)}
            return {"ok": True, "result": await self.handlers[op](args)}
        except FerryError as err:
            return err
        except ValueError as err:
            return ProtocolError(f"malformed request: {err}")
        except Exception as err:
            # The API boundary: a bug must answer the client, not drop it.
            log.exception("internal error handling %r", line[:200])
            return FerryError(f"internal error in ferryd: {type(err).__name__}: {err}")

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: Any) -> None:
        if isinstance(reply, FerryError):
            # Errors may quote the request: one line, whatever it held.
            reply = {"ok": False, "error": error_to_wire(reply) | {"message": one_line(str(reply))}}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()

    # -- handlers --------------------------------------------------------------

    async def _ping(self, args: dict[str, Any]) -> Any:
        return {
            "host": self.services.host.name,
            "pid": os.getpid(),
            "tls": self.services.credentials is not None,
        }

    async def _list(self, args: dict[str, Any]) -> Any:
        if args.get("long"):
            return await self.domains.list_long()
        return self.domains.list_rows()

    async def _list_all(self, args: dict[str, Any]) -> Any:
        return await self.services.cluster_domains()

    async def _host_list(self, args: dict[str, Any]) -> Any:
        return await self.services.cluster_hosts()

    async def _info(self, args: dict[str, Any]) -> Any:
        return await self.domains.info_live(_arg(args, "name", str))

    async def _create(self, args: dict[str, Any]) -> Any:
        return await self.domains.create(_arg(args, "config", dict))

    async def _pause(self, args: dict[str, Any]) -> Any:
        await self.domains.pause(_arg(args, "name", str))

    async def _unpause(self, args: dict[str, Any]) -> Any:
        await self.domains.unpause(_arg(args, "name", str))

    async def _shutdown(self, args: dict[str, Any]) -> Any:
        timeout = float(args.get("timeout", 120))
        return await self.domains.shutdown(
            _arg(args, "name", str), bool(args.get("wait", False)), timeout
        )

    async def _destroy(self, args: dict[str, Any]) -> Any:
        await self.domains.destroy(_arg(args, "name", str))

    async def _console_attach(
        self, args: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Reply, then carry the console's bytes both ways until either side ends."""
        name = _arg(args, "name", str)
        path = self.domains.console_socket(name)
        try:
            console_reader, console_writer = await asyncio.open_unix_connection(path)
        except OSError as err:
            raise FerryError(f"cannot attach to the console of domain '{name}': {err}") from err
        await self._reply(writer, {"ok": True, "result": {"name": name}})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(CONSOLE_CHUNK):
                    dst.write(data)
                    await dst.drain()

        tasks = [
            asyncio.create_task(pump(reader, console_writer), name=f"console {name} in"),
            asyncio.create_task(pump(console_reader, writer), name=f"console {name} out"),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            console_writer.close()

    def _params(self, args: dict[str, Any]) -> MigrationParams:
        settings = args.get("params", {})
        if not isinstance(settings, dict):
            raise ProtocolError("request argument 'params' must be an object")
        defaults = self.services.migration_defaults.to_wire()
        return MigrationParams.from_wire(defaults | settings)

    async def _migrate(self, args: dict[str, Any], writer: asyncio.StreamWriter) -> Any:
        """Streams ``{"progress": ...}`` lines, then the one final reply."""
        emit = _emitter(writer)
        params = self._params(args)
        port = args.get("port") or self.services.host.relocation.port
        return await self.services.outgoing.migrate(
            _arg(args, "name", str), _arg(args, "host", str), int(port), params, emit
        )

    async def _evacuate(self, args: dict[str, Any], writer: asyncio.StreamWriter) -> Any:
        host = _arg(args, "host", str)
        if host != self.services.host.name:
            raise FerryError(
                f"host {self.services.host.name} cannot evacuate {host}: ask {host}'s own ferryd"
            )
        targets = args.get("to", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ProtocolError("request argument 'to' must be a list of host names")
        parallel = int(args.get("parallel", 2))
        return await self.evacuation.run(targets, parallel, self._params(args), _emitter(writer))

    async def _host_activate(self, args: dict[str, Any]) -> Any:
        await self.evacuation.activate(_arg(args, "host", str))

    async def _disk_create(self, args: dict[str, Any]) -> Any:
        size = images.parse_size(str(_arg(args, "size", str)))
        fmt = str(args.get("format", "raw"))
        roots = self.services.host.storage_roots
        return await images.create_disk(_arg(args, "path", str), size, fmt, roots)

    async def _migrations(self, args: dict[str, Any]) -> Any:
        outgoing = self.services.outgoing
        return {"active": outgoing.in_progress(), "recent": list(outgoing.recent)}

    async def _save(self, args: dict[str, Any]) -> Any:
        return await self.services.save_restore.save(
            _arg(args, "name", str), _arg(args, "path", str)
        )

    async def _restore(self, args: dict[str, Any]) -> Any:
        return await self.services.save_restore.restore(_arg(args, "path", str))

    async def _migrate_abort(self, args: dict[str, Any]) -> Any:
        await self.services.outgoing.abort_migration(_arg(args, "name", str))
