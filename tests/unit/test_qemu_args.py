from pathlib import Path

import pytest

from ferry.domain.config import DomainConfig
from ferry.hypervisor.cmdline import (
    BootFiles,
    MachinePaths,
    Uefi,
    build_qemu_args,
    kernel_command_line,
)

PATHS = MachinePaths(
    run_dir=Path("/run/ferry/domains/vm"), log_dir=Path("/var/lib/ferry/domains/vm")
)
BOOT = BootFiles(Path("/cache/vmlinuz"), Path("/cache/initrd.gz"))


def config(**extra: object) -> DomainConfig:
    data: dict[str, object] = {
        "name": "virt_server",
        "memory": 256,
        "vcpus": 2,
        "disk": [{"path": "/xen/virt_server.img", "target": "xvda", "mode": "w", "format": "raw"}],
        "vif": [{"mac": "00:16:3e:4a:21:07", "bridge": "xenbr0"}],
        "ip": "10.0.0.5",
        "gateway": "10.0.0.1",
    }
    data.update(extra)
    return DomainConfig.from_mapping(data)


def args_for(cfg: DomainConfig, **kw: object) -> list[str]:
    return build_qemu_args(
        cfg,
        qemu_binary="qemu-system-x86_64",
        accel=str(kw.get("accel", "tcg")),
        boot=BOOT,
        paths=PATHS,
        taps=["vif3.0"],
        incoming=bool(kw.get("incoming", False)),
    )


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_memory_cpus_accel_and_detached() -> None:
    args = args_for(config())
    assert args[0] == "qemu-system-x86_64"
    assert option(args, "-m") == ["262148K"]  # see memory_size: QEMU 7.2 TCG workaround
    assert option(args, "-smp") == ["2"]
    assert option(args, "-machine") == ["pc,accel=tcg"]
    assert "-daemonize" in args
    assert option(args, "-pidfile") == [str(PATHS.pidfile)]
    assert "-incoming" not in args


def test_kvm_keeps_a_named_cpu_model_for_migration() -> None:
    args = args_for(config(), accel="kvm")
    assert option(args, "-machine") == ["pc,accel=kvm"]
    assert option(args, "-cpu") == ["qemu64"]
    assert option(args, "-m") == ["256"]


def test_disk_and_nic_wiring() -> None:
    args = args_for(config())
    (drive,) = option(args, "-drive")
    assert drive == (
        "file=/xen/virt_server.img,if=none,id=disk0,node-name=ferry-disk0,format=raw,cache=none"
    )
    assert "virtio-blk-pci,drive=disk0,id=vd0,addr=0x8" in option(args, "-device")
    (netdev,) = option(args, "-netdev")
    assert netdev == "tap,id=net0,ifname=vif3.0,script=no,downscript=no"
    assert any(
        d.startswith("virtio-net-pci,netdev=net0,mac=00:16:3e:4a:21:07")
        for d in option(args, "-device")
    )


def test_readonly_disk_and_url_disk() -> None:
    cfg = config(
        disk=[{"path": "nbd://10.0.0.9:10809/vm", "target": "xvdb", "mode": "r", "format": "raw"}]
    )
    (drive,) = option(args_for(cfg), "-drive")
    assert drive.startswith("file=nbd://10.0.0.9:10809/vm,")
    assert drive.endswith("readonly=on")
    assert "id=disk1" in drive


def test_sockets_and_logs_are_the_machine_paths() -> None:
    args = args_for(config())
    assert option(args, "-qmp") == [f"unix:{PATHS.qmp_socket},server=on,wait=off"]
    agent, console = option(args, "-chardev")
    assert f"path={PATHS.console_socket}" in console
    assert f"logfile={PATHS.console_log}" in console
    assert agent == f"socket,id=qga0,path={PATHS.agent_socket},server=on,wait=off"
    assert "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0" in option(
        args, "-device"
    )


def test_incoming_defer_for_a_migration_target() -> None:
    args = args_for(config(), incoming=True)
    assert option(args, "-incoming") == ["defer"]
    assert "-S" in args


def test_kernel_command_line_has_classic_ip_param_and_maps_xvd() -> None:
    line = kernel_command_line(config(root="/dev/xvda ro", extra="loglevel=4"))
    assert "root=/dev/vda ro" in line
    assert "ip=10.0.0.5::10.0.0.1:255.255.255.0:virt_server:eth0:off" in line
    assert line.endswith("loglevel=4")
    assert "console=ttyS0" in line


def test_lifecycle_actions() -> None:
    assert option(args_for(config(on_reboot="destroy", on_crash="destroy")), "-action") == [
        "reboot=shutdown,shutdown=poweroff,panic=shutdown"
    ]
    assert option(args_for(config()), "-action") == ["reboot=reset,shutdown=poweroff,panic=pause"]


def test_commas_in_paths_are_escaped() -> None:
    paths = MachinePaths(run_dir=Path("/run/a,b"), log_dir=Path("/log"))
    args = build_qemu_args(
        config(), qemu_binary="q", accel="tcg", boot=BOOT, paths=paths, taps=["t"]
    )
    assert option(args, "-qmp") == ["unix:/run/a,,b/qmp.sock,server=on,wait=off"]


def test_tap_count_must_match() -> None:
    with pytest.raises(ValueError):
        build_qemu_args(config(), qemu_binary="q", accel="tcg", boot=BOOT, paths=PATHS, taps=[])


def test_format_and_cache_come_from_the_disk() -> None:
    disk = {"path": "/xen/a.qcow2", "format": "qcow2", "cache": "writeback"}
    (drive,) = option(args_for(config(disk=[disk])), "-drive")
    assert "format=qcow2,cache=writeback" in drive


def test_an_unpinned_format_is_never_left_to_qemu() -> None:
    with pytest.raises(ValueError, match="no format pinned"):
        args_for(config(disk=[{"path": "/xen/a.img"}]))


def test_disk_boot_with_seabios_boots_the_first_disk() -> None:
    args = build_qemu_args(
        config(), qemu_binary="q", accel="tcg", boot=BootFiles(None), paths=PATHS, taps=["t"]
    )
    assert "-kernel" not in args and "-append" not in args
    devices = option(args, "-device")
    assert "virtio-blk-pci,drive=disk0,id=vd0,addr=0x8,bootindex=0" in devices
    # No network boot ROM: firmware would try PXE before giving up on the disk.
    assert any(d.startswith("virtio-net-pci") and d.endswith(",romfile=") for d in devices)
    assert not any("pflash" in d for d in option(args, "-drive"))


def test_uefi_adds_the_code_read_only_and_the_domains_own_vars() -> None:
    uefi = Uefi(Path("/fw/CODE.fd"), Path("/var/lib/ferry/nvram/vm.fd"), Path("/fw/VARS.fd"))
    args = build_qemu_args(
        config(), qemu_binary="q", accel="tcg", boot=BootFiles(None, uefi=uefi), paths=PATHS,
        taps=["t"],
    )  # fmt: skip
    drives = option(args, "-drive")
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd" in drives
    assert "if=pflash,format=raw,unit=1,file=/var/lib/ferry/nvram/vm.fd" in drives
