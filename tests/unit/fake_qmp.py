"""A fake QMP peer: speaks enough of QEMU's monitor protocol on a unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


class FakeQmpPeer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.status = "running"
        self.received: list[str] = []
        self.fail: dict[str, str] = {}
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        message = {
            "event": event,
            "data": data or {},
            "timestamp": {"seconds": 0, "microseconds": 0},
        }
        for writer in self._writers:
            writer.write(json.dumps(message).encode() + b"\r\n")
            await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        greeting = {
            "QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}
        }
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        await writer.drain()
        async for request in self._requests(reader):
            command = request["execute"]
            self.received.append(command)
            reply: dict[str, Any]
            if command in self.fail:
                reply = {"error": {"class": "GenericError", "desc": self.fail[command]}}
            else:
                reply = {"return": self._answer(command)}
            if "id" in request:
                reply["id"] = request["id"]
            writer.write(json.dumps(reply).encode() + b"\r\n")
            await writer.drain()
            if command == "stop":
                await self.emit("STOP")
            elif command == "cont":
                await self.emit("RESUME")

    @staticmethod
    async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
        # Clients need not end a request with a newline: QEMU parses a JSON stream.
        decoder = json.JSONDecoder()
        buffer = ""
        while chunk := await reader.read(4096):
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    request, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                yield request

    def _answer(self, command: str) -> Any:
        if command == "stop":
            self.status = "paused"
        elif command == "cont":
            self.status = "running"
        elif command == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        return {}
