"""A guest disk that boots by itself, as an installed guest's does: a partition
table, a bootloader, and the kernel in the guest's own /boot.

- ``bios``: an MBR (syslinux's boot code), one bootable ext4 partition with
  extlinux installed in it; SeaBIOS boots it.
- ``uefi``: a GPT with an EFI system partition holding GRUB as the removable
  media path (\\EFI\\BOOT\\BOOTX64.EFI, found by OVMF without any boot entry),
  and the ext4 root; GRUB loads the kernel from the root's /boot.

The root file system is ferry's guest image's, copied sparse into its
partition. Its /boot, fstab and bootloader config are written through a loop
device (the host kernel has ext4; it has no vfat, so the ESP is made and
filled with mtools, never mounted). The kernel command line lives in the
bootloader's config, inside the disk: ``append`` puts there what an installed
guest would have (its address, its host name).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ferry.errors import ImageError
from ferry.guest.image import GuestImage, sparse_copy_into
from ferry.storage.new_disk import write_new_disk
from ferry.util.commands import run_tool as run

FIRMWARES = ("bios", "uefi")
SECTOR = 512
MIB = 1 << 20
ESP_SIZE = 32 * MIB
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
MBR_CODE_BYTES = 440  # the rest of the first sector is the partition table
GRUB_EFI_MODULES = "part_gpt part_msdos fat ext2 search search_fs_file linux normal"
BASE_APPEND = "console=ttyS0,115200 rootfstype=ext4 rootflags=rw quiet panic=-1"


def make_bootable_disk(image: GuestImage, dest: Path, firmware: str, append: str = "") -> None:
    """Write ``dest`` (never over an existing file) booting with ``firmware``."""
    if firmware not in FIRMWARES:
        raise ImageError(f"firmware {firmware!r} is not one of {', '.join(FIRMWARES)}")
    if "\n" in append:
        raise ImageError("the kernel command line must be one line")
    builder = _bios_disk if firmware == "bios" else _uefi_disk
    write_new_disk(dest, lambda tmp: builder(image, tmp, append))


def _bios_disk(image: GuestImage, out: Path, append: str) -> None:
    root_size = image.rootfs.stat().st_size
    _blank(out, MIB + root_size)
    _partition(out, f"label: dos\nstart=2048, size={root_size // SECTOR}, type=83, bootable\n")
    _copy_root(image, out, MIB)
    cmdline = f"root=/dev/vda1 {BASE_APPEND} {append}".strip()
    with _mounted_partition(out, 1) as root:
        _install_boot_files(image, root, "/dev/vda1")
        syslinux = root / "boot" / "syslinux"
        syslinux.mkdir(parents=True, exist_ok=True)
        (syslinux / "syslinux.cfg").write_text(
            "SERIAL 0 115200\nDEFAULT guest\nPROMPT 0\nTIMEOUT 0\nLABEL guest\n"
            "  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.img\n"
            f"  APPEND {cmdline}\n"
        )
        run(["extlinux", "--install", str(syslinux)], f"installing extlinux in {out}")
    with out.open("r+b") as f:
        f.write(SYSLINUX_MBR.read_bytes()[:MBR_CODE_BYTES])


def _uefi_disk(image: GuestImage, out: Path, append: str) -> None:
    root_size = image.rootfs.stat().st_size
    root_start = MIB + ESP_SIZE
    # GPT keeps a copy of itself in the last 33 sectors: one MiB spare at the end.
    _blank(out, root_start + root_size + MIB)
    _partition(
        out,
        "label: gpt\n"
        f'start=2048, size={ESP_SIZE // SECTOR}, type=U, name="EFI"\n'
        f'start={root_start // SECTOR}, size={root_size // SECTOR}, type=L, name="root"\n',
    )
    _copy_root(image, out, root_start)
    with _mounted_partition(out, 2) as root:
        _install_boot_files(image, root, "/dev/vda2")
    cmdline = f"root=/dev/vda2 {BASE_APPEND} {append}".strip()
    # OVMF mirrors the console to the serial port itself: GRUB's own serial
    # terminal lines made it stop at a grub> prompt here (docs/research).
    embedded = (
        "search --no-floppy --file --set=root /boot/vmlinuz\n"
        f"linux /boot/vmlinuz {cmdline}\n"
        "initrd /boot/initrd.img\n"
        "boot\n"
    )
    with tempfile.TemporaryDirectory(prefix="ferry-esp-") as work:
        cfg = Path(work) / "grub.cfg"
        cfg.write_text(embedded)
        efi = Path(work) / "BOOTX64.EFI"
        run(
            [
                "grub-mkstandalone", "-O", "x86_64-efi", "-o", str(efi),
                f"--modules={GRUB_EFI_MODULES}", "--locales=", "--themes=", "--fonts=",
                f"boot/grub/grub.cfg={cfg}",
            ],
            "building GRUB for the EFI system partition",
        )  # fmt: skip
        esp = f"{out}@@{MIB}"
        run(
            # FAT16 said outright: mkfs.vfat picks the type from the whole file's size.
            ["mkfs.vfat", "-F", "16", "-n", "EFI", "--offset", str(MIB // SECTOR), str(out),
             str(ESP_SIZE // 1024)],
            f"formatting the EFI system partition of {out}",
        )  # fmt: skip
        env_run = ["env", "MTOOLS_SKIP_CHECK=1"]
        run([*env_run, "mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], "filling the ESP")
        run([*env_run, "mcopy", "-i", esp, str(efi), "::/EFI/BOOT/BOOTX64.EFI"], "filling the ESP")


def _blank(out: Path, size: int) -> None:
    with out.open("xb") as f:
        f.truncate(size)


def _partition(out: Path, table: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".sfdisk") as script:
        script.write(table)
        script.flush()
        run(["sh", "-c", 'sfdisk -q "$1" < "$2"', "sfdisk", str(out), script.name],
            f"partitioning {out}")  # fmt: skip


def _copy_root(image: GuestImage, out: Path, at: int) -> None:
    with out.open("r+b") as f:
        sparse_copy_into(image.rootfs, f.fileno(), at)
        f.flush()
        os.fsync(f.fileno())


def _install_boot_files(image: GuestImage, root: Path, device: str) -> None:
    boot = root / "boot"
    boot.mkdir(exist_ok=True)
    (boot / "vmlinuz").write_bytes(image.kernel.read_bytes())
    (boot / "initrd.img").write_bytes(image.initrd.read_bytes())
    (root / "etc" / "fstab").write_text(f"{device} / ext4 rw,errors=remount-ro 0 1\n")


@contextlib.contextmanager
def _mounted_partition(disk: Path, number: int) -> Iterator[Path]:
    """Partition ``number`` of ``disk`` mounted on a temporary directory.

    ``losetup -P`` makes no partition nodes on every host (none here): partx
    adds them. Everything is undone in reverse order, whatever failed.
    """
    loop = run(["losetup", "--find", "--show", str(disk)], f"attaching {disk}").strip()
    try:
        run(["partx", "-a", loop], f"reading the partitions of {disk}")
        try:
            with tempfile.TemporaryDirectory(prefix="ferry-root-") as mnt:
                run(["mount", "-t", "ext4", f"{loop}p{number}", mnt], f"mounting {disk}")
                try:
                    yield Path(mnt)
                finally:
                    run(["umount", mnt], f"unmounting {disk}")
        finally:
            run(["partx", "-d", loop], f"removing the partitions of {disk}")
    finally:
        run(["losetup", "-d", loop], f"detaching {disk}")
