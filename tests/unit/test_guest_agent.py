"""The guest-agent client against a fake qemu-ga on a unix socket, speaking its protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.hypervisor.guest_agent import NoAgent, agent_call, ipv4_addresses

INTERFACES = [
    {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1",
                                     "prefix": 8}]},
    {"name": "eth0", "hardware-address": "00:16:3e:4a:21:07", "ip-addresses": [
        {"ip-address-type": "ipv4", "ip-address": "10.42.0.100", "prefix": 24},
        {"ip-address-type": "ipv6", "ip-address": "fe80::216:3eff:fe4a:2107", "prefix": 64},
    ]},
]  # fmt: skip


class FakeAgent:
    """As qemu-ga: a 0xFF before the answer to guest-sync-delimited; stale bytes first."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": "left over from a client that went away"}\n')
        while line := await reader.readline():
            message = json.loads(line.lstrip(b"\xff"))
            self.seen.append(message)
            command = message["execute"]
            if command == "guest-sync-delimited":
                writer.write(b"\xff" + json.dumps({"return": message["arguments"]["id"]}).encode())
                writer.write(b"\n")
            elif command == "guest-network-get-interfaces":
                writer.write(json.dumps({"return": INTERFACES}).encode() + b"\n")
            elif command == "guest-shutdown":
                pass  # success-response false: no answer, as qemu-ga
            else:
                error = {"class": "CommandNotFound", "desc": f"{command} not found"}
                writer.write(json.dumps({"error": error}).encode() + b"\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Path, FakeAgent]]:
    fake = FakeAgent()
    path = tmp_path / "qga.sock"
    server = await asyncio.start_unix_server(fake.serve, str(path))
    async with server:
        yield path, fake


async def test_addresses_after_resynchronising(agent: tuple[Path, FakeAgent]) -> None:
    path, fake = agent
    interfaces = await agent_call(path, "guest-network-get-interfaces")
    assert ipv4_addresses(interfaces) == ["10.42.0.100/24"]
    assert [m["execute"] for m in fake.seen] == [
        "guest-sync-delimited",
        "guest-network-get-interfaces",
    ]


async def test_shutdown_expects_no_answer(agent: tuple[Path, FakeAgent]) -> None:
    path, fake = agent
    assert await agent_call(path, "guest-shutdown", {"mode": "powerdown"}, reply=False) is None
    await asyncio.sleep(0)
    assert fake.seen[-1] == {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}


async def test_an_error_is_one_line(agent: tuple[Path, FakeAgent]) -> None:
    path, _ = agent
    with pytest.raises(Exception, match="the guest agent refused guest-bogus: guest-bogus not"):
        await agent_call(path, "guest-bogus")


async def test_no_agent_costs_the_timeout_and_says_so(tmp_path: Path) -> None:
    silent = tmp_path / "silent.sock"

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # QEMU's chardev with no agent behind it: nothing comes back

    server = await asyncio.start_unix_server(never, str(silent))
    async with server:
        with pytest.raises(NoAgent, match=r"did not answer guest-ping within 0\.3 s"):
            await agent_call(silent, "guest-ping", timeout=0.3)
    with pytest.raises(NoAgent, match="channel"):
        await agent_call(tmp_path / "absent.sock", "guest-ping")
