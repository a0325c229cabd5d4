"""Two ferry hosts in one process, each with its real services and relocation server,
running fake QEMUs (real processes, see fake_qemu.py) on a shared storage directory.

A host can stop as ferryd does on SIGTERM, crash (everything it runs is dropped
at once, as when ferryd is killed: its QEMUs live on) and start again, which
re-attaches to them. Assertions look at the QEMU processes themselves and ask
them over QMP, never at a host's own listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ferry.config.host import ClusterConfig, HostConfig, RelocationConfig
from ferry.daemon.cluster_member import ClusterMember
from ferry.daemon.relocation import RelocationServer
from ferry.daemon.services import Services
from ferry.host.layout import HostLayout
from ferry.hypervisor import process
from ferry.hypervisor.cmdline import BootFiles
from ferry.migration.params import MigrationParams
from ferry.pki.credentials import Credentials
from ferry.util.wait import wait_until, wait_until_sync
from tests.unit.pki_support import TestCA

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


def fake_qemu_wrapper(directory: Path) -> Path:
    wrapper = directory / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_QEMU} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


class Crashed(BaseException):
    """What a crashed ferryd's leftovers raise if they try to act."""


@dataclass
class FakeHost:
    name: str
    config: HostConfig
    boot: BootFiles
    # Its certificate of the cluster CA; None: the host runs insecure.
    credentials: Credentials | None
    services: Services | None = None
    relocation: RelocationServer | None = None
    # Its ferryd's membership of the cluster (etcd configured); the fencer it
    # started lives on across crashes and restarts, as on a real host.
    member: ClusterMember | None = None
    port: int = 0
    progress: list[dict[str, Any]] = field(default_factory=list)

    @property
    def s(self) -> Services:
        assert self.services is not None, f"{self.name} is down"
        return self.services

    async def start(self) -> None:
        layout = HostLayout(self.config.state_dir, self.config.run_dir)
        layout.create()
        member = None
        if self.config.cluster.enabled:
            member = self.member = ClusterMember(self.config, layout, self.credentials)
            await member.ensure_fencer()
        self.services = Services.build(
            self.config,
            layout,
            lambda cfg: self.boot,
            self.credentials,
            boot_dirs=(self.boot.kernel.parent,),
            cluster=member,
        )
        await self.services.reattach.all()
        await self.services.start_cluster()
        # The same port again after a restart: a source in doubt asks there.
        relocation = replace(self.config.relocation, port=self.port)
        self.relocation = RelocationServer(
            relocation,
            self.services.incoming,
            self.name,
            self.credentials,
            self.services.metrics,
        )
        await self.relocation.start()
        self.port = self.relocation.port
        if member is not None:
            member.relocation_port = self.port

    async def stop(self) -> None:
        """As ferryd on SIGTERM: arriving domains are aborted, the others live on."""
        assert self.relocation is not None
        await self.relocation.close()
        await self.s.close()
        self.services = self.relocation = None

    async def crash(self) -> None:
        """As ferryd killed: nothing is finished or undone; QEMUs live on.

        Whatever of the dead daemon is still running in this process (a request
        in flight) can no longer write its state or touch a QEMU.
        """
        assert self.relocation is not None
        relocation, services = self.relocation, self.s
        self.services = self.relocation = None

        def dead(*args: Any, **kwargs: Any) -> Any:
            raise Crashed(f"ferryd of {self.name} is dead")

        services.table.save = dead  # type: ignore[method-assign]
        services.table.outcomes._save = dead  # type: ignore[method-assign]
        services.launcher.end_qemu = dead  # type: ignore[method-assign]
        await relocation.close()
        await services.background.close()
        for dom in [*services.table.everyone(), *services.table.leaving()]:
            await services.watcher.stop(dom)
        if services.ha is not None:
            await services.ha.close()
        if services.cluster is not None:
            await services.cluster.close()

    async def restart(self) -> None:
        await self.crash()
        await self.start()

    async def migrate(self, name: str, to: FakeHost, **params: Any) -> dict[str, Any]:
        return await self.s.outgoing.migrate(
            name,
            "127.0.0.1",
            to.port,
            # The fake QEMU speaks the one-stream (fd:) transport only; multifd
            # runs against real QEMU in the integration tests.
            MigrationParams.from_wire({"channels": 1} | params),
            self.progress.append,
        )


@contextlib.asynccontextmanager
async def running(cluster: Cluster, start: bool = True) -> AsyncIterator[Cluster]:
    """The cluster's hosts (started, unless ``start`` is false); whatever happens, every
    host still up is crashed at the end and no fake QEMU outlives the test."""
    try:
        if start:
            for host in cluster.hosts:
                await host.start()
        yield cluster
    finally:
        try:
            for host in cluster.hosts:
                if host.services is not None:
                    await host.crash()
        finally:
            for host in cluster.hosts:
                if host.member is not None:
                    await host.member.stop_fencer()
            cluster.kill_all()


class Cluster:
    def __init__(self, tmp: Path, secure: bool = True, etcd: list[str] | None = None,
                 lease_ttl: int = 4) -> None:  # fmt: skip
        self.tmp = tmp
        self.ca = TestCA(tmp / "pki") if secure else None
        # etcd's client URLs: the hosts form a cluster (each with its fencer).
        self.etcd = ClusterConfig(etcd=tuple(etcd or ()), lease_ttl=lease_ttl)
        self.storage = tmp / "xen"
        self.storage.mkdir()
        self.plan_file = tmp / "plan.json"
        os.environ["FAKE_QEMU_PLAN"] = str(self.plan_file)
        kernel = tmp / "vmlinuz"
        kernel.write_bytes(b"kernel" * 100)
        qemu = fake_qemu_wrapper(tmp)
        self.hosts = [self._host(n, kernel, qemu) for n in ("h1", "h2")]

    def _host(self, name: str, kernel: Path, qemu: Path) -> FakeHost:
        config = HostConfig(
            name=name,
            state_dir=self.tmp / name / "state",
            run_dir=self.tmp / name / "run",
            accel="tcg",
            storage_roots=(self.storage,),
            qemu_binary=str(qemu),
            relocation=RelocationConfig(address="127.0.0.1", port=0),
            cluster=self.etcd,
            insecure=self.ca is None,
            # The fake QEMU speaks the one-stream (fd:) transport only.
            migration={"channels": 1},
        )
        credentials = self.ca.credentials(name) if self.ca else None
        return FakeHost(name, config, BootFiles(kernel, None), credentials)

    def use_etcd(self, url: str) -> None:
        """Point every host at the etcd member at ``url`` (before they start)."""
        self.etcd = replace(self.etcd, etcd=(url,))
        for host in self.hosts:
            host.config = replace(host.config, cluster=self.etcd)

    def domain(self, name: str = "vm") -> dict[str, Any]:
        disk = self.storage / f"{name}.img"
        if not disk.exists():
            disk.write_bytes(b"\0" * (1 << 20))
        return {
            "name": name,
            "memory": 64,
            "kernel": "ferry",  # the harness's boot files stand in for ferry's own
            "disk": [{"path": str(disk), "target": "xvda", "mode": "w"}],
        }

    def plan(self, **sides: dict[str, Any]) -> None:
        self.plan_file.write_text(json.dumps(sides))

    def release(self) -> None:
        Path(str(self.plan_file) + ".release").touch()

    # -- what really runs -------------------------------------------------------

    def qemus(self) -> dict[int, str]:
        """Every fake QEMU of this test that is alive: PID -> QMP socket."""
        found = {}
        for pid, argv in process.processes(str(FAKE_QEMU).encode(), str(self.tmp).encode()).items():
            if len(argv) > 1 and argv[1] == str(FAKE_QEMU).encode():
                qmp = argv[argv.index(b"-qmp") + 1].decode()
                found[pid] = qmp.removeprefix("unix:").split(",")[0]
        return found

    def copies(self) -> list[dict[str, Any]]:
        """Each live QEMU: its host (by run directory), status and RAM counter."""
        result = []
        for pid, qmp in self.qemus().items():
            host = next(h.name for h in self.hosts if qmp.startswith(str(h.config.run_dir)))
            status = qmp_call(qmp, "query-status")
            ram = qmp_call(qmp, "x-fake-ram")
            result.append(
                {"pid": pid, "host": host, "status": status["status"], "counter": ram["counter"]}
            )
        return result

    async def assert_runs_once(self, host: str, running: bool = True) -> dict[str, Any]:
        """One QEMU of the domain in all the cluster, on ``host``; it runs (or is paused).

        Waits (the event loop goes on: hosts settle their migrations meanwhile)
        until only one QEMU is left.
        """
        await until(lambda: len(self.qemus()) == 1, "one QEMU left")
        copies = await asyncio.to_thread(self.copies)
        assert [c["host"] for c in copies] == [host], copies
        if running:
            # The host that keeps it may still be resuming it (an in-doubt
            # source asks the target first): wait for that, but only that.
            await until(lambda: self.copies()[0]["status"] == "running", "the copy to run")
            copies = await asyncio.to_thread(self.copies)
            assert [c["host"] for c in copies] == [host], copies
        copy = copies[0]
        assert (copy["status"] == "running") is running, copy
        if running:
            # It really runs: its guest makes progress.
            first = copy["counter"]
            await until(
                lambda: qmp_call(self.qemus()[copy["pid"]], "x-fake-ram")["counter"] != first,
                "the guest to make progress",
            )
        return copy

    def kill_all(self) -> None:
        """End every fake QEMU of this test (by its directory in their command line)."""
        for pid in self.qemus():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until_sync(lambda: not self.qemus(), timeout=10, what="the fake QEMUs to end")


def qmp_call(path: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command on a fresh connection (the fake QEMU takes several clients)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        stream = sock.makefile("rwb")
        stream.readline()
        for request in ({"execute": "qmp_capabilities"}, {"execute": command}):
            if request["execute"] == command and arguments:
                request["arguments"] = arguments
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "event" not in reply:
                    break
        if "error" in reply:
            raise RuntimeError(reply["error"]["desc"])
        return reply["return"]


async def until(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    """wait_until for checks that block briefly (QMP on a fresh socket, /proc)."""

    async def probe() -> Any:
        return await asyncio.to_thread(check)

    return await wait_until(probe, timeout=timeout, what=what, interval=0.02)
