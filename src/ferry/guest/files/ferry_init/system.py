"""PID 1's system chores: the API filesystems, its children's environment, power-off."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from typing import NoReturn

from .console import say

# The whole environment of every process ferry-init starts: none of the kernel's leftovers.
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "vt100",
}

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RDONLY, MS_REMOUNT = 2, 4, 8, 1, 32
RB_POWER_OFF = 0x4321FEDC

# os has neither mount(2) nor reboot(2). The prototypes are declared so that ctypes
# passes mountflags as the unsigned long the kernel reads, not as a C int.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.reboot.argtypes = [ctypes.c_int]
_libc.reboot.restype = ctypes.c_int


def _mount(
    source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None
) -> int:
    """mount(2): 0, or the errno it failed with."""
    if _libc.mount(source, target, fstype, flags, data) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def mounted(target: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if fstype != "proc" and mounted(target):
        return
    os.makedirs(target, exist_ok=True)
    err = _mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None)
    if err not in (0, errno.EBUSY):
        say(f"warning: cannot mount {fstype} on {target}: {os.strerror(err)}")


def mount_api_filesystems() -> None:
    if not os.path.exists("/proc/self"):
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs("/run/lock", mode=0o1777, exist_ok=True)
    for name in ("utmp",):
        open(f"/run/{name}", "a").close()


def power_off() -> NoReturn:
    os.sync()
    err = _mount(None, b"/", None, MS_REMOUNT | MS_RDONLY, None)
    if err != 0:
        say(f"warning: cannot remount / read-only: {os.strerror(err)}")
    os.sync()
    say("power off")
    _libc.reboot(RB_POWER_OFF)
    say(f"reboot(RB_POWER_OFF) failed: {os.strerror(ctypes.get_errno())}; trying sysrq")
    with contextlib.suppress(OSError), open("/proc/sysrq-trigger", "w") as f:
        f.write("o")
    while True:  # PID 1 must never exit: that would panic the kernel
        time.sleep(3600)
