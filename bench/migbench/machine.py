"""The machine the benchmark ran on, for the results file."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    os_name = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    libvirt = "not installed"
    with contextlib.suppress(OSError):
        out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True)
        libvirt = out.stdout.strip() or libvirt
    return {
        "libvirt": libvirt,
        "cpu": cpu, "cores": os.cpu_count(), "qemu": qemu[0] if qemu else "unknown",
        "kernel": platform.release(), "os": os_name, "python": platform.python_version(),
        "accel": "tcg", "loadavg_at_start": os.getloadavg(),
    }  # fmt: skip
