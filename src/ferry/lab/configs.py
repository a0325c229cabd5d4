"""The config files a lab writes: the VM's classic xm config and each host's ferryd.toml."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ferry.lab import topology
from ferry.lab.storage import StorageSpec
from ferry.lab.topology import STORAGE, VM_ADDRESS, VM_MAC

RELOCATION_PORT = 8002
# Matched whole: the lab's LAN, its hosts, and a host migrating to itself.
HOSTS_ALLOW = (r"10\.42\.0\.\d+", r"xen_host_\d+", "localhost")


# kernel: ferry's own, booted directly; disk: the disk's bootloader under
# SeaBIOS (pygrub's way); uefi: the same under OVMF.


def vm_config_text(
    storage_kind: str, export_dir: Path, name: str, memory: int, boot: str = "kernel"
) -> str:
    """The lab VM's config in the classic xm format, with the lab's disk and address.

    ``boot``: "disk" keeps the classic pygrub line, which boots the kernel
    inside the disk's /boot; "kernel" boots ferry's own guest kernel directly,
    for a disk that holds a bare file system.
    """
    disk = StorageSpec(storage_kind, export_dir).disk(name)
    if storage_kind in ("dir", "local"):
        disk = f"tap:aio:{disk}"  # as the classic config named its file on NFS
    head = {
        "kernel": 'kernel = "ferry"  # ferry\'s own guest kernel, booted directly\n',
        "uefi": 'firmware = "uefi"  # OVMF boots the disk\'s own bootloader\n',
    }.get(boot, "")
    return f"""\
# Like the classic /etc/xen/virt_server, on the lab's {storage_kind} storage.
{head}name = "{name}"
uuid = "6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c"
maxmem = {memory}
memory = {memory}
vcpus = 1
bootloader = "/usr/bin/pygrub"
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "restart"
sdl = 1
disk = [ "{disk},xvda,w" ]
vif = [ "mac={VM_MAC},bridge={topology.HOST_BRIDGE}" ]
ip = "{VM_ADDRESS}"
netmask = "255.255.255.0"
"""


def host_config_text(
    host: str,
    state_dir: Path,
    run_dir: Path,
    export_dir: Path,
    pki_dir: Path,
    etcd: Sequence[str] = (),
    lease_ttl: int = 6,
) -> str:
    allow = ", ".join(f"'{p}'" for p in HOSTS_ALLOW)  # TOML literal strings: no escapes
    return f"""\
name = "{host}"
accel = "tcg"
state_dir = "{state_dir}"
run_dir = "{run_dir}"
pki_dir = "{pki_dir}"
storage_roots = ["{export_dir}"]
storage_servers = ["{STORAGE.address}"]

[relocation]
enabled = true
port = {RELOCATION_PORT}
address = ""
hosts_allow = [{allow}]
""" + (
        f"""
[cluster]
etcd = [{", ".join(f'"{u}"' for u in etcd)}]
lease_ttl = {lease_ttl}
"""
        if etcd
        else ""
    )
