"""The QEMU command line for a domain, built as an argument list.

Pure functions only: everything here is testable without QEMU. The device
layout is fixed by the config alone (disk N in PCI slot 8+N, NIC N in slot
16+N) so that a source and a target built from the same config have the very
same machine, which live migration requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.domain.config import DomainConfig
from ferry.domain.disks import DiskSpec

# One machine model and CPU model everywhere: a named model (not "host") keeps
# the guest migratable between hosts whose CPUs differ.
MACHINE_TYPE = "pc"
CPU_MODEL = "qemu64"
SEED_SLOT = 0x1E
AGENT_SLOT = 0x1D


@dataclass(frozen=True)
class MachinePaths:
    """The files one QEMU instance owns on its host."""

    run_dir: Path  # sockets and pidfile; short path (unix sockets max 107 bytes)
    log_dir: Path  # qemu.log and console.log; kept after the domain ends

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def seed(self) -> Path:
        """The cloud-init seed drive, made from the config at each start."""
        return self.run_dir / "seed.img"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's channel (answered only where the guest runs qemu-ga)."""
        return self.run_dir / "qga.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def qemu_log(self) -> Path:
        return self.log_dir / "qemu.log"

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"


@dataclass(frozen=True)
class Uefi:
    """OVMF: its code, shared and read-only, and this domain's own variables."""

    code: Path
    vars: Path
    vars_template: Path  # copied to ``vars`` at the domain's first start here


@dataclass(frozen=True)
class BootFiles:
    """A direct kernel boot (``kernel`` set), or the firmware booting the disk."""

    kernel: Path | None
    initrd: Path | None = None
    uefi: Uefi | None = None  # with no kernel: OVMF instead of SeaBIOS


def kernel_command_line(cfg: DomainConfig) -> str:
    # xm configs name Xen's xvdX devices; the same disk is a virtio vdX here.
    root = cfg.root.replace("/dev/xvd", "/dev/vd")
    parts = [f"root={root}", "rw", "console=ttyS0,115200", "quiet", "panic=-1"]
    ip_param = cfg.kernel_ip_param()
    if ip_param:
        parts.append(ip_param)
    else:
        parts.append(f"ferry.hostname={cfg.guest_hostname}")
    if cfg.extra:
        parts.append(cfg.extra)
    return " ".join(parts)


def memory_size(cfg: DomainConfig, accel: str) -> str:
    """QEMU's -m for the domain.

    Under TCG, QEMU 7.2 loses guest writes during live migration when the RAM
    block is a multiple of 64 pages: its fast dirty-bitmap sync then skips
    resetting TCG's TLB dirty state, so pages written through a cached TLB
    entry are never sent again and the guest resumes with stale memory (seen
    here as kernel oopses right after the switchover; fixed upstream by
    cpu_physical_memory_dirty_bits_cleared). One extra 4 KiB page moves the
    block onto QEMU's slow, correct path. KVM tracks dirty pages itself.
    """
    if accel == "tcg":
        return f"{cfg.memory * 1024 + 4}K"
    return str(cfg.memory)


def _escape(value: str) -> str:
    """QEMU option values escape ',' by doubling it."""
    return value.replace(",", ",,")


def _lifecycle_actions(cfg: DomainConfig) -> str:
    reboot = "reset" if cfg.on_reboot == "restart" else "shutdown"
    # A crash that is to be restarted or kept must stop the guest so that ferryd
    # sees it; only "destroy" lets QEMU end by itself.
    panic = "shutdown" if cfg.on_crash == "destroy" else "pause"
    return f"reboot={reboot},shutdown=poweroff,panic={panic}"


def _boot_args(cfg: DomainConfig, boot: BootFiles) -> list[str]:
    if boot.kernel is not None:
        args = ["-kernel", str(boot.kernel)]
        if boot.initrd is not None:
            args += ["-initrd", str(boot.initrd)]
        return [*args, "-append", kernel_command_line(cfg)]
    if boot.uefi is None:
        return []  # SeaBIOS, QEMU's default firmware
    # Both flash images travel in the migration stream; the target needs files
    # of the same sizes, and writes the variables it received back to its own.
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={_escape(str(boot.uefi.code))}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={_escape(str(boot.uefi.vars))}",
    ]


def disk_node(index: int) -> str:
    """The node name of disk ``index``'s format layer."""
    return f"ferry-disk{index}"


def _disk_args(disk: DiskSpec, boot_disk: bool) -> list[str]:
    if disk.format is None:
        # Never let QEMU probe: the format is read once, checked, and pinned.
        raise ValueError(f"disk {disk.path} has no format pinned")
    index = disk.index
    drive = [
        f"file={_escape(disk.path)}",
        "if=none",
        f"id=disk{index}",
        # A block export (a --copy-storage migration's target) names a node.
        f"node-name={disk_node(index)}",
        f"format={disk.format}",
        f"cache={disk.cache_mode}",
    ]
    if not disk.writable:
        drive.append("readonly=on")
    device = f"virtio-blk-pci,drive=disk{index},id=vd{index},addr={8 + index:#x}"
    if boot_disk:
        device += ",bootindex=0"
    return ["-drive", ",".join(drive), "-device", device]


def build_qemu_args(
    cfg: DomainConfig,
    *,
    qemu_binary: str,
    accel: str,
    boot: BootFiles,
    paths: MachinePaths,
    taps: Sequence[str],
    incoming: bool = False,
) -> list[str]:
    if len(taps) != len(cfg.vifs):
        raise ValueError(f"{len(cfg.vifs)} vifs but {len(taps)} tap devices")
    args = [
        qemu_binary,
        "-name",
        f"guest={_escape(cfg.name)},debug-threads=on",
        "-machine",
        f"{MACHINE_TYPE},accel={accel}",
        "-cpu",
        CPU_MODEL,
        "-m",
        memory_size(cfg, accel),
        "-smp",
        str(cfg.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    if cfg.uuid:
        args += ["-uuid", cfg.uuid]
    args += _boot_args(cfg, boot)
    for disk in cfg.disks:
        args += _disk_args(disk, boot_disk=boot.kernel is None and disk is cfg.disks[0])
    if cfg.cloud_init is not None:
        # Read-only, after every disk (the guest sees it as the last vdX).
        args += [
            "-drive",
            f"file={_escape(str(paths.seed))},if=none,id=seed0,format=raw,readonly=on",
            "-device",
            f"virtio-blk-pci,drive=seed0,id=seed,addr={SEED_SLOT:#x}",
        ]
    for index, (vif, tap) in enumerate(zip(cfg.vifs, taps, strict=True)):
        args += ["-netdev", f"tap,id=net{index},ifname={tap},script=no,downscript=no"]
        device = (
            f"virtio-net-pci,netdev=net{index},mac={vif.mac},id=nic{index},addr={16 + index:#x}"
        )
        if boot.kernel is None:
            # No option ROM: firmware would try a network boot (over a minute
            # under OVMF) before or after the disk, and ferry boots disks.
            device += ",romfile="
        args += ["-device", device]
    args += [
        "-device",
        f"virtio-serial-pci,id=vser0,addr={AGENT_SLOT:#x}",
        "-chardev",
        f"socket,id=qga0,path={_escape(str(paths.agent_socket))},server=on,wait=off",
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        "-device",
        "pvpanic",
        "-chardev",
        f"socket,id=console0,path={_escape(str(paths.console_socket))},server=on,wait=off,"
        f"logfile={_escape(str(paths.console_log))},logappend=on",
        "-serial",
        "chardev:console0",
        "-qmp",
        f"unix:{_escape(str(paths.qmp_socket))},server=on,wait=off",
        "-action",
        _lifecycle_actions(cfg),
        "-pidfile",
        str(paths.pidfile),
        # -D keeps QEMU's stderr open after -daemonize, so its later errors
        # still reach the log.
        "-D",
        str(paths.qemu_log),
        "-msg",
        "timestamp=on",
        "-daemonize",
    ]
    if incoming:
        # -S: the arriving VM stays paused after the stream ends, and its disks
        # inactive, until the source's commit says "cont".
        args += ["-S", "-incoming", "defer"]
    return args
