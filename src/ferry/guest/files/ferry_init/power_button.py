"""The ACPI power button: QEMU's system_powerdown arrives as a key press on an evdev device."""

from __future__ import annotations

import os
import struct

from .console import say

EV_KEY, KEY_POWER = 1, 116
INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on x86_64: 24 bytes
BUTTON_NAME = "Power Button"


def open_power_buttons(
    sys_input: str = "/sys/class/input", dev_input: str = "/dev/input"
) -> list[int]:
    """Non-blocking descriptors of every input device that calls itself a power button."""
    fds: list[int] = []
    try:
        names = sorted(os.listdir(sys_input))
    except OSError:
        return fds
    for name in names:
        if not name.startswith("event"):
            continue
        try:
            with open(f"{sys_input}/{name}/device/name") as f:
                if f.read().strip() != BUTTON_NAME:
                    continue
            fds.append(os.open(f"{dev_input}/{name}", os.O_RDONLY | os.O_NONBLOCK))
        except OSError as err:
            say(f"warning: cannot watch power button {name}: {err.strerror}")
    return fds


def pressed_in(data: bytes) -> bool:
    """Whether a read of input events holds a press (not a release) of KEY_POWER."""
    for offset in range(0, len(data) - INPUT_EVENT.size + 1, INPUT_EVENT.size):
        _sec, _usec, kind, code, value = INPUT_EVENT.unpack_from(data, offset)
        if kind == EV_KEY and code == KEY_POWER and value == 1:
            return True
    return False


def power_pressed(fd: int) -> bool:
    try:
        data = os.read(fd, INPUT_EVENT.size * 64)
    except BlockingIOError:
        return False
    return pressed_in(data)
