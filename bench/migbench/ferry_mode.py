"""ferry's migrations, through the ``ferry`` CLI in the lab's host namespaces."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from ferry.hypervisor import process
from ferry.lab.lab import Lab
from migbench.guest import Player, guest_survived, start_busy, wait_guest, workload
from migbench.report import brief
from migbench.settings import FERRY_VARIANTS, HOSTS, PLAYER_LEAD_S, VM, log


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
    lab: Lab, scenario: str, reps: int, with_player: bool, mode: str = "ferry"
) -> tuple[list[dict[str, Any]], dict[str, list[str]], dict[str, Any] | None]:
    """ferry's reps in ``mode`` (a FERRY_VARIANTS key: its ``ferry migrate`` flags)."""
    flags = FERRY_VARIANTS[mode]
    log(f"[{scenario}] {mode}: create {VM} on xen_host_1")
    result = ferry(lab, "xen_host_1", "create", str(lab.domain_config))
    if result.returncode != 0:
        raise RuntimeError(f"ferry create failed: {result.stderr.strip()}")
    before = wait_guest(lab)
    created_cmdline = ferry_qemu_cmdline(lab, "xen_host_1")
    time.sleep(3)  # let the guest's services settle after boot
    busy = scenario == "busy"
    if busy:
        start_busy(lab)
    control: dict[str, Any] | None = None
    if with_player and mode == "ferry":
        # The same clip with no migration: the player's largest gap at rest.
        log(f"[{scenario}] control: the player with no migration")
        control = Player.start(lab, lab.workdir / "watch-control.json").finish()
        log(f"[{scenario}] control: {control}")
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        src, dst = HOSTS[rep % 2], HOSTS[(rep + 1) % 2]
        player = None
        if with_player:
            player = Player.start(lab, lab.workdir / f"watch-{mode}-{rep}.json")
            time.sleep(PLAYER_LEAD_S)
        pages = workload(lab, "status")["pages"] if busy else 0
        start = time.monotonic()
        result = ferry(lab, src, "migrate", "-l", "--json", *flags, VM, dst)
        wall = time.monotonic() - start
        if result.returncode != 0:
            if player:
                player.stop()
            raise RuntimeError(f"ferry migrate {src} -> {dst} failed: {result.stderr.strip()}")
        out = json.loads(result.stdout)
        run: dict[str, Any] = {
            "mode": mode, "rep": rep, "src": src, "dst": dst,
            "wall_s": round(wall, 3),
            "qemu_time_s": out.get("transfer_s"),
            "ferryd_total_s": out.get("total_s"),
            "downtime_ms": out.get("switchover_ms"),
            "qemu_downtime_ms": out.get("qemu_downtime_ms"),
            "commit_ms": out.get("commit_ms"),
            "bytes_sent": out.get("bytes_sent"),
            "passes": out.get("passes"),
            "overhead_s": round(wall - float(out.get("transfer_s") or 0), 3),
            "postcopy_s": out.get("postcopy_s"),
            "postcopy_requests": out.get("postcopy_requests"),
            "raw": out,
        }  # fmt: skip
        if player:
            run["migration_end_in_clip_s"] = round(time.monotonic() - player.started, 1)
            run["player"] = player.finish()
        run["guest_ok"] = guest_survived(lab, before)
        if busy:
            after = workload(lab, "status")
            run["workload"] = {"pages_before": pages, **after}
            run["finished"] = True
        log(f"[{scenario}] {mode} {src} -> {dst}: {brief(run)}")
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
