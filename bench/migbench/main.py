"""ferry's live migration against a bare QMP migration of the same guest, side by side.

One lab per scenario, always torn down; see ``bench/migration_bench.py`` and
``bench/README.md``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferry.hypervisor import process
from ferry.lab import lab as lab_mod
from ferry.lab.lab import Lab
from migbench import libvirt_rig
from migbench.bare_mode import bench_domain, run_bare_async
from migbench.ferry_mode import run_ferry
from migbench.libvirt_mode import run_libvirt
from migbench.machine import machine
from migbench.report import markdown, print_report
from migbench.settings import (
    BARE_VARIANTS,
    CLASSIC_WALL_RATIO_MAX,
    CLIP,
    CONTROL_OVERHEAD_MAX_S,
    IDLE_WALL_RATIO_MAX,
    LIBVIRT_SCENARIOS,
    LIBVIRT_WALL_RATIO_MAX,
    PLAYER_GAP_MAX_MS,
    POSTCOPY_SCENARIOS,
    SCENARIOS,
    SWITCHOVER_MAX_MS,
    log,
)
from migbench.summary import summarize, verdicts

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def lab_session(rate: str | None, memory: int) -> Iterator[Lab]:
    workdir = Path(tempfile.mkdtemp(prefix="ferrybench-", dir="/tmp"))
    try:
        yield lab_mod.up("nfs", rate=rate, workdir=workdir, memory=memory, log=log)
    finally:
        log("tearing the lab down")
        lab_mod.down(workdir, log=lambda _line: None)
        shutil.rmtree(workdir, ignore_errors=True)


def run_scenario(name: str, reps: int, memory: int, with_libvirt: bool) -> dict[str, Any]:
    rate = SCENARIOS[name]
    with_player = name == "classic"
    started = time.monotonic()
    skipped = None if with_libvirt else "--no-libvirt"
    if skipped is None and name not in LIBVIRT_SCENARIOS:
        skipped = f"not run in the {name} scenario"
    skipped = skipped or libvirt_rig.missing()
    with lab_session(rate, memory) as lab:
        ferry_runs, cmdlines, control = run_ferry(lab, name, reps, with_player)
        others: dict[str, list[dict[str, Any]]] = {}
        if name in POSTCOPY_SCENARIOS:
            others["ferry_postcopy"] = run_ferry(lab, name, reps, with_player, "ferry_postcopy")[0]
        for variant in BARE_VARIANTS:
            others[variant], check = asyncio.run(
                run_bare_async(lab, name, reps, with_player, cmdlines, variant)
            )
        if skipped is None:
            cfg, boot = bench_domain(lab, cmdlines)
            try:
                others.update(run_libvirt(lab, name, reps, with_player, cfg, boot))
            except Exception as err:  # libvirt is optional: its failure loses no other row
                skipped = f"failed: {err}"
                log(f"[{name}] libvirt: {skipped}")
        else:
            log(f"[{name}] libvirt: not run ({skipped})")
    modes: dict[str, dict[str, Any]] = {
        v: {"summary": summarize(runs), "runs": runs} for v, runs in others.items()
    }
    ferry_s = summarize(ferry_runs)
    libvirt = {v: m["summary"] for v, m in modes.items() if v.startswith("libvirt")}
    postcopy = modes["ferry_postcopy"]["summary"] if "ferry_postcopy" in modes else None
    return {
        "rate": rate, "storage": "nfs", "memory_mib": memory, "reps": reps,
        "player": CLIP if with_player else None,
        "cmdline_check": check,
        "control_player": control,
        "ferry": {"summary": ferry_s, "runs": ferry_runs},
        **modes,
        "libvirt_skipped": skipped,
        "targets": verdicts(name, rate, ferry_s, modes["bare"]["summary"], libvirt, postcopy),
        "elapsed_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    if os.getpid() != MAIN_PID:
        # A fork of ours (pyroute2's netns helpers fork without exec, and end
        # their children with SIGTERM): die as by default, never tear down.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="migrations per mode (default 3)")
    parser.add_argument("--scenarios", default="idle,classic", help="comma-separated")
    parser.add_argument("--memory", type=int, default=lab_mod.DEFAULT_MEMORY, help="guest MiB")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument(
        "--no-libvirt", action="store_true", help="leave out the libvirt rows even if installed"
    )
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
            "classic_wall_ratio_max": CLASSIC_WALL_RATIO_MAX,
            "switchover_max_ms": SWITCHOVER_MAX_MS, "player_gap_max_ms": PLAYER_GAP_MAX_MS,
            "idle_wall_ratio_max": IDLE_WALL_RATIO_MAX,
            "control_overhead_max_s": CONTROL_OVERHEAD_MAX_S,
            "libvirt_wall_ratio_max": LIBVIRT_WALL_RATIO_MAX,
        },
        "scenarios": {},
    }  # fmt: skip
    for name in names:
        results["scenarios"][name] = run_scenario(name, args.reps, args.memory, not args.no_libvirt)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_report(results)
    print("\n" + markdown(results))
    print(f"results: {args.out}")
    return 0
