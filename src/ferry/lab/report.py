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


def plot_timeline(data: dict[str, Any], out: Path) -> None:
    """Buffer level and bytes received over time, the pause and each migration shaded."""
    origin = float(data["origin"])
    fig, (ax_buf, ax_bytes) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
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
