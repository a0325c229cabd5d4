"""A viewer in the lab: ``ferry watch`` in client_2, followed live through its status file."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.errors import FerryError, WaitTimeout
from ferry.lab.state import Lab
from ferry.util.wait import wait_until_sync


class LabPlayer:
    """``ferry watch`` in client_2, followed live through its status file."""

    def __init__(
        self,
        lab: Lab,
        directory: Path,
        name: str,
        url: str,
        buffer_s: float = 10.0,
        max_time: float | None = None,
        sample_interval: float = 0.1,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.report_file = directory.resolve() / f"{name}.json"
        self.status_file = directory.resolve() / f"{name}-status.json"
        for path in (self.report_file, self.status_file):
            path.unlink(missing_ok=True)
        argv = [
            "ferry",
            "watch",
            "--json",
            "--buffer",
            str(buffer_s),
            "--output",
            str(self.report_file),
            "--status-file",
            str(self.status_file),
            "--sample-interval",
            str(sample_interval),
        ]
        if max_time is not None:
            argv += ["--max-time", str(max_time)]
        self.proc = lab.popen("client_2", [*argv, url], stdout=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        try:
            data = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def wait_for(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The player's status once ``check`` holds for it; FerryError if the player ends."""

        def reached() -> dict[str, Any] | None:
            status = self.status()
            if status and check(status):
                return status
            if self.proc.poll() is not None:
                raise FerryError(f"the player ended while waiting for {what}")
            return None

        try:
            return wait_until_sync(reached, timeout=timeout, what=f"the player to reach {what}")
        except WaitTimeout as err:
            raise FerryError(f"the player did not reach {what} within {timeout:.0f} s") from err

    def finish(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        self.status_file.unlink(missing_ok=True)
        try:
            report: dict[str, Any] = json.loads(self.report_file.read_text())
        except (OSError, ValueError) as err:
            raise FerryError(f"the player left no report: {err}") from err
        return report

    def stop(self) -> None:
        """End playback now; the player still writes its report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
