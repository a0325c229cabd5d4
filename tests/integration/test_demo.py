"""The README's first command: the whole demonstration, to its verdict and report."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.image import GuestImage
from ferry.util.wait import wait_until_sync

from ..unit.chromium_cdp import CHROMIUM, Browser

REPO = Path(__file__).resolve().parents[2]
# What the page shows, once a second: the demo's migration moving, the player's chart.
SEEN = """({moving: document.querySelector('[data-migration=virt_server]')?.innerText || '',
  chart: !document.getElementById('player').hidden
    && document.querySelectorAll('#chart polyline').length > 0,
  on: document.querySelector('[data-domain=virt_server]')?.dataset.on || ''})"""

pytestmark = pytest.mark.integration


def test_demo_runs_to_an_unbroken_verdict_with_its_report(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """With --dashboard: a real Chromium follows the page while the demo runs."""
    report_dir = tmp_path / "report"
    port = _free_port()
    argv = [
        sys.executable, "-m", "ferry.cli.main", "demo",
        "--report", str(report_dir), "--workdir", str(tmp_path / "lab"),
        "--dashboard", "--dashboard-port", str(port),
    ]  # fmt: skip
    # Files, not pipes: nobody reads a pipe while the page is followed.
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        demo = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        try:
            seen = _follow_page(demo, port, REPO / "test-logs" / "demo-dashboard")
            demo.wait(900)
        finally:
            if demo.poll() is None:
                demo.terminate()
                demo.wait(120)
    result = subprocess.CompletedProcess(
        argv, demo.returncode, (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"live dashboard: http://127.0.0.1:{port}/" in result.stdout
    if CHROMIUM is not None:
        moving = [s["moving"] for s in seen if s["moving"]]
        assert any("xen_host_1 →" in m for m in moving), seen[-5:]
        assert any("xen_host_2 →" in m for m in moving), seen[-5:]
        assert any(s["chart"] for s in seen), seen[-5:]
    assert "VERDICT: the stream was unbroken" in result.stdout
    data = json.loads((report_dir / "report.json").read_text())
    assert data["unbroken"] is True
    assert len(data["migrations"]) == 2
    assert {m["target"] for m in data["migrations"]} == {"xen_host_1", "xen_host_2"}
    assert 1.0 < data["buffer_s"] < 10.0
    assert data["player"]["checksum"] == "match"
    assert (report_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report_dir / "report.html").read_text()
    assert "data:image/png;base64," in page and "unbroken" in page
    # Nothing of the lab is left: the demo tore it down.
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "ferrylab-" not in namespaces


def test_demo_without_shared_storage_copies_the_disk_each_way(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """`ferry demo --storage local`: the disk is on xen_host_1's own storage, so each
    migration copies it (--copy-storage), and the stream is still unbroken."""
    report_dir = tmp_path / "report"
    argv = [
        sys.executable, "-m", "ferry.cli.main", "demo", "--storage", "local",
        "--report", str(report_dir), "--workdir", str(tmp_path / "lab"),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "migrate -l --copy-storage virt_server" in result.stdout
    assert "VERDICT: the stream was unbroken" in result.stdout
    data = json.loads((report_dir / "report.json").read_text())
    assert data["unbroken"] is True and data["player"]["checksum"] == "match"
    assert [m["target"] for m in data["migrations"]] == ["xen_host_2", "xen_host_1"]
    # The whole disk crossed each way (1 GiB, its holes as zero writes).
    assert all(m["disk_bytes"] >= 1 << 30 for m in data["migrations"]), data["migrations"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _follow_page(demo: subprocess.Popen[str], port: int, shots: Path) -> list[dict[str, Any]]:
    """What the page showed, once a second, until the demo ends (screenshots kept)."""
    if CHROMIUM is None:
        return []
    shutil.rmtree(shots, ignore_errors=True)

    def answers() -> bool:
        with socket.socket() as sock:
            return demo.poll() is not None or sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until_sync(answers, timeout=600, interval=0.5, what="the dashboard to listen")
    seen: list[dict[str, Any]] = []
    browser = Browser()
    try:
        browser.open(f"http://127.0.0.1:{port}/")
        while demo.poll() is None:
            try:
                state = browser.evaluate(SEEN)
            except RuntimeError:
                break  # the page went with the lab
            if isinstance(state, dict):
                seen.append(state)
                way = (
                    state["moving"].split("\t")[1].replace(" → ", "-to-") if state["moving"] else ""
                )
                if way and not (shots / f"{way}.png").exists():
                    browser.screenshot(shots / f"{way}.png")
            with contextlib.suppress(subprocess.TimeoutExpired):
                demo.wait(1.0)
    finally:
        browser.close()
    return seen
