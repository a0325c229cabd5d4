"""Which kernel and initrd a domain boots: its config's, or ferry's own guest image's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.errors import ImageError
from ferry.host.running import BootFilesProvider
from ferry.hypervisor.cmdline import BootFiles


def guest_boot_files(image_lookup: Callable[[], Any]) -> BootFilesProvider:
    """Boot files from the config, or ferry's own guest kernel when it names none."""

    def provide(cfg: DomainConfig) -> BootFiles:
        if cfg.kernel is not None:
            kernel = Path(cfg.kernel)
            if not kernel.is_file():
                raise ImageError(f"kernel {cfg.kernel} does not exist")
            initrd = Path(cfg.ramdisk) if cfg.ramdisk else None
            if initrd is not None and not initrd.is_file():
                raise ImageError(f"ramdisk {cfg.ramdisk} does not exist")
            return BootFiles(kernel, initrd)
        image = image_lookup()
        return BootFiles(Path(image.kernel), Path(image.initrd))

    return provide
