"""QEMU's guest agent (qemu-ga), reached over the domain's virtio-serial channel.

Every domain gets the channel; only a guest that runs qemu-ga answers on it.
Each exchange opens the host-side socket, resynchronises with
``guest-sync-delimited`` (the agent's 0xFF marker discards anything a
previous client left half-read), then sends one command. A guest without an
agent, or a busy one, costs the caller ``timeout`` and nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

from ferry.errors import HypervisorError

AGENT_PORT = "org.qemu.guest_agent.0"
DELIMITER = b"\xff"
MAX_REPLY = 1 << 20


class NoAgent(HypervisorError):
    """The guest's agent did not answer (not installed, not started, or busy)."""


async def agent_call(
    socket: Path, command: str, arguments: dict[str, Any] | None = None,
    timeout: float = 2.0, reply: bool = True,
) -> Any:  # fmt: skip
    """One command; its ``return`` value. ``reply=False`` for a command the
    agent never answers when it succeeds (guest-shutdown)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket), limit=MAX_REPLY)
            try:
                await _sync(reader, writer)
                message: dict[str, Any] = {"execute": command}
                if arguments:
                    message["arguments"] = arguments
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
                if not reply:
                    return None
                return _result(command, await reader.readline())
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise NoAgent(f"the guest agent did not answer {command} within {timeout:g} s") from None
    except (OSError, ValueError) as err:
        raise NoAgent(f"the guest agent's channel: {err}") from None


async def _sync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    token = secrets.randbelow(1 << 31)
    sync = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
    writer.write(DELIMITER + json.dumps(sync).encode() + b"\n")
    await writer.drain()
    while True:
        await reader.readuntil(DELIMITER)
        answer = json.loads(await reader.readline())
        if isinstance(answer, dict) and answer.get("return") == token:
            return


def _result(command: str, line: bytes) -> Any:
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise NoAgent(f"the guest agent sent no object for {command}")
    if "error" in answer:
        error = answer["error"]
        raise HypervisorError(f"the guest agent refused {command}: {error.get('desc', error)}")
    return answer.get("return")


def ipv4_addresses(interfaces: Any) -> list[str]:
    """The guest's IPv4 addresses (loopback left out) from guest-network-get-interfaces."""
    found = []
    for iface in interfaces if isinstance(interfaces, list) else []:
        if not isinstance(iface, dict) or iface.get("name") == "lo":
            continue
        for addr in iface.get("ip-addresses", []):
            if isinstance(addr, dict) and addr.get("ip-address-type") == "ipv4":
                found.append(f"{addr.get('ip-address')}/{addr.get('prefix')}")
    return found
