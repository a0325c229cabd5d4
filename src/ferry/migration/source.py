"""The source side of a migration's protocol: handshake, prepare, stream, commit, or roll back.

Phases (:class:`ferry.domain.migration_state.Phase`): connect -> prepare ->
transfer -> commit -> done. Up to and including ``transfer`` any failure rolls
back: QEMU's migration is cancelled and the target is told to abort (it also
aborts by itself if the source goes silent); the caller then gives the domain
back its state from before (:meth:`SourceEnd.keep`). Once the commit is sent,
the target alone decides: if its answer is lost the phase is ``in-doubt``, the
VM stays paused here (never resumed blindly) and the outcome is asked of the
target until it answers (:meth:`SourceEnd.resolve_in_doubt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.domain.migration_state import Phase
from ferry.errors import (
    FerryError,
    MigrationAborted,
    MigrationError,
    MigrationInDoubt,
)
from ferry.host.running import OutgoingControl
from ferry.hypervisor.monitor import Monitor
from ferry.migration.channel import PROTOCOL_VERSION, Channel, PeerWatch
from ferry.migration.channel_tuning import ChannelTuner
from ferry.migration.convergence import (
    Action,
    Convergence,
    GiveUp,
    SetDowntime,
    SetFirstThrottle,
)
from ferry.migration.data_link import CONNECT_TIMEOUT, FD_NAME, open_data_connection
from ferry.migration.disk_mirror import DiskMirror, DiskProgress
from ferry.migration.outgoing_result import OutgoingResult, after_stop, last_event_time
from ferry.migration.params import MigrationParams
from ferry.migration.progress import Progress
from ferry.migration.stream_setup import setup_source
from ferry.migration.switchover import HELD, finish_postcopy, let_through, wait_migration_settled
from ferry.migration.timeline import Timeline
from ferry.pki.qemu_tls import QemuTls

log = logging.getLogger("ferryd")

HELLO_TIMEOUT = 10.0
PREPARE_TIMEOUT = 90.0  # the target validates and starts its QEMU
COMMIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 1.0

ProgressCallback = Callable[[dict[str, Any]], None]


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
    # Resume the domain on the target: it ran when the migration began.
    resume: bool = True
    control: OutgoingControl = field(
        default_factory=lambda: OutgoingControl(migration_id=uuid.uuid4().hex)
    )
    # Mutual TLS for the channel and QEMU's stream; None: insecure = true.
    tls: QemuTls | None = None
    plan_reason: str = ""
    # The source QEMU's PID: its own multifd sockets get the low-water mark.
    qemu_pid: int | None = None
    # --copy-storage: the indices of the disks to mirror to the target.
    copy_disks: list[int] = field(default_factory=list)
    _mirror: DiskMirror | None = field(default=None, init=False)
    _storage: dict[str, Any] = field(default_factory=dict, init=False)
    _disk_done: DiskProgress | None = field(default=None, init=False)
    _disk_copy_s: float | None = field(default=None, init=False)
    _disk_final_ms: float | None = field(default=None, init=False)
    _tuner: ChannelTuner | None = field(default=None, init=False)
    _convergence: Convergence | None = field(default=None, init=False)
    _downtime_limit: int = field(default=0, init=False)
    _stream: str = field(default="none", init=False)
    _timeline: Timeline = field(default_factory=Timeline, init=False)
    _target_steps: dict[str, float] = field(default_factory=dict, init=False)

    @property
    def migration_id(self) -> str:
        return self.control.migration_id

    @property
    def phase(self) -> Phase:
        return self.control.phase

    async def run(self) -> OutgoingResult:
        start = time.monotonic()
        steps = self._timeline
        try:
            credentials = self.tls.credentials if self.tls else None
            channel = await Channel.connect(self.host, self.port, CONNECT_TIMEOUT, credentials)
        except BaseException:
            self.control.advance(Phase.ROLLED_BACK)
            raise
        steps.mark("connect")
        try:
            with self.monitor.listener(("STOP", "MIGRATION")) as events:
                await self._handshake(channel)
                steps.mark("handshake")
                self.control.advance(Phase.PREPARE)
                token, stream = await self._prepare(channel)
                steps.mark("prepare")
                self._check_abort()
                self.control.advance(Phase.TRANSFER)
                transfer_start = time.monotonic()
                if self.copy_disks:
                    await self._copy_disks(channel)
                    steps.mark("disks")
                data = None
                if not self.params.multifd:
                    data = await open_data_connection(
                        self.host, self.port, self.migration_id, token
                    )
                    steps.mark("data_connect")
                progress = await self._transfer(channel, data, stream, events)
                stop_ts = last_event_time(events, "STOP")
                switch_trace = after_stop(events, stop_ts)
            self.control.advance(Phase.COMMIT)
        except BaseException as err:
            await self._roll_back(channel, err)
            raise
        try:
            await channel.send(
                {"type": "commit", "migration_id": self.migration_id, "resume": self.resume}
            )
            reply = await channel.recv(COMMIT_TIMEOUT, "committed")
            steps.mark("commit")
        except BaseException as err:
            await channel.close()
            # Sent or not, the commit may have reached the target: from here
            # only the target's word may end the migration.
            self.control.advance(Phase.IN_DOUBT)
            if not isinstance(err, MigrationError):
                raise
            raise MigrationInDoubt(
                f"migration of '{self.name}' to {self.host}: the commit was sent but its answer "
                f"was lost ({err}); the domain is held paused here until {self.host} says "
                "whether it resumed it"
            ) from err
        self.control.advance(Phase.DONE)
        postcopy_s = None
        try:
            if progress.status == HELD:
                # The target has committed: only now may the VM switch over.
                progress, resumed, postcopy_s = await finish_postcopy(
                    self.monitor, channel, self._report_after_switch
                )
                reply["resume_ts"] = resumed
                steps.mark("postcopy")
        finally:
            await channel.close()
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
            resumed=self.resume,
            stopped_at=stop_ts,
            resumed_at=float(resume_ts) if isinstance(resume_ts, int | float) else None,
            downtime_limit_ms=self._downtime_limit,
            stream=self._stream,
            channels=max(self.params.channels, 1),
            compression=self.params.compression if self.params.multifd else "none",
            stream_plan=self.plan_reason,
            tuned_channels=len(self._tuner.tuned) if self._tuner else 0,
            decisions=self._convergence.decisions if self._convergence else [],
            throttle_pct=progress.throttle_pct,
            postcopy=self._convergence is not None and self._convergence.switched,
            postcopy_s=None if postcopy_s is None else round(postcopy_s, 3),
            postcopy_requests=progress.postcopy_requests if postcopy_s is not None else None,
            disk_bytes=self._disk_done.copied if self._disk_done else 0,
            disk_copy_s=self._disk_copy_s,
            disk_final_ms=self._disk_final_ms,
            switch_trace_ms=switch_trace,
            steps_ms=steps.steps_ms,
            target_steps_ms=self._target_steps,
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

    async def _prepare(self, channel: Channel) -> tuple[str, dict[str, Any]]:
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
        target_steps = prepared.get("steps_ms")
        if isinstance(target_steps, dict):
            self._target_steps = {
                str(k): float(v) for k, v in target_steps.items() if isinstance(v, int | float)
            }
        if not isinstance(token, str):
            raise MigrationError(f"{self.host} sent no data token")
        stream, storage = prepared.get("stream"), prepared.get("storage")
        self._storage = storage if isinstance(storage, dict) else {}
        return token, stream if isinstance(stream, dict) else {}

    async def _copy_disks(self, channel: Channel) -> None:
        """Mirror the disks into the target's exports until every mirror has caught up."""
        if self.tls is None:
            raise MigrationError("--copy-storage needs TLS: this host has insecure = true")
        began = time.monotonic()
        self._mirror = DiskMirror(
            self.monitor, self.tls, self.host, channel.peer_address(), self._storage,
            self.copy_disks, self.qemu_pid, self.params.sync_writes,
        )  # fmt: skip
        peer = PeerWatch(channel, f"target's word on {self.migration_id[:8]}", HEARTBEAT_INTERVAL)
        try:
            await self._mirror.start()

            async def tick(disk: DiskProgress) -> None:
                self.on_progress({"phase": self.phase, "status": "copying disks",
                                  "disk": disk.to_wire()})  # fmt: skip
                await peer.tick(time.monotonic())
                self._check_abort()

            await self._mirror.until_ready(tick, self.params.stall_timeout_s, POLL_INTERVAL)
        finally:
            await peer.close()
        self._disk_copy_s = round(time.monotonic() - began, 3)

    async def _transfer(
        self, channel: Channel, data: socket.socket | None, stream: dict[str, Any], events: Any
    ) -> Progress:
        monitor = self.monitor
        try:
            self._downtime_limit = self.params.max_downtime_ms
            uri = await setup_source(
                monitor, self.params, self.tls, self.host, stream, channel.peer_address()
            )
            # What QEMU itself will do, not what we asked: shown in the result.
            set_up = await monitor.execute("query-migrate-parameters")
            tls = isinstance(set_up, dict) and set_up.get("tls-creds")
            self._stream = "none" if not tls else "tls-psk" if self.params.multifd else "tls"
            if not self.params.live:
                await monitor.execute("stop")
            if uri is None:
                assert data is not None
                await monitor.pass_fd(data.fileno(), FD_NAME)
                uri = f"fd:{FD_NAME}"
        finally:
            if data is not None:
                # QEMU holds its own copy now; ours would only keep the socket open.
                data.close()
        if self.params.multifd:
            port = int(uri.rsplit(":", 1)[1])
            self._tuner = ChannelTuner(self.qemu_pid, port, self.params.channels + 1)
        await monitor.execute("migrate", {"uri": uri})
        self._timeline.mark("setup")
        progress = await self._follow(channel, events)
        self._timeline.mark("transfer")
        return progress

    async def _follow(self, channel: Channel, events: Any) -> Progress:
        """Poll QEMU until the memory stream completes; cancel it on a stall or abort."""
        last_bytes, last_change = -1, time.monotonic()
        policy = self._convergence = Convergence(self.params, time.monotonic())
        peer = PeerWatch(channel, f"target's word on {self.migration_id[:8]}", HEARTBEAT_INTERVAL)
        try:
            while True:
                info = await self.monitor.execute("query-migrate")
                progress = Progress.from_qmp(info)
                seen = len(policy.decisions)
                actions = policy.observe(progress, time.monotonic())
                update = {"phase": self.phase} | progress.to_wire()
                for decision in policy.decisions[seen:]:
                    log.warning("migration of %s: %s (%s)", self.name, decision["decision"],
                                decision["why"])  # fmt: skip
                    self.on_progress(update | {"decision": decision})
                if self._mirror is not None and self._mirror.active:
                    disk = await self._mirror.progress()  # raises if a mirror failed
                    update |= {"disk": disk.to_wire()}
                self.on_progress(update | {"downtime_limit_ms": policy.limit_ms})
                if self._tuner is not None:
                    self._tuner.poll()
                if progress.status == HELD and self._mirror is not None and self._mirror.active:
                    # Stopped before the switch: the disks' last blocks, then the device state.
                    began = time.monotonic()
                    self._disk_done = await self._mirror.finish()
                    self._timeline.mark("disk_final")
                    self._disk_final_ms = round((time.monotonic() - began) * 1000, 1)
                    await let_through(self.monitor)
                    continue
                if progress.status == "completed" or (
                    progress.status == HELD and self.params.postcopy
                ):
                    # Held (post-copy): the VM is stopped here, waiting for the commit.
                    # (Just let through, a copy's stream may still read as held.)
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
                await peer.tick(now)
                self._check_abort()
                await self._apply(actions)
                # Woken by QEMU's MIGRATION event, the end of the stream is
                # seen at once: every millisecond here is downtime.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await events.get()
        finally:
            await peer.close()

    async def _apply(self, actions: list[Action]) -> None:
        """Carry out the convergence policy's decisions (ferry.migration.convergence)."""
        for action in actions:
            if isinstance(action, GiveUp):
                raise MigrationError(f"migration of '{self.name}' to {self.host}: {action.reason}")
            if isinstance(action, SetDowntime):
                self._downtime_limit = action.limit_ms
                await self.monitor.execute(
                    "migrate-set-parameters", {"downtime-limit": action.limit_ms}
                )
            elif isinstance(action, SetFirstThrottle):
                await self.monitor.execute(
                    "migrate-set-parameters", {"cpu-throttle-initial": action.pct}
                )
            else:
                # QEMU stops the VM at the switch and holds (pause-before-switchover).
                await self.monitor.execute("migrate-start-postcopy")

    def _report_after_switch(self, progress: Progress) -> None:
        self.on_progress({"phase": "postcopy"} | progress.to_wire())

    def _check_abort(self) -> None:
        if self.control.abort_requested.is_set():
            raise MigrationAborted(f"migration of '{self.name}' to {self.host} was aborted")

    # -- rollback --------------------------------------------------------------

    async def _roll_back(self, channel: Channel, err: BaseException) -> None:
        """Stop QEMU's stream and tell the target; the caller restores the domain."""
        log.warning("migration of %s to %s failed in %s: %s", self.name, self.host, self.phase, err)
        self.control.advance(Phase.ROLLED_BACK)
        if self._mirror is not None:
            # First: a write-blocking mirror on a cut link holds the guest's writes.
            # The source's disks were only read: the target's copy is what is lost.
            await self._mirror.abort()
        try:
            info = await self.monitor.execute("query-migrate")
            if isinstance(info, dict) and info.get("status") not in (
                None, "none", "completed", "failed", "cancelled",
            ):  # fmt: skip
                await self.monitor.execute("migrate_cancel")
                await wait_migration_settled(self.monitor)
        except FerryError as rollback_err:
            log.error("rollback of %s on the source: %s", self.name, rollback_err)
        await channel.send_error(MigrationError(f"source aborted: {err}"))
        await channel.close()
