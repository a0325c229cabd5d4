"""The control API: JSON lines on a root-only unix socket.

A request is one line ``{"op": NAME, "args": {...}}``; the answer is one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message"}}``.
Only root (or the user ferryd runs as) may connect: the socket lives in a
0700 directory and every peer's credentials are checked.
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

from ferry.daemon.services import Services
from ferry.errors import FerryError, ProtocolError, error_to_wire
from ferry.migration.params import MigrationParams

log = logging.getLogger("ferryd")

MAX_REQUEST = 1 << 20
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamingHandler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[Any]]


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _arg(args: dict[str, Any], key: str, kind: type) -> Any:
    value = args.get(key)
    if not isinstance(value, kind):
        raise ProtocolError(f"request argument '{key}' must be a {kind.__name__}")
    return value


class ControlServer:
    def __init__(self, services: Services, socket_path: Path) -> None:
        self.services = services
        self.domains = services.lifecycle
        self.socket_path = socket_path
        self._server: asyncio.Server | None = None
        self.handlers: dict[str, Handler] = {
            "ping": self._ping,
            "list": self._list,
            "info": self._info,
            "create": self._create,
            "pause": self._pause,
            "unpause": self._unpause,
            "shutdown": self._shutdown,
            "destroy": self._destroy,
            "console": self._console,
            "migrate_abort": self._migrate_abort,
        }
        # Requests that write progress lines before their one final reply.
        self.streaming: dict[str, StreamingHandler] = {"migrate": self._migrate}

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.socket_path), limit=MAX_REQUEST
        )
        os.chmod(self.socket_path, 0o600)

    async def close(self) -> None:
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
            while line := await reader.readline():
                await self._reply(writer, await self._dispatch(line, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as err:
            log.debug("control connection closed: %s", err)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes, writer: asyncio.StreamWriter) -> Any:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ProtocolError("a request is a JSON object with a string 'op'")
            op = request["op"]
            if op not in self.handlers and op not in self.streaming:
                raise ProtocolError(f"unknown request '{op}'")
            args = request.get("args", {})
            if not isinstance(args, dict):
                raise ProtocolError("request 'args' must be an object")
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
            reply = {"ok": False, "error": error_to_wire(reply)}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()

    # -- handlers --------------------------------------------------------------

    async def _ping(self, args: dict[str, Any]) -> Any:
        return {"host": self.services.host.name, "pid": os.getpid()}

    async def _list(self, args: dict[str, Any]) -> Any:
        return self.domains.list_rows()

    async def _info(self, args: dict[str, Any]) -> Any:
        return self.domains.info(_arg(args, "name", str))

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

    async def _console(self, args: dict[str, Any]) -> Any:
        return {"socket": self.domains.console_socket(_arg(args, "name", str))}

    async def _migrate(self, args: dict[str, Any], writer: asyncio.StreamWriter) -> Any:
        """Streams ``{"progress": ...}`` lines, then the one final reply."""

        def emit(progress: dict[str, Any]) -> None:
            # The client may have gone (Ctrl-C, closed terminal): the migration
            # carries on regardless, and so does the daemon.
            if not writer.is_closing():
                writer.write(json.dumps({"progress": progress}).encode() + b"\n")

        settings = args.get("params", {})
        if not isinstance(settings, dict):
            raise ProtocolError("request argument 'params' must be an object")
        defaults = self.services.migration_defaults.to_wire()
        params = MigrationParams.from_wire(defaults | settings)
        port = args.get("port") or self.services.host.relocation.port
        return await self.services.outgoing.migrate(
            _arg(args, "name", str), _arg(args, "host", str), int(port), params, emit
        )

    async def _migrate_abort(self, args: dict[str, Any]) -> Any:
        await self.services.outgoing.abort_migration(_arg(args, "name", str))
