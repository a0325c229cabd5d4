"""Low-latency socket options on the TCP connections QEMU opened itself.

multifd channels are QEMU's own sockets, so ferry cannot set
``TCP_NOTSENT_LOWAT`` before handing them over as it does with its single
``fd:`` stream. Left alone, each channel queues up to the kernel's send
buffer (4 MiB by default) unsent; after the source stops the VM that queue
must still cross the link, adding to the switchover (measured in the lab on
100 Mbit: STOP to RESUME 335-350 ms with the default, 106 ms with 128 KiB).
A socket option belongs to the socket, not to the descriptor, so ferry takes
a copy of QEMU's descriptor (``pidfd_getfd``, Linux 5.6, as root), sets the
option and closes its copy: only those connections change, nothing host-wide.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has

_libc = ctypes.CDLL(None, use_errno=True)


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    dup = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    if dup < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return dup


def _address(field: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6}: hex words in host (little-endian) order."""
    host, port = field.rsplit(":", 1)
    raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def _sockets(pid: int) -> list[tuple[bool, tuple[str, int], tuple[str, int], int]]:
    """(listening, local, remote, inode) of the TCP sockets in ``pid``'s network namespace."""
    rows = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9:
                    listening = fields[3] == "0A"
                    rows.append(
                        (listening, _address(fields[1]), _address(fields[2]), int(fields[9]))
                    )
    return rows


def _connections(pid: int) -> list[tuple[tuple[str, int], tuple[str, int], int]]:
    """(local, remote, inode) of the TCP connections (not listeners) in ``pid``'s namespace."""
    return [(local, remote, inode) for listening, local, remote, inode in _sockets(pid)
            if not listening]  # fmt: skip


def socket_fds_to_port(pid: int, port: int, host: str | None = None) -> dict[int, int]:
    """QEMU's descriptors (fd -> inode) of TCP connections to remote ``port`` (at ``host``)."""
    wanted = None if host is None else _ip(host)
    return _fds_of(pid, {
        inode for _, remote, inode in _connections(pid)
        if remote[1] == port and (wanted is None or _ip(remote[0]) == wanted)
    })  # fmt: skip


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as compared here: without a zone, an IPv4-mapped one as IPv4."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _listeners(pid: int, port: int) -> set[int]:
    """The inodes of the sockets listening on local ``port`` in ``pid``'s network namespace."""
    return {inode for listening, local, _, inode in _sockets(pid) if listening and local[1] == port}


def is_listening(pid: int, port: int) -> bool:
    """Whether a socket in ``pid``'s network namespace still listens on ``port``."""
    return bool(_listeners(pid, port))


def stop_listening(pid: int, port: int) -> None:
    """QEMU's listener on ``port`` (if any) refuses every connection from now on.

    shutdown(2) of a listening socket resets the connections still waiting in
    its backlog and takes it off the port: a new one is refused, while QEMU's
    descriptor stays open. QEMU's watch on it then wakes on every turn of its
    main loop (seen here: one core busy) until the caller closes it, at once.
    """
    fds = _fds_of(pid, _listeners(pid, port))
    with _borrowed(pid, list(fds)) as socks:
        for sock in socks:
            sock.shutdown(socket.SHUT_RDWR)


def socket_fds_on_port(pid: int, port: int) -> dict[int, int]:
    """QEMU's descriptors of connections accepted on its local ``port``."""
    return _fds_of(pid, {inode for local, _, inode in _connections(pid) if local[1] == port})


def foreign_fds_on_port(pid: int, port: int, allowed: str) -> dict[int, int]:
    """QEMU's descriptors of connections accepted on local ``port`` from anyone but ``allowed``."""
    allowed_ip = _ip(allowed)
    wanted = set()
    for local, remote, inode in _connections(pid):
        if local[1] == port and _ip(remote[0]) != allowed_ip:
            wanted.add(inode)
    return _fds_of(pid, wanted)


def shut_down(pid: int, fds: list[int]) -> None:
    """End QEMU's connections ``fds`` (both directions); QEMU sees them fail."""
    with _borrowed(pid, fds) as socks:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _fds_of(pid: int, wanted: set[int]) -> dict[int, int]:
    found: dict[int, int] = {}
    if not wanted:
        return found
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError, ValueError):
                link = os.readlink(entry.path)
                if link.startswith("socket:["):
                    inode = int(link[8:-1])
                    if inode in wanted:
                        found[int(entry.name)] = inode
    return found


def set_notsent_lowat(pid: int, fds: list[int], value: int) -> None:
    """Set ``TCP_NOTSENT_LOWAT`` on QEMU's sockets ``fds``; OSError if it cannot."""
    with _borrowed(pid, fds) as socks:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, value)


@contextlib.contextmanager
def _borrowed(pid: int, fds: list[int]) -> Iterator[list[socket.socket]]:
    """Copies of QEMU's descriptors ``fds`` as sockets, closed afterwards.

    What is done to a copy (an option, a shutdown) is done to the socket;
    closing the copy leaves QEMU's descriptor open.
    """
    pidfd = os.pidfd_open(pid)
    socks: list[socket.socket] = []
    try:
        for fd in fds:
            dup = _pidfd_getfd(pidfd, fd)
            try:
                socks.append(socket.socket(fileno=dup))
            except OSError:
                os.close(dup)
                raise
        yield socks
    finally:
        for sock in socks:
            sock.close()
        os.close(pidfd)
