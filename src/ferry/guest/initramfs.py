"""The initramfs: busybox, the few modules needed to reach disk and network, and /init."""

from __future__ import annotations

import gzip
import lzma
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ImageError
from ferry.guest.kernel import KernelTree
from ferry.util.commands import run_tool as run

# What the guest needs before its root is mounted; the ACPI button and evdev make
# QEMU's system_powerdown reach ferry-init as an input event.
# vfat and its code pages: the cloud-init seed drive is a FAT image;
# virtio_console: the guest agent's channel.
WANTED_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "evdev", "button", "ext4", "vfat",
    "nls_cp437", "nls_utf8",
)  # fmt: skip
MODULE_LIST = "etc/ferry-modules"
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class ModuleEntry:
    name: str
    path: str  # relative to the modules dir, as modules.dep spells it


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, dependency paths) from a modules.dep file."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[module_name(path)] = (path.strip(), deps.split())
    return table


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(
    wanted: tuple[str, ...], deps: dict[str, tuple[str, list[str]]], builtin: set[str]
) -> list[ModuleEntry]:
    """Modules to insmod, dependencies first; builtin ones are skipped."""
    order: list[ModuleEntry] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name not in deps:
            via = " <- ".join(chain) if chain else "requested"
            raise ImageError(f"kernel module {name} ({via}) is neither in modules.dep nor builtin")
        seen.add(name)
        path, needs = deps[name]
        # modules.dep lists dependencies so that the last one must be loaded first.
        for dep in reversed(needs):
            visit(module_name(dep), (name, *chain))
        order.append(ModuleEntry(name, path))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod only takes plain ELF objects."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        try:
            return subprocess.run(
                ["zstd", "-dcq", str(path)], capture_output=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise ImageError(f"decompressing kernel module {path} with zstd: {err}") from err
    return data


class CpioWriter:
    """A minimal newc archive writer: owners and mtimes are fixed, so output is reproducible."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(_pad4(header + encoded))
        self._parts.append(_pad4(data))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    out = run([str(busybox), "--list"], f"listing applets of {busybox}")
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def build_initramfs(tree: KernelTree, init_script: bytes, out: Path) -> list[str]:
    """Write a gzipped newc initramfs to ``out``; returns the module load order."""
    mods = tree.modules_dir
    try:
        deps = parse_modules_dep((mods / "modules.dep").read_text())
        builtin = parse_builtin((mods / "modules.builtin").read_text())
    except OSError as err:
        raise ImageError(f"reading module tables in {mods}: {err.strerror}") from err
    order = load_order(WANTED_MODULES, deps, builtin)

    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "newroot", "run", "tmp"):
        cpio.directory(d)
    # The kernel opens /dev/console for /init before anything could mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in busybox_applets():
        cpio.symlink(f"bin/{applet}", "busybox")
    for entry in order:
        cpio.file(f"lib/modules/{entry.name}.ko", read_module(mods / entry.path))
    cpio.file(MODULE_LIST, "".join(f"{e.name}\n" for e in order).encode())
    cpio.file("init", init_script, 0o755)
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    return [e.name for e in order]
