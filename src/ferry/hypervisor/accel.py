"""Choosing the accelerator: KVM where it really works, TCG otherwise.

``/dev/kvm`` existing is not enough: on some hosts (nested virtualization
without the right support) a KVM guest starts and then hangs forever. So
``auto`` boots ferry's own guest kernel under KVM in probe mode, where its
initramfs prints ``FERRY-PROBE-OK`` and powers off at once, and chooses KVM
only if that line arrives in time. The verdict is cached per QEMU binary,
host kernel and guest image, since a probe costs up to its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import AccelError

PROBE_MARKER = b"FERRY-PROBE-OK"
ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class ProbeResult:
    accel: str
    reason: str


def kvm_device_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


async def probe_kvm(qemu_binary: str, kernel: Path, initrd: Path, timeout: float) -> ProbeResult:
    if not kvm_device_usable():
        return ProbeResult("tcg", "/dev/kvm is missing or not accessible")
    args = [
        qemu_binary,
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 quiet ferry.probe=1",
        "-serial",
        "stdio",
    ]
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(timeout):
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = seen[-4096:] + chunk
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    took = time.monotonic() - start
    if PROBE_MARKER in seen:
        return ProbeResult("kvm", f"a KVM guest reached userspace in {took:.1f} s")
    last = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return ProbeResult(
        "tcg", f"a KVM guest did not reach userspace within {timeout:.0f} s ({last[0][:80]})"
    )


def _probe_key(qemu_binary: str, kernel: Path) -> str:
    qemu = shutil.which(qemu_binary) or qemu_binary
    try:
        qemu_stamp = os.stat(qemu).st_mtime_ns
        kernel_stamp = os.stat(kernel).st_mtime_ns
    except OSError:
        return ""
    return f"{qemu}:{qemu_stamp}:{kernel}:{kernel_stamp}:{platform.release()}"


async def resolve_accel(
    requested: str,
    qemu_binary: str,
    kernel: Path,
    initrd: Path,
    cache_file: Path,
    timeout: float = 20.0,
) -> ProbeResult:
    if requested not in ACCELS:
        raise AccelError(f"accelerator {requested!r} is not one of {', '.join(ACCELS)}")
    if requested == "tcg":
        return ProbeResult("tcg", "forced by configuration")
    if requested == "kvm":
        if not kvm_device_usable():
            raise AccelError("accelerator 'kvm' was requested but /dev/kvm is not accessible")
        return ProbeResult("kvm", "forced by configuration")
    key = _probe_key(qemu_binary, kernel)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache_file.read_text())
        if key and cached["key"] == key:
            return ProbeResult(str(cached["accel"]), str(cached["reason"]) + " (cached)")
    result = await probe_kvm(qemu_binary, kernel, initrd, timeout)
    if key:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "accel": result.accel, "reason": result.reason}))
        tmp.replace(cache_file)
    return result
