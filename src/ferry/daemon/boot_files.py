"""What a domain boots: a kernel (its config's, or ferry's own guest image's), or its
disk through the firmware (SeaBIOS, or OVMF with the domain's own variables)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.errors import ImageError
from ferry.host.running import BootFilesProvider
from ferry.hypervisor.cmdline import BootFiles, Uefi
from ferry.hypervisor.firmware import UefiFiles


def guest_boot_files(
    image_lookup: Callable[[], Any], nvram_dir: Path, uefi: UefiFiles | None = None
) -> BootFilesProvider:
    firmware = uefi or UefiFiles()

    def provide(cfg: DomainConfig) -> BootFiles:
        if cfg.boots_ferry_kernel:
            image = image_lookup()
            return BootFiles(Path(image.kernel), Path(image.initrd))
        if cfg.kernel is not None:
            kernel = Path(cfg.kernel)
            if not kernel.is_file():
                raise ImageError(f"kernel {cfg.kernel} does not exist")
            initrd = Path(cfg.ramdisk) if cfg.ramdisk else None
            if initrd is not None and not initrd.is_file():
                raise ImageError(f"ramdisk {cfg.ramdisk} does not exist")
            return BootFiles(kernel, initrd)
        if cfg.firmware == "uefi":
            firmware.check()
            nvram = nvram_dir / f"{cfg.name}.fd"
            return BootFiles(None, uefi=Uefi(firmware.code, nvram, firmware.vars_template))
        return BootFiles(None)

    return provide
