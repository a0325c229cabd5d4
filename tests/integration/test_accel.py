"""Accelerator choice on the real machine: ``auto`` never hangs and picks one that works."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ferry.errors import AccelError
from ferry.guest.image import GuestImage
from ferry.hypervisor.accel import kvm_device_usable, resolve_accel

pytestmark = pytest.mark.integration


async def test_auto_probe_is_bounded_and_cached(guest_image: GuestImage, tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    start = time.monotonic()
    first = await resolve_accel(
        "auto", "qemu-system-x86_64", guest_image.kernel, guest_image.initrd, cache, timeout=8
    )
    took = time.monotonic() - start
    assert first.accel in ("kvm", "tcg")
    assert took < 8 + 10, f"the probe took {took:.1f} s despite its 8 s bound"
    if not kvm_device_usable():
        assert first.accel == "tcg"
    start = time.monotonic()
    second = await resolve_accel(
        "auto", "qemu-system-x86_64", guest_image.kernel, guest_image.initrd, cache, timeout=8
    )
    assert second.accel == first.accel
    assert "(cached)" in second.reason
    assert time.monotonic() - start < 1


async def test_tcg_reaches_userspace_where_kvm_may_not(guest_image: GuestImage) -> None:
    # The probe's own mechanism under TCG: proves the marker path works, so a
    # "tcg" verdict on a KVM host would mean KVM failed, not the probe.
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-nodefaults", "-display", "none",
        "-no-reboot", "-kernel", str(guest_image.kernel), "-initrd", str(guest_image.initrd),
        "-append", "console=ttyS0 quiet ferry.probe=1", "-serial", "stdio",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert b"FERRY-PROBE-OK" in out


async def test_unknown_accelerator_is_a_clear_error(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    with pytest.raises(AccelError, match="'xen' is not one of auto, kvm, tcg"):
        await resolve_accel(
            "xen", "qemu-system-x86_64", guest_image.kernel, guest_image.initrd, tmp_path / "a"
        )
