"""The bare side's QEMUs and taps, started with ferry's own command line.

``compare_cmdline`` checks that claim against the command line of ferry's
running QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from ferry.domain.config import DomainConfig
from ferry.hypervisor import process
from ferry.hypervisor.cmdline import BootFiles, MachinePaths, build_qemu_args
from ferry.lab import topology
from ferry.lab.lab import Lab
from migbench.settings import BARE_TAPS


@dataclass
class BareQemu:
    host: str
    paths: MachinePaths
    pid: int
    qmp: QMPClient
    events: EventListener


@dataclass
class BareRig:
    """Our own QEMUs and taps in the lab's host namespaces; all undone by ``close``."""

    lab: Lab
    cfg: DomainConfig
    boot: BootFiles
    base: Path
    taps: list[tuple[str, str]] = field(default_factory=list)  # (host, tap)
    qemus: list[BareQemu] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    launches: int = 0

    def args(self, host: str, paths: MachinePaths, incoming: bool) -> list[str]:
        args = build_qemu_args(
            self.cfg, qemu_binary="qemu-system-x86_64", accel="tcg", boot=self.boot,
            paths=paths, taps=[BARE_TAPS[host]], incoming=incoming,
        )  # fmt: skip
        if incoming:
            args.remove("-S")  # autostart: the target runs the guest once loaded
        return args

    def make_tap(self, host: str) -> None:
        tap = BARE_TAPS[host]
        code = (
            "from ferry.network.tap import create_tap; "
            f"create_tap({tap!r}, {topology.HOST_BRIDGE!r})"
        )
        ns = topology.node(host).ns
        subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=30
        )
        self.taps.append((host, tap))

    async def launch(self, host: str, incoming: bool) -> BareQemu:
        self.launches += 1
        run_dir = self.base / f"q{self.launches}"
        paths = MachinePaths(run_dir=run_dir, log_dir=run_dir)
        run_dir.mkdir(parents=True)
        args = self.args(host, paths, incoming)
        argv = ["ip", "netns", "exec", topology.node(host).ns, *args]
        with paths.qemu_log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
            code = await asyncio.wait_for(proc.wait(), 60)
        pid = process.read_pidfile(paths.pidfile)
        if pid is not None:
            self.pids.add(pid)
        if code != 0 or pid is None:
            raise RuntimeError(f"bare QEMU on {host} failed to start: {paths.qemu_log.read_text()}")
        qmp = QMPClient(f"bare-{host}")
        events = EventListener(("STOP", "RESUME", "MIGRATION"))
        qmp.register_listener(events)
        await qmp.connect(str(paths.qmp_socket))
        qemu = BareQemu(host, paths, pid, qmp, events)
        self.qemus.append(qemu)
        return qemu

    async def end(self, qemu: BareQemu) -> None:
        with contextlib.suppress(Exception):
            await qemu.qmp.disconnect()
        await process.terminate(qemu.pid, 5.0)
        self.pids.discard(qemu.pid)
        if qemu in self.qemus:
            self.qemus.remove(qemu)

    async def close(self) -> None:
        for qemu in list(self.qemus):
            await self.end(qemu)
        for pid in list(self.pids):  # started but never connected
            await process.terminate(pid, 5.0)
        self.pids.clear()
        for host, tap in self.taps:
            code = f"from ferry.network.tap import delete_tap; delete_tap({tap!r})"
            ns = topology.node(host).ns
            subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", code], check=False, timeout=30
            )
        self.taps.clear()


def boot_files_from(cmdline: list[str]) -> BootFiles:
    """The kernel and initrd ferry's own QEMU booted (so both sides boot the same files)."""
    kernel = Path(cmdline[cmdline.index("-kernel") + 1])
    initrd = Path(cmdline[cmdline.index("-initrd") + 1]) if "-initrd" in cmdline else None
    return BootFiles(kernel, initrd)


PER_INSTANCE = ("qmp.sock", "console.sock", "qga.sock", "qemu.pid", "qemu.log")


def compare_cmdline(ours: list[str], ferrys: list[str]) -> dict[str, Any]:
    """Our bare command line against ferry's, ignoring per-instance paths and tap names."""

    def norm(args: list[str]) -> list[str]:
        out = []
        for arg in args:
            if any(k in arg for k in PER_INSTANCE):
                arg = "<path>"
            elif arg.startswith("tap,id=net0,ifname="):
                arg = "tap,id=net0,ifname=<tap>,script=no,downscript=no"
            out.append(arg)
        return out

    a, b = norm(ours), norm(ferrys)
    return {"identical": a == b, "only_bare": [x for x in a if x not in b],
            "only_ferry": [x for x in b if x not in a]}  # fmt: skip
