"""Running a ferryd for a lab host (or a test), inside its network namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.client.daemon_client import DaemonClient
from ferry.errors import DaemonUnreachable, FerryError, WaitTimeout
from ferry.lab import netns
from ferry.util.wait import wait_until_sync


@dataclass
class FerrydProcess:
    name: str
    state_dir: Path
    run_dir: Path
    log: Path
    ns: str | None = None
    config: Path | None = None
    accel: str | None = None
    image_cache: Path | None = None
    # (own directory, shared path): this host's local disks (ferry.lab.private_dir).
    private_dir: tuple[Path, Path] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.run_dir / "ferryd.sock"

    def client(self, timeout: float = 600.0) -> DaemonClient:
        return DaemonClient(self.socket, timeout)

    def _argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "ferry.daemon.main",
            "--name", self.name,
            "--state-dir", str(self.state_dir),
            "--run-dir", str(self.run_dir),
        ]  # fmt: skip
        if self.config is not None:
            argv += ["--config", str(self.config)]
        if self.accel is not None:
            argv += ["--accel", self.accel]
        if self.image_cache is not None:
            argv += ["--image-cache", str(self.image_cache)]
        if self.private_dir is not None:
            own, shared = self.private_dir
            argv = [sys.executable, "-m", "ferry.lab.private_dir", str(own), str(shared), "--",
                    *argv]  # fmt: skip
        return netns.popen_argv(self.ns, argv) if self.ns else argv

    def start(self, timeout: float = 30.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until ferryd answers a ping; FerryError if it exits or stays silent."""

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise FerryError(
                    f"ferryd for {self.name} exited with status {self.proc.returncode}: "
                    f"{self.log_tail(1)}"
                )
            try:
                self.client(timeout=5).call("ping")
            except DaemonUnreachable:
                return False
            return True

        try:
            wait_until_sync(answers, timeout=timeout, what=f"ferryd for {self.name}", interval=0.1)
        except WaitTimeout as err:
            raise FerryError(
                f"ferryd for {self.name} did not answer within {timeout:.0f} s (log {self.log})"
            ) from err

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait: ferryd exits and leaves its domains running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def call(self, op: str, **args: Any) -> Any:
        return self.client().call(op, **args)

    def ferry(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run the ``ferry`` CLI against this daemon, from inside its namespace."""
        argv = [sys.executable, "-m", "ferry.cli.main", "--connect", str(self.socket), *args]
        if self.ns:
            argv = netns.popen_argv(self.ns, argv)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
