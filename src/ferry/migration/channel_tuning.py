"""The low-water mark on QEMU's own multifd connections, set as they come up."""

from __future__ import annotations

import logging

from ferry.hypervisor.qemu_sockets import set_notsent_lowat, socket_fds_to_port
from ferry.migration.data_link import NOTSENT_LOWAT_BYTES

log = logging.getLogger("ferryd")


class ChannelTuner:
    """Polled during the transfer until every channel (multifd + main) is tuned."""

    def __init__(self, pid: int | None, port: int, expected: int) -> None:
        self.pid = pid
        self.port = port
        self.expected = expected
        self.tuned: set[int] = set()  # socket inodes
        self.error: str | None = None

    @property
    def settled(self) -> bool:
        return self.pid is None or self.error is not None or len(self.tuned) >= self.expected

    def poll(self) -> None:
        if self.settled or self.pid is None:
            return
        fds = socket_fds_to_port(self.pid, self.port)
        new = {fd: inode for fd, inode in fds.items() if inode not in self.tuned}
        if not new:
            return
        try:
            set_notsent_lowat(self.pid, list(new), NOTSENT_LOWAT_BYTES)
        except OSError as err:
            # Not fatal: the migration runs, its switchover may be longer.
            self.error = f"cannot tune QEMU's channels: {err}"
            log.warning("%s; the final copy may queue in socket buffers", self.error)
            return
        self.tuned |= set(new.values())
