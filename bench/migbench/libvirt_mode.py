"""libvirt's migrations of the same guest: ``virsh migrate --live --p2p``, with its defaults
and with its best flags, between two libvirtd's in the lab's host namespaces."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.hypervisor.cmdline import BootFiles
from ferry.lab.lab import Lab
from migbench.guest import Player, guest_survived, wait_guest
from migbench.libvirt_rig import LibvirtRig, QemuReaper, domain_xml, uri
from migbench.report import brief
from migbench.settings import HOSTS, LIBVIRT_VARIANTS, PLAYER_LEAD_S, VM, log

_EVENT = re.compile(r"event (\w+) at (\d+)\.(\d{6}) for domain '[^']*': ?(.*)")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
# virsh gives no sign once its event callback is registered; connecting takes
# ~20 ms here. A missing event shows as a run with no downtime, never as 0.
EVENT_LEAD_S = 1.0
MIGRATE_TIMEOUT_S = 600.0


def parse_events(text: str, name: str, status: str | None = None) -> list[float]:
    """QEMU's own timestamps of ``name`` events in ``virsh qemu-monitor-event`` output
    (for MIGRATION, only those with ``status``)."""
    out = []
    for m in _EVENT.finditer(text):
        details = m.group(4).replace(" ", "")
        if m.group(1) == name and (status is None or f'"status":"{status}"' in details):
            out.append(int(m.group(2)) + int(m.group(3)) / 1e6)
    return out


def parse_jobinfo(text: str) -> dict[str, float]:
    """``virsh domjobinfo`` (C locale): the numbers, sizes in bytes, times in ms, rates as
    printed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        unit = parts[1] if len(parts) > 1 else ""
        out[key.strip()] = value * _UNITS.get(unit, 1)
    return out


def _stop(watcher: subprocess.Popen[str]) -> str:
    watcher.send_signal(signal.SIGINT)  # virsh ends its --loop cleanly on Ctrl-C
    try:
        out, _ = watcher.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        watcher.kill()
        out, _ = watcher.communicate()
    return out or ""


def libvirt_migrate(rig: LibvirtRig, src: str, dst: str, flags: list[str]) -> dict[str, Any]:
    source_events, target_events = rig.events(src), rig.events(dst)
    try:
        time.sleep(EVENT_LEAD_S)
        start = time.monotonic()
        result = rig.virsh(
            src, "migrate", "--live", "--p2p", *flags, VM, uri(dst),
            check=False, timeout=MIGRATE_TIMEOUT_S,
        )  # fmt: skip
        wall = time.monotonic() - start
    finally:
        source_text, target_text = _stop(source_events), _stop(target_events)
    if result.returncode != 0:
        raise RuntimeError(f"virsh migrate {src} -> {dst}: {result.stderr.strip()}")
    job = parse_jobinfo(rig.virsh(dst, "domjobinfo", "--completed", VM).stdout)
    stop_ts, resume_ts = parse_events(source_text, "STOP"), parse_events(target_text, "RESUME")
    downtime = (resume_ts[-1] - stop_ts[-1]) * 1000 if stop_ts and resume_ts else None
    # QEMU's part, from its own MIGRATION events on the source: libvirt's
    # "Time elapsed" also counts its job's set-up and the target's launch.
    began = parse_events(source_text, "MIGRATION", "setup")
    done = parse_events(source_text, "MIGRATION", "completed")
    qemu_s = done[-1] - began[-1] if began and done else None
    data, passes = job.get("Data processed"), job.get("Iteration")
    return {
        "src": src, "dst": dst,
        # The whole virsh command, as ferry's wall is its whole CLI; libvirt
        # launches the target's QEMU inside it.
        "wall_s": round(wall, 3), "wall_with_target_launch_s": round(wall, 3),
        "qemu_time_s": round(qemu_s, 3) if qemu_s is not None else None,
        "downtime_ms": round(downtime, 1) if downtime is not None else None,
        # libvirt replaces QEMU's own downtime with its figure (its STOP ->
        # the target's finish): kept apart, not in QEMU's column.
        "qemu_downtime_ms": None,
        "libvirt_downtime_ms": job.get("Total downtime"),
        "commit_ms": None,
        "bytes_sent": int(data) if data is not None else None,
        "passes": int(passes) if passes is not None else None,
        "overhead_s": round(wall - qemu_s, 3) if qemu_s is not None else None,
        "finished": True,
        "raw": job,
    }  # fmt: skip


def run_libvirt(
    lab: Lab, scenario: str, reps: int, with_player: bool, cfg: DomainConfig, boot: BootFiles
) -> dict[str, list[dict[str, Any]]]:
    """Every libvirt variant, ``reps`` migrations each, alternating direction."""
    base = Path(tempfile.mkdtemp(prefix="libvirt-", dir=lab.workdir))
    rig = LibvirtRig(base)
    (base / "domain.xml").write_text(domain_xml(cfg, boot))
    out: dict[str, list[dict[str, Any]]] = {}
    with QemuReaper():
        try:
            for host in HOSTS:
                rig.start(host)
            for variant, flags in LIBVIRT_VARIANTS.items():
                out[variant] = _run_variant(lab, scenario, reps, with_player, rig, variant, flags)
        finally:
            rig.close()
            shutil.rmtree(base, ignore_errors=True)
    return out


def _run_variant(
    lab: Lab,
    scenario: str,
    reps: int,
    with_player: bool,
    rig: LibvirtRig,
    variant: str,
    flags: list[str],
) -> list[dict[str, Any]]:
    log(f"[{scenario}] {variant}: virsh create {VM} on xen_host_1")
    rig.virsh("xen_host_1", "create", str(rig.base / "domain.xml"))
    before = wait_guest(lab)
    time.sleep(3)  # let the guest's services settle after boot, as for ferry
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        src, dst = HOSTS[rep % 2], HOSTS[(rep + 1) % 2]
        player = None
        if with_player:
            player = Player.start(lab, lab.workdir / f"watch-{variant}-{rep}.json")
            time.sleep(PLAYER_LEAD_S)
        try:
            run = {"mode": variant, "rep": rep, **libvirt_migrate(rig, src, dst, flags)}
        except BaseException:
            if player:
                player.stop()
            raise
        if player:
            run["migration_end_in_clip_s"] = round(time.monotonic() - player.started, 1)
            run["player"] = player.finish()
        run["guest_ok"] = guest_survived(lab, before)
        log(f"[{scenario}] {variant} {src} -> {dst}: {brief(run)}")
        runs.append(run)
    rig.virsh(HOSTS[reps % 2], "destroy", VM)
    return runs
