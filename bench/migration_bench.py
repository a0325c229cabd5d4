"""ferry's live migration against a bare QMP migration of the same guest, side by side.

Run as root from the repository (the lab needs network namespaces)::

    .venv/bin/python bench/migration_bench.py [--reps N] [--scenarios idle,classic]
                                              [--out bench/results.json]

For each scenario one lab is brought up (``ferry.lab.lab.up``) and always torn
down again. Then, on the same guest and the same link:

1. ferry: ``ferry create`` on xen_host_1, then ``--reps`` live migrations with
   ``ferry migrate -l --json``, alternating direction (1->2, 2->1, 1->2, ...).
2. bare: ferry's VM is destroyed and two QEMUs are started by this script in
   the host namespaces with ferry's own command line (``build_qemu_args``,
   checked against the command line of ferry's own QEMU), on taps of our own on
   ``xenbr0``, the same disk, MAC and address. The migration is driven directly
   over QMP with the parameters ferry sets (downtime-limit 100 ms, max-bandwidth
   1<<40, auto-converge + events) over QEMU's own ``tcp:`` transport; the
   target is started with ``-incoming defer`` but without ``-S`` (autostart),
   so it resumes the guest as soon as the stream is loaded. Again ``--reps``
   migrations, alternating direction.

Scenarios: ``idle`` (idle guest, unshaped links) and ``classic`` (the player in
client_2 plays /clip.ogg during each migration, 100 Mbit links).

Downtime is source STOP -> target RESUME, both from QMP event timestamps (the
same wall clock: all QEMUs run on this machine). Times are noisy; compare the
ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from ferry.config.loader import load_domain_file
from ferry.domain.config import DomainConfig
from ferry.errors import FerryError
from ferry.hypervisor import process
from ferry.hypervisor.cmdline import BootFiles, MachinePaths, build_qemu_args
from ferry.lab import lab as lab_mod
from ferry.lab import topology
from ferry.lab.lab import Lab
from ferry.lab.player import LabPlayer

VM = topology.VM_NAME
HOSTS = ("xen_host_1", "xen_host_2")
BARE_PORT = 8003  # ferry's relocation server holds 8002
BARE_TAPS = {"xen_host_1": "bare1.0", "xen_host_2": "bare2.0"}
DOWNTIME_LIMIT_MS = 100  # ferry's default max downtime (MigrationParams)
MAX_BANDWIDTH = 1 << 40  # what ferry sets for "no cap"
CLIP = "http://virt_server:8888/clip.ogg"
CLIP_S = 30.0
PLAYER_LEAD_S = 4.0  # the player fills its buffer before the migration starts
SCENARIOS: dict[str, str | None] = {"idle": None, "classic": "100mbit"}
REPO = Path(__file__).resolve().parents[1]

# Targets (ratios within one run).
WALL_RATIO_MAX = 1.25
DOWNTIME_EXTRA_MAX_MS = 15.0
LINK_RATIO_MAX = 1.10
PLAYER_GAP_MAX_MS = 100.0

Log = Callable[[str], None]


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# -- the guest: reachable, not rebooted ------------------------------------------


def witness_status(lab: Lab, timeout: float = 20.0) -> dict[str, Any] | None:
    try:
        result = lab.run(
            "client_2", ["python3", "-m", "ferry.lab.witness", "status", VM], timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_guest(lab: Lab, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = witness_status(lab)
        if status is not None:
            return status
        time.sleep(0.5)
    raise RuntimeError(f"{VM}'s witness service did not answer within {timeout:.0f} s")


# -- the player ------------------------------------------------------------------


@dataclass
class Player:
    """The lab's viewer playing the clip; its summary, or why there is none."""

    viewer: LabPlayer
    started: float

    @classmethod
    def start(cls, lab: Lab, output: Path) -> Player:
        viewer = LabPlayer(lab, output.parent, output.stem, CLIP, buffer_s=10.0)
        return cls(viewer, time.monotonic())

    def finish(self, timeout: float = CLIP_S + 60) -> dict[str, Any]:
        try:
            report = self.viewer.finish(timeout)
        except FerryError as err:
            return {"error": str(err)}
        return {
            "stalls": len(report.get("stalls", [])),
            "reconnects": report.get("reconnects"),
            "checksum": report.get("checksum"),
            "longest_gap_ms": report.get("longest_gap_ms"),
            "bytes_received": report.get("bytes_received"),
            "ended": report.get("ended"),
            "exit_code": self.viewer.proc.returncode,
        }

    def stop(self) -> None:
        self.viewer.stop()


# -- ferry -------------------------------------------------------------------------


def ferry(
    lab: Lab, host: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return lab.run(host, ["ferry", *args], timeout=timeout)


def where_is_vm(lab: Lab) -> str | None:
    for host in HOSTS:
        result = ferry(lab, host, "list", "--json")
        if result.returncode == 0 and any(r["name"] == VM for r in json.loads(result.stdout)):
            return host
    return None


def ferry_qemu_cmdline(lab: Lab, host: str) -> list[str]:
    """The command line of ferry's running QEMU for the VM on ``host``."""
    domains = Path(lab.daemons[host].run_dir) / "domains"
    for entry in sorted(domains.iterdir()):
        if entry.name == VM or entry.name.startswith(f"{VM}@"):
            pid = process.read_pidfile(entry / "qemu.pid")
            if pid is not None and process.is_alive(pid):
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                return [a.decode() for a in raw.split(b"\0") if a]
    raise RuntimeError(f"no running QEMU of ferry's {VM} on {host}")


def run_ferry(
    lab: Lab, scenario: str, reps: int, with_player: bool
) -> tuple[list[dict[str, Any]], dict[str, list[str]], dict[str, Any] | None]:
    log(f"[{scenario}] ferry: create {VM} on xen_host_1")
    result = ferry(lab, "xen_host_1", "create", str(lab.domain_config))
    if result.returncode != 0:
        raise RuntimeError(f"ferry create failed: {result.stderr.strip()}")
    before = wait_guest(lab)
    created_cmdline = ferry_qemu_cmdline(lab, "xen_host_1")
    time.sleep(3)  # let the guest's services settle after boot
    control: dict[str, Any] | None = None
    if with_player:
        # The same clip with no migration: the player's largest gap at rest.
        log(f"[{scenario}] control: the player with no migration")
        control = Player.start(lab, lab.workdir / "watch-control.json").finish()
        log(f"[{scenario}] control: {control}")
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        src, dst = HOSTS[rep % 2], HOSTS[(rep + 1) % 2]
        player = None
        if with_player:
            player = Player.start(lab, lab.workdir / f"watch-ferry-{rep}.json")
            time.sleep(PLAYER_LEAD_S)
        start = time.monotonic()
        result = ferry(lab, src, "migrate", "-l", "--json", VM, dst)
        wall = time.monotonic() - start
        if result.returncode != 0:
            if player:
                player.stop()
            raise RuntimeError(f"ferry migrate {src} -> {dst} failed: {result.stderr.strip()}")
        out = json.loads(result.stdout)
        run: dict[str, Any] = {
            "mode": "ferry", "rep": rep, "src": src, "dst": dst,
            "wall_s": round(wall, 3),
            "qemu_time_s": out.get("transfer_s"),
            "ferryd_total_s": out.get("total_s"),
            "downtime_ms": out.get("switchover_ms"),
            "qemu_downtime_ms": out.get("qemu_downtime_ms"),
            "commit_ms": out.get("commit_ms"),
            "bytes_sent": out.get("bytes_sent"),
            "passes": out.get("passes"),
            "overhead_s": round(wall - float(out.get("transfer_s") or 0), 3),
            "raw": out,
        }  # fmt: skip
        if player:
            run["migration_end_in_clip_s"] = round(time.monotonic() - player.started, 1)
            run["player"] = player.finish()
        run["guest_ok"] = guest_survived(lab, before)
        log(f"[{scenario}] ferry {src} -> {dst}: {brief(run)}")
        runs.append(run)
    host = where_is_vm(lab)
    cmdlines = {"created": created_cmdline}
    if reps and host:
        cmdlines["arrived"] = ferry_qemu_cmdline(lab, host)
    if host:
        result = ferry(lab, host, "destroy", VM)
        if result.returncode != 0:
            raise RuntimeError(f"ferry destroy failed: {result.stderr.strip()}")
    return runs, cmdlines, control


def guest_survived(lab: Lab, before: dict[str, Any]) -> bool:
    now = witness_status(lab)
    return bool(now and now.get("boot_id") == before.get("boot_id"))


def brief(run: dict[str, Any]) -> str:
    text = (
        f"wall {run['wall_s']:.2f} s, qemu {run['qemu_time_s']:.2f} s, "
        f"downtime {run['downtime_ms']} ms, {run['bytes_sent'] / 1e6:.1f} MB, "
        f"passes {run['passes']}, guest ok {run['guest_ok']}"
    )
    if "player" in run:
        p = run["player"]
        text += f", player gap {p.get('longest_gap_ms')} ms, stalls {p.get('stalls')}"
    return text


# -- bare QEMU over QMP --------------------------------------------------------------


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


def event_ts(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def next_event(events: EventListener, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {name} event within {timeout:.0f} s")
        event = await asyncio.wait_for(events.get(), remaining)
        if event["event"] == name:
            return dict(event)


async def bare_migrate(
    rig: BareRig, src: BareQemu, dst_host: str
) -> tuple[dict[str, Any], BareQemu]:
    """One bare live migration from ``src`` to a new QEMU on ``dst_host``."""
    launch_start = time.time()
    dst = await rig.launch(dst_host, incoming=True)
    address = topology.node(dst_host).address
    uri = f"tcp:{address}:{BARE_PORT}"
    dst.events.clear()
    src.events.clear()
    await dst.qmp.execute("migrate-incoming", {"uri": uri})
    caps = {"auto-converge": True, "xbzrle": False, "events": True}
    await src.qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )
    await src.qmp.execute(
        "migrate-set-parameters",
        {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH},
    )
    start = time.time()
    await src.qmp.execute("migrate", {"uri": uri})
    stop = await next_event(src.events, "STOP", 600)
    resume = await next_event(dst.events, "RESUME", 120)
    while True:
        info: Any = await src.qmp.execute("query-migrate")
        if info.get("status") == "completed":
            break
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"bare migration {info.get('status')}: {info.get('error-desc')}")
        await asyncio.sleep(0.05)
    ram = info.get("ram", {})
    qemu_total_s = float(info.get("total-time", 0)) / 1000
    run: dict[str, Any] = {
        "mode": "bare", "src": src.host, "dst": dst_host,
        # migrate command -> target RESUME: the engine's own end-to-end time.
        "wall_s": round(event_ts(resume) - start, 3),
        "wall_with_target_launch_s": round(event_ts(resume) - launch_start, 3),
        "qemu_time_s": round(qemu_total_s, 3),
        "downtime_ms": round((event_ts(resume) - event_ts(stop)) * 1000, 1),
        "qemu_downtime_ms": info.get("downtime"),
        "commit_ms": None,
        "bytes_sent": int(ram.get("transferred", 0)),
        "passes": int(ram.get("dirty-sync-count", 0)),
        "overhead_s": round(event_ts(resume) - start - qemu_total_s, 3),
        "raw": info,
    }  # fmt: skip
    await rig.end(src)
    return run, dst


async def run_bare_async(
    lab: Lab, scenario: str, reps: int, with_player: bool, ferry_cmdlines: dict[str, list[str]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cfg = load_domain_file(lab.domain_config)
    boot = boot_files_from(ferry_cmdlines["created"])
    base = Path(tempfile.mkdtemp(prefix="bare-", dir=lab.workdir))
    rig = BareRig(lab, cfg, boot, base)
    runs: list[dict[str, Any]] = []
    try:
        for host in HOSTS:
            rig.make_tap(host)
        # Ours against ferry's own: identical but for per-instance paths and tap
        # names, and (on a target) the "-S" that ferry's commit step needs.
        paths = MachinePaths(base, base)
        check = {
            "created": compare_cmdline(
                rig.args("xen_host_1", paths, False), ferry_cmdlines["created"]
            )
        }
        if "arrived" in ferry_cmdlines:
            check["arrived"] = compare_cmdline(
                rig.args("xen_host_1", paths, True), ferry_cmdlines["arrived"]
            )
        log(f"[{scenario}] bare: start {VM} on xen_host_1 (command line vs ferry's: {check})")
        src = await rig.launch("xen_host_1", incoming=False)
        before = await asyncio.to_thread(wait_guest, lab)
        await asyncio.sleep(3)
        for rep in range(reps):
            dst_host = HOSTS[(rep + 1) % 2]
            player = None
            if with_player:
                player = Player.start(lab, lab.workdir / f"watch-bare-{rep}.json")
                await asyncio.sleep(PLAYER_LEAD_S)
            try:
                run, src = await bare_migrate(rig, src, dst_host)
            except BaseException:
                if player:
                    player.stop()
                raise
            run["rep"] = rep
            if player:
                run["migration_end_in_clip_s"] = round(time.monotonic() - player.started, 1)
                run["player"] = await asyncio.to_thread(player.finish)
            run["guest_ok"] = await asyncio.to_thread(guest_survived, lab, before)
            log(f"[{scenario}] bare {run['src']} -> {run['dst']}: {brief(run)}")
            runs.append(run)
    finally:
        await rig.close()
        shutil.rmtree(base, ignore_errors=True)
    return runs, check


def boot_files_from(cmdline: list[str]) -> BootFiles:
    """The kernel and initrd ferry's own QEMU booted (so both sides boot the same files)."""
    kernel = Path(cmdline[cmdline.index("-kernel") + 1])
    initrd = Path(cmdline[cmdline.index("-initrd") + 1]) if "-initrd" in cmdline else None
    return BootFiles(kernel, initrd)


def compare_cmdline(ours: list[str], ferrys: list[str]) -> dict[str, Any]:
    """Our bare command line against ferry's, ignoring per-instance paths and tap names."""

    def norm(args: list[str]) -> list[str]:
        out = []
        for arg in args:
            if any(k in arg for k in ("qmp.sock", "console.sock", "qemu.pid", "qemu.log")):
                arg = "<path>"
            elif arg.startswith("tap,id=net0,ifname="):
                arg = "tap,id=net0,ifname=<tap>,script=no,downscript=no"
            out.append(arg)
        return out

    a, b = norm(ours), norm(ferrys)
    return {"identical": a == b, "only_bare": [x for x in a if x not in b],
            "only_ferry": [x for x in b if x not in a]}  # fmt: skip


# -- summary and targets ------------------------------------------------------------------


def stats(values: list[float | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(vals), 3),
        "min": round(min(vals), 3),
        "max": round(max(vals), 3),
        "n": len(vals),
    }


METRICS = (
    "wall_s", "wall_with_target_launch_s", "qemu_time_s", "downtime_ms",
    "qemu_downtime_ms", "commit_ms", "bytes_sent", "overhead_s", "passes",
)  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {m: stats([r.get(m) for r in runs]) for m in METRICS}
    players = [r["player"] for r in runs if "player" in r]
    if players:
        out["player_longest_gap_ms"] = stats([p.get("longest_gap_ms") for p in players])
        out["player_stalls_total"] = sum(int(p.get("stalls") or 0) for p in players)
        out["player_reconnects_total"] = sum(int(p.get("reconnects") or 0) for p in players)
    out["guest_ok"] = all(r.get("guest_ok") for r in runs)
    return out


def rate_bytes_per_s(rate: str | None) -> float | None:
    if rate is None:
        return None
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}
    num = rate.removesuffix("bit")
    return float(num[:-1]) * scale[num[-1]] / 8 if num[-1] in scale else float(num) / 8


def verdicts(
    scenario: str, rate: str | None, ferry_s: dict[str, Any], bare_s: dict[str, Any]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float | None, unit: str) -> None:
        if value is None or limit is None:
            out.append({"scenario": scenario, "target": name, "met": None, "detail": "no data"})
            return
        met = value <= limit
        margin = limit - value
        word = "under" if met else "over"
        out.append({
            "scenario": scenario, "target": name, "met": met,
            "value": round(value, 3), "limit": round(limit, 3), "unit": unit,
            "detail": f"{value:.3g} {unit} vs limit {limit:.3g} {unit}: "
                      f"{abs(margin):.3g} {unit} {word}",
        })  # fmt: skip

    fw, bw = ferry_s["wall_s"]["median"], bare_s["wall_s"]["median"]
    add(
        f"ferry wall time <= {WALL_RATIO_MAX} x bare (median)",
        fw,
        bw * WALL_RATIO_MAX if bw else None,
        "s",
    )
    fd, bd = ferry_s["downtime_ms"]["median"], bare_s["downtime_ms"]["median"]
    add(
        f"ferry downtime <= bare + {DOWNTIME_EXTRA_MAX_MS:.0f} ms (median)",
        fd,
        bd + DOWNTIME_EXTRA_MAX_MS if bd is not None else None,
        "ms",
    )
    bps = rate_bytes_per_s(rate)
    if bps is not None:
        for mode, s in (("ferry", ferry_s), ("bare", bare_s)):
            nbytes = s["bytes_sent"]["median"]
            wire = nbytes / bps if nbytes else None
            add(
                f"{mode} wall time <= {LINK_RATIO_MAX} x bytes/link rate (median)",
                s["wall_s"]["median"],
                wire * LINK_RATIO_MAX if wire else None,
                "s",
            )
    if "player_longest_gap_ms" in ferry_s:
        add(
            f"player's largest gap < {PLAYER_GAP_MAX_MS:.0f} ms (worst ferry run)",
            ferry_s["player_longest_gap_ms"]["max"],
            PLAYER_GAP_MAX_MS,
            "ms",
        )
        add("player stalls == 0 (all ferry runs)", ferry_s["player_stalls_total"], 0, "stalls")
    return out


# -- machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    os_name = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpu": cpu, "cores": os.cpu_count(), "qemu": qemu[0] if qemu else "unknown",
        "kernel": platform.release(), "os": os_name, "python": platform.python_version(),
        "accel": "tcg", "loadavg_at_start": os.getloadavg(),
    }  # fmt: skip


# -- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def lab_session(rate: str | None, memory: int) -> Iterator[Lab]:
    workdir = Path(tempfile.mkdtemp(prefix="ferrybench-", dir="/tmp"))
    try:
        yield lab_mod.up("nfs", rate=rate, workdir=workdir, memory=memory, log=log)
    finally:
        log("tearing the lab down")
        lab_mod.down(workdir, log=lambda _line: None)
        shutil.rmtree(workdir, ignore_errors=True)


def run_scenario(name: str, reps: int, memory: int) -> dict[str, Any]:
    rate = SCENARIOS[name]
    with_player = name == "classic"
    started = time.monotonic()
    with lab_session(rate, memory) as lab:
        ferry_runs, cmdlines, control = run_ferry(lab, name, reps, with_player)
        bare_runs, check = asyncio.run(run_bare_async(lab, name, reps, with_player, cmdlines))
    ferry_s, bare_s = summarize(ferry_runs), summarize(bare_runs)
    return {
        "rate": rate, "storage": "nfs", "memory_mib": memory, "reps": reps,
        "player": CLIP if with_player else None,
        "cmdline_check": check,
        "control_player": control,
        "ferry": {"summary": ferry_s, "runs": ferry_runs},
        "bare": {"summary": bare_s, "runs": bare_runs},
        "targets": verdicts(name, rate, ferry_s, bare_s),
        "elapsed_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


def print_report(results: dict[str, Any]) -> None:
    for name, sc in results["scenarios"].items():
        print(f"\n== {name} (link {sc['rate'] or 'unshaped'}, {sc['reps']} reps each) ==")
        for mode in ("ferry", "bare"):
            s = sc[mode]["summary"]
            parts = [f"{m} {s[m]['median']} [{s[m]['min']}..{s[m]['max']}]" for m in METRICS]
            if "player_longest_gap_ms" in s:
                g = s["player_longest_gap_ms"]
                parts.append(f"gap {g['median']} [{g['min']}..{g['max']}]")
                parts.append(f"stalls {s['player_stalls_total']}")
            print(f"  {mode:5}: " + ", ".join(parts))
        for t in sc["targets"]:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
            print(f"  {mark} {t['target']}: {t['detail']}")


MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    if os.getpid() != MAIN_PID:
        # A fork of ours (pyroute2's netns helpers fork without exec, and end
        # their children with SIGTERM): die as by default, never tear down.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _cell(s: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 2) -> str:
    st = s.get(metric)
    if not st or st["median"] is None:
        return "-"
    med, lo, hi = (st[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables: median (min-max) per scenario and mode."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, kernel {m['kernel']}, "
        f"{m['qemu']}, accel {m['accel']}. Run started {results['started']}.",
        "",
        "| scenario | mode | n | total wall s | QEMU migration s | wall incl. target launch s "
        "| downtime ms (STOP->RESUME) | QEMU downtime ms | commit ms | MB sent | passes "
        "| control overhead s | player largest gap ms | stalls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sc in results["scenarios"].items():
        for mode in ("ferry", "bare"):
            s = sc[mode]["summary"]
            wall_launch = s["wall_s"] if mode == "ferry" else s["wall_with_target_launch_s"]
            gap = _cell(s, "player_longest_gap_ms", digits=0)
            stalls = str(s["player_stalls_total"]) if "player_stalls_total" in s else "-"
            row = [
                f"{name} ({sc['rate'] or 'unshaped'})", mode, str(s["wall_s"]["n"]),
                _cell(s, "wall_s"), _cell(s, "qemu_time_s"),
                _cell({"x": wall_launch}, "x"),
                _cell(s, "downtime_ms", digits=1), _cell(s, "qemu_downtime_ms", digits=0),
                _cell(s, "commit_ms", digits=1), _cell(s, "bytes_sent", 1e-6, 1),
                _cell(s, "passes", digits=0), _cell(s, "overhead_s"), gap, stalls,
            ]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| scenario | target | verdict | detail |", "|---|---|---|---|"]
    for name, sc in results["scenarios"].items():
        for t in sc["targets"]:
            verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            lines.append(f"| {name} | {t['target']} | {verdict} | {t['detail']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="migrations per mode (default 3)")
    parser.add_argument("--scenarios", default="idle,classic", help="comma-separated")
    parser.add_argument("--memory", type=int, default=lab_mod.DEFAULT_MEMORY, help="guest MiB")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument(
        "--markdown", type=Path, metavar="RESULTS", help="print the tables of a results file"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    if os.geteuid() != 0:
        parser.error("run as root: the lab needs network namespaces")
    # The bare QEMUs daemonize: as a subreaper we stay their parent and reap them.
    process.become_subreaper()
    # SIGTERM ends us like Ctrl-C, so that the lab is torn down either way.
    signal.signal(signal.SIGTERM, _interrupt)
    results: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "targets": {
            "wall_ratio_max": WALL_RATIO_MAX, "downtime_extra_max_ms": DOWNTIME_EXTRA_MAX_MS,
            "link_ratio_max": LINK_RATIO_MAX, "player_gap_max_ms": PLAYER_GAP_MAX_MS,
        },
        "scenarios": {},
    }  # fmt: skip
    for name in names:
        results["scenarios"][name] = run_scenario(name, args.reps, args.memory)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_report(results)
    print("\n" + markdown(results))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
