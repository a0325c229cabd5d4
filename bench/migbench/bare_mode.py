"""Bare migrations: QEMU to QEMU, driven directly over QMP with the parameters ferry sets."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from ferry.config.loader import load_domain_file
from ferry.domain.config import DomainConfig
from ferry.hypervisor.cmdline import BootFiles, MachinePaths
from ferry.lab import topology
from ferry.lab.lab import Lab
from ferry.util.wait import wait_until
from migbench.bare_rig import BareQemu, BareRig, boot_files_from, compare_cmdline
from migbench.guest import Player, guest_survived, start_busy, wait_guest
from migbench.report import brief
from migbench.settings import (
    BARE_GIVE_UP_S,
    BARE_PORT,
    BARE_VARIANTS,
    DOWNTIME_LIMIT_MS,
    HOSTS,
    MAX_BANDWIDTH,
    PLAYER_LEAD_S,
    VM,
    log,
)


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
    rig: BareRig, src: BareQemu, dst_host: str, variant: str = "bare", give_up_s: float = 600
) -> tuple[dict[str, Any], BareQemu]:
    """One bare live migration from ``src`` to a new QEMU on ``dst_host``."""
    multifd = BARE_VARIANTS[variant]
    launch_start = time.time()
    dst = await rig.launch(dst_host, incoming=True)
    address = topology.node(dst_host).address
    uri = f"tcp:{address}:{BARE_PORT}"
    dst.events.clear()
    src.events.clear()
    caps = {"auto-converge": True, "xbzrle": False, "events": True, "multifd": bool(multifd)}
    if multifd:
        await dst.qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]}
        )
        await dst.qmp.execute("migrate-set-parameters", dict(multifd))
    await dst.qmp.execute("migrate-incoming", {"uri": uri})
    await src.qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )
    await src.qmp.execute(
        "migrate-set-parameters",
        {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH, **multifd},
    )
    start = time.time()
    await src.qmp.execute("migrate", {"uri": uri})
    try:
        stop = await next_event(src.events, "STOP", give_up_s)
    except TimeoutError:
        # Plain pre-copy never got there: cancel, and the VM stays where it is.
        last: Any = await src.qmp.execute("query-migrate")
        await src.qmp.execute("migrate_cancel")
        await rig.end(dst)
        ram = last.get("ram", {}) if isinstance(last, dict) else {}
        return {
            "mode": variant, "src": src.host, "dst": dst_host, "finished": False,
            "gave_up_after_s": give_up_s, "bytes_sent": int(ram.get("transferred", 0)),
            "passes": int(ram.get("dirty-sync-count", 0)),
            "remaining_mb": round(int(ram.get("remaining", 0)) / 1e6, 1),
            "dirty_mb_s": round(float(ram.get("dirty-pages-rate", 0)) * 4096 / 1e6, 1),
        }, src  # fmt: skip
    resume = await next_event(dst.events, "RESUME", 120)

    async def completed() -> dict[str, Any] | None:
        reply: Any = await src.qmp.execute("query-migrate")
        info: dict[str, Any] = reply
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"bare migration {info.get('status')}: {info.get('error-desc')}")
        return info if info.get("status") == "completed" else None

    # The target has resumed: the source only has to notice that the stream is done.
    info: dict[str, Any] = await wait_until(
        completed, timeout=60, what="the bare migration to complete"
    )
    ram = info.get("ram", {})
    qemu_total_s = float(info.get("total-time", 0)) / 1000
    run: dict[str, Any] = {
        "mode": variant, "src": src.host, "dst": dst_host,
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
        "finished": True,
        "raw": info,
    }  # fmt: skip
    await rig.end(src)
    return run, dst


def bench_domain(lab: Lab, ferry_cmdlines: dict[str, list[str]]) -> tuple[DomainConfig, BootFiles]:
    """The lab's domain config and the boot files ferry's own QEMU booted."""
    # The lab's disk is raw (lab up's default), as ferry pinned it at create;
    # compare_cmdline holds the bare command line to ferry's.
    loaded = load_domain_file(lab.domain_config)
    cfg = replace(loaded, disks=tuple(replace(d, format=d.format or "raw") for d in loaded.disks))
    return cfg, boot_files_from(ferry_cmdlines["created"])


async def run_bare_async(
    lab: Lab,
    scenario: str,
    reps: int,
    with_player: bool,
    ferry_cmdlines: dict[str, list[str]],
    variant: str = "bare",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cfg, boot = bench_domain(lab, ferry_cmdlines)
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
        busy = scenario == "busy"
        if busy:
            await asyncio.to_thread(start_busy, lab)
        for rep in range(reps):
            dst_host = HOSTS[(rep + 1) % 2]
            player = None
            if with_player:
                player = Player.start(lab, lab.workdir / f"watch-{variant}-{rep}.json")
                await asyncio.sleep(PLAYER_LEAD_S)
            try:
                give_up = BARE_GIVE_UP_S if busy else 600.0
                run, src = await bare_migrate(rig, src, dst_host, variant, give_up)
            except BaseException:
                if player:
                    player.stop()
                raise
            run["rep"] = rep
            if player:
                run["migration_end_in_clip_s"] = round(time.monotonic() - player.started, 1)
                run["player"] = await asyncio.to_thread(player.finish)
            run["guest_ok"] = await asyncio.to_thread(guest_survived, lab, before)
            log(f"[{scenario}] {variant} {run['src']} -> {run['dst']}: {brief(run)}")
            runs.append(run)
            if not run["finished"]:
                break  # the VM is where it was; the next rep would only repeat this
    finally:
        await rig.close()
        shutil.rmtree(base, ignore_errors=True)
    return runs, check
