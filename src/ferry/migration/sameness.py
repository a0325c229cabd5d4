"""The target's proof that it would run the very domain the source runs.

The same disks (size, format, and for a writable file the source's lease
token, which proves this host sees that very file and not a copy at the same
path) and the same boot files (kernel and initrd by digest, firmware by the
sizes its flash images must fit), found in this host's own directories.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.domain.disks import DiskSpec
from ferry.errors import ImageError, StorageError
from ferry.host.launcher import Launcher
from ferry.hypervisor.firmware import UefiFiles
from ferry.hypervisor.seed import seed_digest
from ferry.migration.params import MigrationParams
from ferry.storage import images, lease
from ferry.storage.cache_safety import migration_hazard
from ferry.storage.new_disk import check_new_disk, copied_disks


class SameDomain:
    """The checks of one target host."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.host = launcher.host

    def new_disks(
        self, cfg: DomainConfig, facts: list[Any], params: MigrationParams
    ) -> list[tuple[DiskSpec, int, str]]:
        """--copy-storage: each disk to make here (none may exist yet), its size and real path.

        Free space is summed over the disks that share a file system.
        """
        if not params.copy_storage:
            return []
        if len(facts) != len(cfg.disks):
            raise StorageError("the source described a different number of disks")
        by_target = dict(zip((d.target for d in cfg.disks), facts, strict=True))
        made = []
        reserved: dict[int, int] = {}
        for disk in copied_disks(cfg):
            fact = by_target[disk.target]
            size, used = (fact.get(k) if isinstance(fact, dict) else None for k in
                          ("size", "allocated"))  # fmt: skip
            if not (isinstance(size, int) and size > 0 and isinstance(used, int) and used >= 0):
                raise StorageError(f"disk {disk.path}: the source sent no size to copy")
            theirs = fact.get("format") if isinstance(fact, dict) else None
            if disk.format is None or theirs != disk.format:
                raise StorageError(f"disk {disk.path}: its format here and at the source differ")
            real = check_new_disk(disk, self.host.storage_roots, min(used, size), reserved)
            made.append((disk, size, real))
        return made

    async def disks(self, cfg: DomainConfig, facts: list[Any], params: MigrationParams) -> None:
        if len(facts) != len(cfg.disks):
            raise StorageError("the source described a different number of disks")
        copied = copied_disks(cfg) if params.copy_storage else []
        for disk, fact in zip(cfg.disks, facts, strict=True):
            if not isinstance(fact, dict):
                raise StorageError("malformed disk description")
            if disk in copied:
                continue  # made here empty, checked by new_disks
            if disk.format is None:
                raise StorageError(f"disk {disk.path}: the source sent no format for it")
            hazard = None if params.unsafe_cache else migration_hazard(disk)
            if hazard is not None:
                raise StorageError(hazard)
            # The image as this host reads it: its format must be the one the
            # source runs (a header rewritten meanwhile is not the same image).
            here = await images.inspect(
                disk, self.host.storage_roots, self.host.storage_servers, share=True
            )
            size = fact.get("size")
            if size is not None and here.virtual_size != size:
                raise StorageError(
                    f"disk {disk.path} is {here.virtual_size} bytes here but {size} bytes on "
                    "the source: not the same image"
                )
            theirs = fact.get("format")
            if theirs is not None and theirs != here.format:
                raise StorageError(
                    f"disk {disk.path} is a {here.format} image here but {theirs} on the "
                    "source: not the same image"
                )
            if disk.writable and not disk.is_url:
                # Required: the token proves the source holds the disk and that
                # this host sees that very file, not a copy at the same path.
                token = fact.get("lease_token")
                held = lease.read_lease(disk.path)
                if not isinstance(token, str) or held is None or held.token != token:
                    raise StorageError(
                        f"disk {disk.path} here is not the source's disk (its lease differs): "
                        "is the storage really shared?"
                    )

    async def boot(self, cfg: DomainConfig, boot: Mapping[str, Any]) -> None:
        """The very boot files of the source, found in this host's image directory.

        One answer whether a file is missing, elsewhere or different, so that a
        peer learns nothing about the files of this host.
        """
        seed = cfg.seed_files()
        if seed is not None and boot.get("seed_sha256") != await asyncio.to_thread(
            seed_digest, seed
        ):
            raise ImageError(
                "the cloud-init seed made here differs from the source's: the guest would see "
                "another drive (different mtools or dosfstools versions?)"
            )
        if cfg.boots_from_disk:
            await self._firmware(cfg, boot)
            return
        try:
            files = self.launcher.boot_files(cfg)
        except ImageError:
            files = None
        wanted = [("kernel", files.kernel if files else None, boot.get("kernel_sha256"))]
        if cfg.ramdisk or boot.get("initrd_sha256") is not None or (files and files.initrd):
            wanted.append(("initrd", files.initrd if files else None, boot.get("initrd_sha256")))
        for role, path, digest in wanted:
            if not (
                isinstance(digest, str)
                and path is not None
                and self.launcher.in_boot_dirs(path)
                and path.is_file()
                and await self.launcher.file_digest(path) == digest
            ):
                raise ImageError(
                    f"this host's image directory has no {role} identical to the source's"
                )

    async def _firmware(self, cfg: DomainConfig, boot: Mapping[str, Any]) -> None:
        """Flash images travel in the stream, but only into files of the same sizes."""
        if boot.get("firmware", "bios") != cfg.firmware:
            theirs = boot.get("firmware")
            raise ImageError(f"the source boots firmware {theirs}, not {cfg.firmware}")
        if cfg.firmware != "uefi":
            return
        files = self.launcher.boot_files(cfg)
        assert files.uefi is not None
        here = UefiFiles(files.uefi.code, files.uefi.vars_template).sizes()
        for key, size in here.items():
            if boot.get(key) != size:
                raise ImageError(
                    f"this host's UEFI firmware differs from the source's ({key} {size} here, "
                    f"{boot.get(key)} there)"
                )


async def boot_facts(launcher: Launcher, cfg: DomainConfig) -> dict[str, Any]:
    """What a host checks with ``SameDomain.boot``: the seed's and boot files' digests,
    or the firmware and the sizes of its flash images."""
    seed = cfg.seed_files()
    facts = {} if seed is None else {"seed_sha256": await asyncio.to_thread(seed_digest, seed)}
    boot = launcher.boot_files(cfg)
    if boot.kernel is None:
        if boot.uefi is None:
            return facts | {"firmware": "bios"}
        return facts | {
            "firmware": "uefi",
            **UefiFiles(boot.uefi.code, boot.uefi.vars_template).sizes(),
        }
    initrd = await launcher.file_digest(boot.initrd) if boot.initrd else None
    return facts | {
        "kernel_sha256": await launcher.file_digest(boot.kernel),
        "initrd_sha256": initrd,
    }
