"""The demo report's zoomed switchover panels: the window, the client's gap, the picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferry.lab.report import plot_timeline, switchover_window


def demo_data() -> dict[str, Any]:
    """20 ms samples; bytes stop 40 ms before STOP and come back 100 ms after RESUME."""
    started, stop, resume = 1000.0, 1010.0, 1010.08
    timeline, received = [], 0
    for i in range(1500):
        t = i * 0.02
        now = started + t
        if not (stop - 0.04 <= now < resume + 0.1):
            received += 25_000
        timeline.append((round(t, 3), 10.0, received))
    return {
        "origin": started,
        "player": {"started_at": started, "timeline": timeline},
        "migrations": [
            {"source": "xen_host_1", "target": "xen_host_2", "start": 1005.0, "end": 1011.0,
             "stop_at": stop, "resume_at": resume},
            {"source": "xen_host_2", "target": "xen_host_1", "start": 1020.0, "end": 1021.0},
        ],
    }  # fmt: skip


def test_the_window_and_the_client_s_gap_around_a_switchover() -> None:
    data = demo_data()
    found = switchover_window(data, data["migrations"][0])
    assert found is not None
    xs, ys, gap = found
    assert xs[0] >= -1000.001 and xs[-1] <= 80 + 1000.001
    # 40 ms before STOP + 80 ms switchover + 100 ms after, at 20 ms resolution.
    assert 200 <= gap <= 240, gap
    assert ys[0] == 0 and ys[-1] > 0
    assert switchover_window(data, data["migrations"][1]) is None  # no STOP/RESUME times


def test_the_picture_has_a_panel_per_switchover(tmp_path: Path) -> None:
    out = tmp_path / "timeline.png"
    plot_timeline(demo_data(), out)
    assert out.stat().st_size > 10_000
    plain = tmp_path / "plain.png"
    plot_timeline(demo_data() | {"migrations": []}, plain)
    assert plain.stat().st_size > 5_000
