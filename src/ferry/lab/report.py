"""The demo's report: every measurement as JSON, a timeline plot, one HTML page."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a host: render to files only

import matplotlib.pyplot as plt


def _player_series(
    player: dict[str, Any], origin: float
) -> tuple[list[float], list[float], list[float]]:
    start = float(player["started_at"]) - origin
    times, buffers, received = [], [], []
    for t, buffer_s, received_bytes in player.get("timeline", []):
        times.append(start + t)
        buffers.append(buffer_s)
        received.append(received_bytes / 1e6)
    return times, buffers, received


ZOOM_S = 1.0  # each switchover panel shows this much either side


def switchover_window(
    data: dict[str, Any], mig: dict[str, Any]
) -> tuple[list[float], list[float], float] | None:
    """Around one switchover: (ms from STOP, KB received since the window began, the
    client's longest run of samples with no new byte, in ms); None without the data."""
    player, stop, resume = data.get("player"), mig.get("stop_at"), mig.get("resume_at")
    if not player or stop is None or resume is None:
        return None
    times, _, received = _player_series(player, 0.0)
    window = [(t, r) for t, r in zip(times, received, strict=True)
              if stop - ZOOM_S <= t <= resume + ZOOM_S]  # fmt: skip
    if len(window) < 2:
        return None
    base = window[0][1]
    xs = [(t - stop) * 1000 for t, _ in window]
    ys = [(r - base) * 1000 for _, r in window]
    gap, run_start = 0.0, xs[0]
    for i in range(1, len(xs)):
        if ys[i] != ys[i - 1]:
            run_start = xs[i]
        else:
            gap = max(gap, xs[i] - run_start)
    return xs, ys, gap


def _plot_switchovers(fig: Any, grid: Any, data: dict[str, Any]) -> None:
    migrations = [m for m in data.get("migrations", []) if switchover_window(data, m)]
    for i, mig in enumerate(migrations):
        ax = fig.add_subplot(grid[2, i])
        found = switchover_window(data, mig)
        assert found is not None
        xs, ys, gap = found
        switchover = (mig["resume_at"] - mig["stop_at"]) * 1000
        ax.step(xs, ys, where="post", linewidth=1.2, color="tab:green")
        ax.axvspan(0, max(switchover, 1.0), color="black", alpha=0.5)
        ax.set_title(
            f"{mig.get('source')} -> {mig.get('target')}: switchover {switchover:.0f} ms, "
            f"client's longest gap {gap:.0f} ms",
            fontsize=9,
        )
        ax.set_xlabel("ms from the source's STOP")
        ax.set_ylabel("KB received")
        ax.grid(alpha=0.3)


def plot_timeline(data: dict[str, Any], out: Path) -> None:
    """Buffer level and bytes received over time, the pause and each migration shaded;
    below, each switchover zoomed to +-1 s with the client's bytes."""
    origin = float(data["origin"])
    zooms = sum(1 for m in data.get("migrations", []) if switchover_window(data, m))
    fig = plt.figure(figsize=(11, 9.5 if zooms else 6.5))
    grid = fig.add_gridspec(
        3 if zooms else 2, max(zooms, 1), height_ratios=[1, 1, 0.9][: 3 if zooms else 2]
    )
    ax_buf = fig.add_subplot(grid[0, :])
    ax_bytes = fig.add_subplot(grid[1, :], sharex=ax_buf)
    for label, player in (
        ("pause playback", data.get("pause_player")),
        ("migration playback", data.get("player")),
    ):
        if not player:
            continue
        times, buffers, received = _player_series(player, origin)
        ax_buf.plot(times, buffers, label=label, linewidth=1.2)
        ax_bytes.plot(times, received, label=label, linewidth=1.2)
    pause = data.get("pause")
    for ax in (ax_buf, ax_bytes):
        if pause:
            ax.axvspan(
                pause["start"] - origin,
                pause["end"] - origin,
                color="tab:red",
                alpha=0.15,
                label="VM paused" if ax is ax_buf else None,
            )
        for i, mig in enumerate(data.get("migrations", [])):
            ax.axvspan(
                mig["start"] - origin,
                mig["end"] - origin,
                color="tab:blue",
                alpha=0.12,
                label="migration (memory copy)" if ax is ax_buf and i == 0 else None,
            )
            if mig.get("stop_at") and mig.get("resume_at"):
                ax.axvspan(
                    mig["stop_at"] - origin,
                    max(mig["resume_at"], mig["stop_at"] + 0.05) - origin,
                    color="black",
                    alpha=0.6,
                    label="switchover (VM stopped)" if ax is ax_buf and i == 0 else None,
                )
    for stall in data.get("stalls_at", []):
        ax_buf.axvspan(stall[0] - origin, stall[0] + stall[1] - origin, color="tab:red", alpha=0.4)
    ax_buf.set_ylabel("player buffer (s of media)")
    ax_bytes.set_ylabel("received (MB)")
    ax_bytes.set_xlabel("time since the demo started (s)")
    ax_buf.set_title(data.get("title", "ferry demo"))
    ax_buf.legend(loc="upper right", fontsize=8)
    ax_buf.grid(alpha=0.3)
    ax_bytes.grid(alpha=0.3)
    if zooms:
        _plot_switchovers(fig, grid, data)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_html(data: dict[str, Any], png: Path, out: Path) -> None:
    image = base64.b64encode(png.read_bytes()).decode()
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c))}</td>"
            for c in (
                f"{m['source']} → {m['target']}",
                f"{m['total_s']:.1f} s",
                f"{m['switchover_ms']} ms",
                f"{m['qemu_downtime_ms']} ms",
                f"{m['commit_ms']} ms",
                f"{m['bytes_sent'] / 1e6:.1f} MB",
                m["passes"],
            )
        )
        + "</tr>"
        for m in data.get("migrations", [])
    )
    verdict = html.escape(data["verdict"])
    figures = "".join(f"<li>{html.escape(line)}</li>" for line in data.get("summary", []))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ferry demo: {verdict}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
.ok{{color:#070}}.bad{{color:#b00}}</style></head><body>
<h1>ferry demo: <span class="{"ok" if data["unbroken"] else "bad"}">{verdict}</span></h1>
<ul>{figures}</ul>
<img alt="player buffer and received bytes over time" style="width:100%"
 src="data:image/png;base64,{image}">
<h2>Migrations</h2>
<table><tr><th>move</th><th>total</th><th>downtime (STOP→RESUME)</th><th>QEMU downtime</th>
<th>commit</th><th>sent</th><th>passes</th></tr>{rows}</table>
<h2>Set-up</h2><pre>{html.escape(json.dumps(data.get("setup", {}), indent=1))}</pre>
<p>Every measurement: <code>report.json</code> beside this page.</p>
</body></html>
"""
    out.write_text(page)


def write_report(data: dict[str, Any], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "report.json",
        "png": directory / "timeline.png",
        "html": directory / "report.html",
    }
    paths["json"].write_text(json.dumps(data, indent=1))
    plot_timeline(data, paths["png"])
    write_html(data, paths["png"], paths["html"])
    return paths
