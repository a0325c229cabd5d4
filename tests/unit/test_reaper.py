"""ferryd, a child subreaper, reaps what it adopts: no zombie after many QEMU launches."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from .migration_harness import fake_qemu_wrapper

PROGRAM = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from ferry.hypervisor import process
    from ferry.hypervisor.reaper import ChildReaper, zombie_children
    from ferry.util.wait import wait_until

    async def main(qemu: str, tmp: Path, reap: bool) -> None:
        process.become_subreaper()
        reaper = ChildReaper(grace_s=1.0, every_s=0.5)
        if reap:
            reaper.start()
        for i in range(12):
            run = tmp / f"d{i}"
            run.mkdir()
            args = [qemu, "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
                    "-pidfile", str(run / "pid"), "-daemonize"]
            pid = await process.launch_detached(args, run / "log", run / "pid", 10)
            await process.terminate(pid, 5)
        # A child asyncio waits for itself must still get its exit status.
        proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 7")
        assert await proc.wait() == 7
        if reap:
            await wait_until(lambda: not zombie_children(), timeout=10, what="no zombie")
            await reaper.close()
        print(len(zombie_children()), reaper.reaped)

    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"))
    """
)


def run(tmp_path: Path, reap: bool) -> tuple[int, int]:
    qemu = fake_qemu_wrapper(tmp_path)
    work = tmp_path / ("reap" if reap else "plain")
    work.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(qemu), str(work), "1" if reap else "0"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    zombies, reaped = out.stdout.split()
    return int(zombies), int(reaped)


def test_adopted_children_are_reaped(tmp_path: Path) -> None:
    zombies, reaped = run(tmp_path, reap=True)
    assert zombies == 0
    assert reaped >= 12  # at least the middle process of each daemonized QEMU


def test_without_the_reaper_they_pile_up(tmp_path: Path) -> None:
    # The test above could pass for want of zombies: this shows there are some.
    zombies, _ = run(tmp_path, reap=False)
    assert zombies >= 12
