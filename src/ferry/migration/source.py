"""The source side of a migration: handshake, prepare, stream, commit, or roll back.

Phases (``OutgoingMigration.phase``): connect -> prepare -> transfer -> commit
-> done. Up to and including ``transfer`` any failure rolls back: QEMU's
migration is cancelled, the VM is resumed on the source if it was running,
and the target is told to abort (it also aborts by itself if the source goes
silent). Once the commit is sent, the target alone decides: if its answer is
lost, the VM stays paused here (never resumed blindly) and the outcome is
asked of the target until it answers; see :func:`resolve_in_doubt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.errors import (
    FerryError,
    MigrationAborted,
    MigrationError,
    MigrationInDoubt,
)
from ferry.hypervisor.monitor import Monitor
from ferry.migration.channel import PROTOCOL_VERSION, Channel
from ferry.migration.params import MigrationParams
from ferry.migration.progress import Progress

log = logging.getLogger("ferryd")

CONNECT_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0
PREPARE_TIMEOUT = 90.0  # the target validates and starts its QEMU
COMMIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 1.0
FD_NAME = "ferry-migration"
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT_BYTES = 128 * 1024

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class OutgoingResult:
    migration_id: str
    target: str
    total_s: float
    transfer_s: float
    qemu_downtime_ms: int | None
    switchover_ms: float | None  # source STOP to target RESUME (QMP event times)
    commit_ms: float | None  # target stream complete -> its RESUME: what the commit costs
    bytes_sent: int
    passes: int
    resumed: bool
    stopped_at: float | None  # wall clock of the source's STOP event
    resumed_at: float | None  # wall clock of the target's RESUME event
    downtime_limit_ms: int

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class OutgoingMigration:
    name: str
    monitor: Monitor
    config: Mapping[str, Any]
    host: str
    port: int
    params: MigrationParams
    local_host: str
    disks: list[dict[str, Any]]
    boot: dict[str, Any]
    on_progress: ProgressCallback
    migration_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    phase: str = "connect"
    abort_requested: asyncio.Event = field(default_factory=asyncio.Event)
    _downtime_limit: int = field(default=0, init=False)

    async def run(self) -> OutgoingResult:
        start = time.monotonic()
        channel = await Channel.connect(self.host, self.port, CONNECT_TIMEOUT)
        was_running = False
        try:
            with self.monitor.listener(("STOP", "MIGRATION")) as events:
                await self._handshake(channel)
                self.phase = "prepare"
                token = await self._prepare(channel)
                self._check_abort()
                status = await self.monitor.execute("query-status")
                was_running = bool(status.get("running"))
                data = await open_data_connection(self.host, self.port, self.migration_id, token)
                self.phase = "transfer"
                transfer_start = time.monotonic()
                progress = await self._transfer(channel, data, events)
                stop_ts = _last_event_time(events, "STOP")
            self.phase = "commit"
        except BaseException as err:
            await self._roll_back(channel, was_running, err)
            raise
        try:
            await channel.send(
                {"type": "commit", "migration_id": self.migration_id, "resume": was_running}
            )
            reply = await channel.recv(COMMIT_TIMEOUT, "committed")
        except MigrationError as err:
            raise MigrationInDoubt(
                f"migration of '{self.name}' to {self.host}: the commit was sent but its answer "
                f"was lost ({err}); the domain is held paused here until {self.host} says "
                "whether it resumed it"
            ) from err
        finally:
            await channel.close()
        self.phase = "done"
        resume_ts = reply.get("resume_ts")
        loaded_ts = reply.get("loaded_ts")
        switchover = commit = None
        if isinstance(resume_ts, int | float) and stop_ts is not None:
            switchover = round((float(resume_ts) - stop_ts) * 1000, 1)
        if isinstance(resume_ts, int | float) and isinstance(loaded_ts, int | float):
            commit = round((float(resume_ts) - float(loaded_ts)) * 1000, 1)
        return OutgoingResult(
            migration_id=self.migration_id,
            target=self.host,
            total_s=round(time.monotonic() - start, 3),
            transfer_s=round(time.monotonic() - transfer_start, 3),
            qemu_downtime_ms=progress.downtime_ms,
            switchover_ms=switchover,
            commit_ms=commit,
            bytes_sent=progress.transferred,
            passes=progress.passes,
            resumed=was_running,
            stopped_at=stop_ts,
            resumed_at=float(resume_ts) if isinstance(resume_ts, int | float) else None,
            downtime_limit_ms=self._downtime_limit,
        )

    # -- phases ----------------------------------------------------------------

    async def _handshake(self, channel: Channel) -> None:
        await channel.send({"type": "hello", "version": PROTOCOL_VERSION, "host": self.local_host})
        hello = await channel.recv(HELLO_TIMEOUT, "hello")
        if hello.get("version") != PROTOCOL_VERSION:
            raise MigrationError(
                f"{self.host} speaks relocation protocol {hello.get('version')}, "
                f"this host {PROTOCOL_VERSION}"
            )

    async def _prepare(self, channel: Channel) -> str:
        await channel.send(
            {
                "type": "prepare",
                "migration_id": self.migration_id,
                "config": dict(self.config),
                "params": self.params.to_wire(),
                "disks": self.disks,
                "boot": self.boot,
            }
        )
        prepared = await channel.recv(PREPARE_TIMEOUT, "prepared")
        token = prepared.get("token")
        if not isinstance(token, str):
            raise MigrationError(f"{self.host} sent no data token")
        return token

    async def _transfer(self, channel: Channel, data: socket.socket, events: Any) -> Progress:
        monitor = self.monitor
        await monitor.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": k, "state": v} for k, v in self.params.capabilities().items()
                ]
            },
        )
        self._downtime_limit = self.params.max_downtime_ms
        await monitor.execute("migrate-set-parameters", self.params.qemu_parameters())
        if not self.params.live:
            await monitor.execute("stop")
        try:
            await monitor.pass_fd(data.fileno(), FD_NAME)
        finally:
            # QEMU holds its own copy now; ours would only keep the socket open.
            data.close()
        await monitor.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        return await self._follow(channel, events)

    async def _follow(self, channel: Channel, events: Any) -> Progress:
        """Poll QEMU until the memory stream completes; cancel it on a stall or abort."""
        last_bytes, last_change = -1, time.monotonic()
        last_beat = 0.0
        next_raise = time.monotonic() + self.params.converge_after_s
        peer = asyncio.create_task(channel.recv(timeout=1e9))
        try:
            while True:
                info = await self.monitor.execute("query-migrate")
                progress = Progress.from_qmp(info)
                self.on_progress({"phase": self.phase} | progress.to_wire())
                if progress.status == "completed":
                    return progress
                if progress.status in ("failed", "cancelled"):
                    desc = info.get("error-desc", progress.status) if isinstance(info, dict) else ""
                    raise MigrationError(f"QEMU's migration stream {progress.status}: {desc}")
                now = time.monotonic()
                if progress.transferred != last_bytes:
                    last_bytes, last_change = progress.transferred, now
                elif now - last_change > self.params.stall_timeout_s:
                    raise MigrationError(
                        f"no progress for {self.params.stall_timeout_s:.0f} s: the link to "
                        f"{self.host} seems down"
                    )
                if peer.done():
                    peer.result()  # raises the target's error
                    raise MigrationError(f"{self.host} spoke out of turn during the transfer")
                self._check_abort()
                if now >= next_raise and self._downtime_limit < self.params.max_downtime_cap_ms:
                    await self._raise_downtime_limit()
                    next_raise = now + 10.0
                if now - last_beat >= HEARTBEAT_INTERVAL:
                    await channel.send({"type": "ping"})
                    last_beat = now
                # Woken by QEMU's MIGRATION event, the end of the stream is
                # seen at once: every millisecond here is downtime.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(events.get(), POLL_INTERVAL)
        finally:
            peer.cancel()
            with contextlib.suppress(asyncio.CancelledError, MigrationError):
                await peer

    async def _raise_downtime_limit(self) -> None:
        new = min(self._downtime_limit * 2, self.params.max_downtime_cap_ms)
        log.warning(
            "migration of %s not converging; downtime limit %d -> %d ms",
            self.name, self._downtime_limit, new,
        )  # fmt: skip
        self._downtime_limit = new
        await self.monitor.execute("migrate-set-parameters", {"downtime-limit": new})

    def _check_abort(self) -> None:
        if self.abort_requested.is_set():
            raise MigrationAborted(f"migration of '{self.name}' to {self.host} was aborted")

    # -- rollback --------------------------------------------------------------

    async def _roll_back(self, channel: Channel, was_running: bool, err: BaseException) -> None:
        log.warning("migration of %s to %s failed in %s: %s", self.name, self.host, self.phase, err)
        try:
            info = await self.monitor.execute("query-migrate")
            if isinstance(info, dict) and info.get("status") not in (
                None, "none", "completed", "failed", "cancelled",
            ):  # fmt: skip
                await self.monitor.execute("migrate_cancel")
                await _wait_migration_settled(self.monitor)
            status = await self.monitor.execute("query-status")
            if was_running and not status.get("running"):
                # After a completed stream the images are inactive; cont takes
                # them back (QEMU re-activates them) and runs the guest here.
                await self.monitor.execute("cont")
        except FerryError as rollback_err:
            log.error("rollback of %s on the source: %s", self.name, rollback_err)
        await channel.send_error(MigrationError(f"source aborted: {err}"))
        await channel.close()


async def _wait_migration_settled(monitor: Monitor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await monitor.execute("query-migrate")
        if not isinstance(info, dict) or info.get("status") in ("cancelled", "failed", "completed"):
            return
        await asyncio.sleep(0.05)
    raise MigrationError("QEMU did not settle its cancelled migration within 30 s")


def _last_event_time(events: Any, name: str) -> float | None:
    found = None
    for event in events.history:
        if event["event"] == name:
            stamp = event["timestamp"]
            found = stamp["seconds"] + stamp["microseconds"] / 1e6
    return found


async def open_data_connection(
    host: str, port: int, migration_id: str, token: str
) -> socket.socket:
    """The memory-stream connection: our header, the target's ``ready``, then raw bytes.

    Returns a blocking socket with nothing read past ``ready``, for QEMU.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise MigrationError(f"cannot resolve {host}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
        header = {"type": "data", "migration_id": migration_id, "token": token}
        await loop.sock_sendall(sock, json.dumps(header).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            # One byte at a time: nothing past the reply may be taken from QEMU.
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), PREPARE_TIMEOUT)
            if not chunk:
                raise MigrationError(f"{host} closed the data connection")
            reply += chunk
            if len(reply) > 4096:
                raise MigrationError(f"{host} sent a malformed data-connection reply")
        if reply.strip() != b"ready":
            raise MigrationError(f"{host} refused the data connection: {reply.strip().decode()}")
    except (OSError, TimeoutError) as err:
        sock.close()
        raise MigrationError(f"data connection to {host}:{port} failed: {err}") from None
    except BaseException:
        sock.close()
        raise
    # Keep little unsent data queued in the kernel: QEMU then sees the link's
    # real rate, its downtime estimate holds, and the final copy does not sit
    # in a socket buffer (megabytes, hundreds of ms on 100 Mbit) after the
    # source has stopped the VM.
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    sock.setblocking(True)
    return sock
