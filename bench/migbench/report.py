"""The results shown: one line per run, the summary per scenario, markdown tables."""

from __future__ import annotations

from typing import Any

from migbench.summary import METRICS

MODES = ("ferry", "ferry_postcopy", "bare", "bare_zstd", "libvirt", "libvirt_best")


def brief(run: dict[str, Any]) -> str:
    if not run.get("finished", True):
        return (
            f"NOT finished after {run['gave_up_after_s']:.0f} s ({run['passes']} passes, "
            f"{run['remaining_mb']} MB still dirty, dirty {run['dirty_mb_s']} MB/s): cancelled"
        )
    text = (
        f"wall {run['wall_s']:.2f} s, qemu {run['qemu_time_s']:.2f} s, "
        f"downtime {run['downtime_ms']} ms, {run['bytes_sent'] / 1e6:.1f} MB, "
        f"passes {run['passes']}, guest ok {run['guest_ok']}"
    )
    if "player" in run:
        p = run["player"]
        text += f", player gap {p.get('longest_gap_ms')} ms, stalls {p.get('stalls')}"
    return text


def print_report(results: dict[str, Any]) -> None:
    for name, sc in results["scenarios"].items():
        print(f"\n== {name} (link {sc['rate'] or 'unshaped'}, {sc['reps']} reps each) ==")
        for mode in MODES:
            if mode not in sc:
                continue
            s = sc[mode]["summary"]
            parts = [f"{m} {s[m]['median']} [{s[m]['min']}..{s[m]['max']}]" for m in METRICS]
            if "player_longest_gap_ms" in s:
                g = s["player_longest_gap_ms"]
                parts.append(f"gap {g['median']} [{g['min']}..{g['max']}]")
                parts.append(f"stalls {s['player_stalls_total']}")
            print(f"  {mode:12}: " + ", ".join(parts))
        if sc.get("libvirt_skipped"):
            print(f"  libvirt: not run ({sc['libvirt_skipped']})")
        for t in sc["targets"]:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
            print(f"  {mark} {t['target']}: {t['detail']}")


def _cell(s: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 2) -> str:
    st = s.get(metric)
    if not st or st["median"] is None:
        return "-"
    med, lo, hi = (st[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _runs(s: dict[str, Any]) -> str:
    unfinished = s.get("unfinished", 0)
    done = str(s["wall_s"]["n"])
    return f"{done} (+{unfinished} unfinished)" if unfinished else done


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables: median (min-max) per scenario and mode."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, kernel {m['kernel']}, "
        f"{m['qemu']}, {m.get('libvirt', 'libvirt not recorded')}, accel {m['accel']}. "
        f"Run started {results['started']}.",
        "",
        "| scenario | mode | n | total wall s | QEMU migration s | wall incl. target launch s "
        "| downtime ms (STOP->RESUME) | QEMU downtime ms | commit ms | MB sent | passes "
        "| control overhead s | player largest gap ms | stalls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sc in results["scenarios"].items():
        for mode in MODES:
            if mode not in sc:
                continue
            s = sc[mode]["summary"]
            own = mode.startswith("ferry")  # ferry's wall includes its target's launch
            wall_launch = s["wall_s"] if own else s["wall_with_target_launch_s"]
            gap = _cell(s, "player_longest_gap_ms", digits=0)
            stalls = str(s["player_stalls_total"]) if "player_stalls_total" in s else "-"
            row = [
                f"{name} ({sc['rate'] or 'unshaped'})", mode, _runs(s),
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
