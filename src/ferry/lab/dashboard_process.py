"""``ferry demo --dashboard``: the dashboard on the station (client_1), reached from this host.

The page must be reachable from this host's browser, while the dashboard must
reach the hosts on the lab's LAN, which only the lab's nodes see. So the
listening socket is made here, on this host's loopback, and handed to a
``ferry dashboard`` started inside the station's namespace: a socket keeps
the namespace it was made in.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from ferry.dashboard.server import loopback_socket
from ferry.lab.lab import Lab
from ferry.lab.pki import STATION


class LabDashboard:
    def __init__(self, lab: Lab, port: int, player_status: Path, log: Path) -> None:
        sock = loopback_socket("127.0.0.1", port)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        argv = ["ferry", "--host", "xen_host_1", "dashboard", "--listen-fd", str(sock.fileno()),
                "--player-status", str(player_status.resolve())]  # fmt: skip
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out, sock:
            self.proc = lab.popen(
                STATION, argv, pass_fds=(sock.fileno(),), stdout=out, stderr=out,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
