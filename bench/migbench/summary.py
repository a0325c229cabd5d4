"""Medians and ranges over the runs, and the verdict on each target."""

from __future__ import annotations

import statistics
from typing import Any

from migbench.settings import (
    BARE_GIVE_UP_S,
    BUSY_DOWNTIME_MAX_MS,
    BUSY_WALL_MAX_S,
    CLASSIC_WALL_RATIO_MAX,
    CONTROL_OVERHEAD_MAX_S,
    IDLE_WALL_RATIO_MAX,
    LIBVIRT_WALL_RATIO_MAX,
    PLAYER_GAP_MAX_MS,
    SWITCHOVER_MAX_MS,
)


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
    out["unfinished"] = sum(1 for r in runs if not r.get("finished", True))
    loads = [r["workload"] for r in runs if "workload" in r]
    if loads:
        # The guest's work went on through each migration: it was not just paused.
        out["workload_stalled_runs"] = sum(
            1 for w in loads if not (w["running"] and w["pages"] > w["pages_before"])
        )
    return out


def verdicts(
    scenario: str,
    rate: str | None,
    ferry_s: dict[str, Any],
    bare_s: dict[str, Any],
    libvirt: dict[str, dict[str, Any]] | None = None,
    postcopy: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each target met or missed; ``libvirt`` holds its variants' summaries, if it ran,
    and ``postcopy`` ferry's ``--postcopy`` summary, where it ran."""
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

    fw, fd = ferry_s["wall_s"]["median"], ferry_s["downtime_ms"]["median"]
    if scenario == "busy":
        add(f"bare pre-copy unfinished after {BARE_GIVE_UP_S:.0f} s (all bare runs)",
            bare_s["wall_s"]["n"], 0, "finished runs")  # fmt: skip
        add(f"ferry finishes in <= {BUSY_WALL_MAX_S:.0f} s (worst ferry run)",
            ferry_s["wall_s"]["max"], BUSY_WALL_MAX_S, "s")  # fmt: skip
        add(f"ferry STOP->RESUME <= {BUSY_DOWNTIME_MAX_MS:.0f} ms (worst ferry run)",
            ferry_s["downtime_ms"]["max"], BUSY_DOWNTIME_MAX_MS, "ms")  # fmt: skip
        add("the guest's workload progressed through every ferry migration",
            ferry_s.get("workload_stalled_runs"), 0, "stalled runs")  # fmt: skip
        if postcopy:
            add(f"ferry --postcopy finishes in <= {BUSY_WALL_MAX_S:.0f} s (worst run)",
                postcopy["wall_s"]["max"], BUSY_WALL_MAX_S, "s")  # fmt: skip
            add(f"ferry --postcopy STOP->RESUME <= {BUSY_DOWNTIME_MAX_MS:.0f} ms (worst run)",
                postcopy["downtime_ms"]["max"], BUSY_DOWNTIME_MAX_MS, "ms")  # fmt: skip
            add("ferry --postcopy ends sooner than ferry's pre-copy (median)",
                postcopy["wall_s"]["median"], fw, "s")  # fmt: skip
            add("the guest's workload progressed through every post-copy migration",
                postcopy.get("workload_stalled_runs"), 0, "stalled runs")  # fmt: skip
        return out
    if rate is not None:
        bw = bare_s["wall_s"]["median"]
        add(
            f"ferry wall <= {CLASSIC_WALL_RATIO_MAX} x bare QEMU default (median)",
            fw, bw * CLASSIC_WALL_RATIO_MAX if bw else None, "s",
        )  # fmt: skip
        add(f"ferry STOP->RESUME <= {SWITCHOVER_MAX_MS:.0f} ms (median)", fd, SWITCHOVER_MAX_MS,
            "ms")  # fmt: skip
    else:
        bl = bare_s["wall_with_target_launch_s"]["median"]
        add(
            f"ferry wall <= {IDLE_WALL_RATIO_MAX} x bare incl. target launch (median)",
            fw, bl * IDLE_WALL_RATIO_MAX if bl else None, "s",
        )  # fmt: skip
        add(f"ferry control overhead <= {CONTROL_OVERHEAD_MAX_S} s (median)",
            ferry_s["overhead_s"]["median"], CONTROL_OVERHEAD_MAX_S, "s")  # fmt: skip
        add("ferry STOP->RESUME <= bare's (median)", fd, bare_s["downtime_ms"]["median"], "ms")
    if "player_longest_gap_ms" in ferry_s:
        add(
            f"player's largest gap <= {PLAYER_GAP_MAX_MS:.0f} ms (worst ferry run)",
            ferry_s["player_longest_gap_ms"]["max"],
            PLAYER_GAP_MAX_MS,
            "ms",
        )
        add("player stalls == 0 (all ferry runs)", ferry_s["player_stalls_total"], 0, "stalls")
    if libvirt:
        _libvirt_verdicts(add, rate, fw, fd, libvirt)
    return out


def _libvirt_verdicts(
    add: Any, rate: str | None, fw: float, fd: float, libvirt: dict[str, dict[str, Any]]
) -> None:
    default, best = libvirt.get("libvirt"), libvirt.get("libvirt_best")
    if rate is not None and default:
        lw = default["wall_s"]["median"]
        add(
            f"ferry wall <= {LIBVIRT_WALL_RATIO_MAX} x libvirt's default (median)",
            fw, lw * LIBVIRT_WALL_RATIO_MAX if lw else None, "s",
        )  # fmt: skip
    if best:
        add("ferry wall <= libvirt's best flags (median)", fw, best["wall_s"]["median"], "s")
        add("ferry STOP->RESUME <= libvirt's best flags (median)", fd,
            best["downtime_ms"]["median"], "ms")  # fmt: skip
