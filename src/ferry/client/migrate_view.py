"""How a migration is shown (`ferry migrate`, `ferry demo`): a live bar, then a summary line."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class MigrationView:
    """Feeds on the daemon's progress lines; silent when stderr is not a terminal."""

    def __init__(self, name: str, host: str) -> None:
        self.bar: Progress | None = None
        # rich only for a terminal: scripts (--json, a pipe) do not pay for importing it.
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[bold]{task.fields[phase]:>8}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True),
                transient=True,
            )
        self.task: TaskID | None = None
        self.disk_task: TaskID | None = None  # --copy-storage: the disks, a bar of their own
        self.label = f"{name} -> {host}"

    def __enter__(self) -> MigrationView:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=1, phase="connect", detail=self.label)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, p: dict[str, Any]) -> None:
        decision = p.get("decision")
        if isinstance(decision, dict):
            # Every convergence decision is said, on a terminal or not.
            line = (
                f"pass {decision.get('pass')}, {decision.get('t_s')} s: "
                f"{decision.get('decision')} ({decision.get('why')})"
            )
            if self.bar is not None:
                self.bar.console.print(line, markup=False, highlight=False)
            else:
                print(line, file=sys.stderr, flush=True)
            return
        if self.task is None or self.bar is None:
            return
        disk = p.get("disk")
        if isinstance(disk, dict):
            self._disk(disk)
        if "transferred" not in p:
            return  # the disks only: the memory stream has not begun
        total = max(int(p.get("total") or 0), 1)
        done = max(total - int(p.get("remaining") or 0), 0)
        eta = p.get("eta_s")
        detail = (
            f"sent {_mb(p.get('transferred', 0))}, left {_mb(p.get('remaining', 0))}, "
            f"{p.get('rate_mbit', 0):.0f} Mbit/s, dirty {p.get('dirty_rate', 0):.0f} pages/s, "
            f"pass {p.get('passes', 0)}, ETA {f'{eta:.1f} s' if eta is not None else '?'}"
        )
        self.bar.update(
            self.task, total=total, completed=done, phase=p.get("phase", ""), detail=detail
        )

    def _disk(self, disk: dict[str, Any]) -> None:
        assert self.bar is not None
        if self.disk_task is None:
            self.disk_task = self.bar.add_task("disks", total=1, phase="disks", detail="")
        total = max(int(disk.get("total") or 0), 1)
        state = "caught up, following writes" if disk.get("ready") else "copying"
        detail = f"disks: {_mb(disk.get('copied', 0))} of {_mb(total)}, {state}"
        self.bar.update(self.disk_task, total=total, completed=int(disk.get("copied") or 0),
                        detail=detail)  # fmt: skip


def summary(name: str, host: str, result: dict[str, Any]) -> str:
    switchover = result.get("switchover_ms")
    qemu = result.get("qemu_downtime_ms")
    downtime = f"{switchover:.0f} ms" if switchover is not None else f"{qemu} ms"
    return (
        f"migrated {name} to {host} in {result['total_s']:.1f} s: downtime {downtime} "
        f"(QEMU {qemu} ms, limit {result['downtime_limit_ms']} ms), "
        f"{_mb(result['bytes_sent'])} sent in {result['passes']} passes{_stream(result)}"
        f"{_postcopy(result)}{_disks(result)}"
    )


def _disks(result: dict[str, Any]) -> str:
    if not result.get("disk_bytes"):
        return ""
    return (
        f"; disks copied: {_mb(result['disk_bytes'])} in {result.get('disk_copy_s') or 0:.1f} s, "
        f"the last blocks {result.get('disk_final_ms') or 0:.0f} ms while stopped"
    )


def _postcopy(result: dict[str, Any]) -> str:
    if not result.get("postcopy"):
        return ""
    return (
        f"; post-copy after the switch: {result.get('postcopy_s') or 0:.1f} s, "
        f"{result.get('postcopy_requests') or 0} pages fetched on demand"
    )


def _stream(result: dict[str, Any]) -> str:
    channels = result.get("channels", 1)
    if channels <= 1:
        return ""
    return f", {channels} channels, {result.get('compression', 'none')} (before compression)"
