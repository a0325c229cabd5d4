"""Where a host's daemon keeps things: state (survives reboots of ferryd) and run files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.hypervisor.cmdline import MachinePaths


@dataclass(frozen=True)
class HostLayout:
    state_dir: Path
    run_dir: Path

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "ferryd.sock"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "ferryd.lock"

    @property
    def domains_dir(self) -> Path:
        return self.state_dir / "domains"

    @property
    def nvram_dir(self) -> Path:
        """Each UEFI domain's variables, kept across its restarts on this host."""
        return self.state_dir / "nvram"

    @property
    def domid_counter(self) -> Path:
        return self.state_dir / "last-domid"

    def record_file(self, name: str) -> Path:
        return self.domains_dir / name / "record.json"

    def machine_paths(self, name: str) -> MachinePaths:
        return MachinePaths(
            run_dir=self.run_dir / "domains" / name, log_dir=self.domains_dir / name
        )

    def create(self) -> None:
        for directory in (self.state_dir, self.run_dir, self.domains_dir, self.run_dir / "domains"):
            directory.mkdir(parents=True, exist_ok=True)
            # Control socket, QMP and consoles give full control of the VMs: root only.
            directory.chmod(0o700)
