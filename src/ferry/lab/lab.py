"""``ferry lab``: the classic two-host set-up on one machine, brought up and down whole.

``up`` builds the topology (:mod:`ferry.lab.topology`), the shared storage
(:mod:`ferry.lab.storage`) with the VM's disk, and a ferryd in each host
(:mod:`ferry.lab.host_daemons`), and records all of it in ``<workdir>/lab.json``
as it goes (:mod:`ferry.lab.state`), so that ``down`` (also after a crash
half-way through ``up``) finds everything again. The workdir::

    lab.json            what the lab made: nodes, disk, processes
    virt_server         the VM's xm config, for `ferry create`
    xen/                the shared export: virt_server.img, scratch.img
    etcd/<node>/        the data of the three etcd members (lab.etcd_cluster)
    hosts/<host>/       ferryd.toml, state/, ferryd.log
    storage/            the storage servers' configs and logs

This module is the lab's face for the rest of ferry, its tests and the
benchmark: what they use is in ``__all__``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from ferry.errors import FerryError, ImageError
from ferry.guest.boot_disk import make_bootable_disk
from ferry.guest.image import build_image, load_image, make_domain_disk
from ferry.lab import etcd_cluster, storage, topology
from ferry.lab.host_daemons import RUN_ROOT, restart_ferryd, start_ferryd, stop_host
from ferry.lab.pki import ensure_lab_pki
from ferry.lab.state import Lab
from ferry.lab.storage import StorageSpec
from ferry.lab.sweep import kill_namespace_processes
from ferry.lab.topology import (
    BOOTS,
    DEFAULT_MEMORY,
    DEFAULT_WORKDIR,
    HOSTS,
    NODES,
    VM_ADDRESS,
    VM_NAME,
)
from ferry.util.commands import run_tool as run

__all__ = [
    "DEFAULT_MEMORY",
    "DEFAULT_WORKDIR",
    "RUN_ROOT",
    "Lab",
    "down",
    "load",
    "restart_ferryd",
    "up",
]

SCRATCH = "scratch"  # a small image for storage checks, never a VM's disk
SCRATCH_SIZE = 64 << 20
_MADE = (
    "lab.json",
    "xen",
    "hosts",
    "storage",
    "pki",
    "etcd",
    VM_NAME,
)  # workdir entries `down` may remove

Log = Callable[[str], None]


def up(
    storage_kind: str = "nfs",
    rate: str | None = topology.DEFAULT_RATE,
    workdir: Path = DEFAULT_WORKDIR,
    memory: int = DEFAULT_MEMORY,
    log: Log = print,
    boot: str = "kernel",
    disk_format: str = "raw",
) -> Lab:
    """Bring the lab up, after removing whatever a previous lab left behind.

    ``boot``: "disk" gives virt_server a disk with its own bootloader (BIOS)
    and kernel, booted through the classic config's pygrub line.
    ``disk_format``: "qcow2" converts virt_server's disk (its name stays
    virt_server.img: ferry reads the format from the image).
    """
    storage.check_kind(storage_kind)
    if boot not in BOOTS:
        raise FerryError(f"lab boot {boot!r} is not one of {', '.join(BOOTS)}")
    rate = topology.parse_rate(rate) if rate is not None else None
    workdir = workdir.absolute()
    for line in down(workdir, log=lambda _line: None):
        log(f"cleaned up a previous lab: {line}")
    spec = StorageSpec(storage_kind, workdir / "xen")
    lab = Lab(
        workdir=workdir, storage=storage_kind, rate=rate, memory=memory,
        disk=spec.disk(VM_NAME), scratch_disk=spec.disk(SCRATCH), boot=boot,
    )  # fmt: skip
    try:
        lab.export_dir.mkdir(parents=True)
        lab.save()
        topology.build(rate)
        log(f"network: {len(NODES)} nodes on {topology.LAN_BRIDGE}, links at {rate or 'full'}")
        _make_disks(lab, log, disk_format)
        lab.domain_config.write_text(lab.domain_config_text())
        lab.servers = storage.start(spec, [VM_NAME, SCRATCH], workdir / "storage")
        lab.save()
        log(f"storage: {storage_kind}, virt_server's disk {lab.disk}")
        ensure_lab_pki(workdir)
        lab.servers += etcd_cluster.start(workdir, workdir / "storage")
        lab.save()
        log(f"etcd: {len(etcd_cluster.MEMBERS)} members ({', '.join(etcd_cluster.MEMBERS)}), TLS")
        for host in HOSTS:
            start_ferryd(lab, host.name)
            log(f"{host.name}: ferryd answering on {lab.daemons[host.name].socket}")
        lab.ready = True
        lab.save()
    except BaseException:
        for line in down(workdir, log=lambda _line: None):
            log(f"undone: {line}")
        raise
    return lab


def _make_disks(lab: Lab, log: Log, disk_format: str = "raw") -> None:
    try:
        image = load_image()
    except ImageError:
        image = build_image(log=log)
    where = lab.export_dir
    if lab.storage == "local":
        for host in HOSTS:
            lab.local_dir(host.name).mkdir(parents=True, exist_ok=True)
        where = lab.local_dir(HOSTS[0].name)  # the VM starts there, its disk with it
    disk = where / f"{VM_NAME}.img"
    if lab.boot in ("disk", "uefi"):
        # What the installed guest's own bootloader config holds: its address.
        ip = f"ip={VM_ADDRESS}:::255.255.255.0:{VM_NAME}:eth0:off"
        make_bootable_disk(image, disk, "bios" if lab.boot == "disk" else "uefi", ip)
    else:
        make_domain_disk(image, disk)
    if disk_format == "qcow2":
        converted = disk.with_suffix(".qcow2-part")
        run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(converted)],
            f"converting {disk} to qcow2",
        )
        converted.replace(disk)
    elif disk_format != "raw":
        raise FerryError(f"lab disk format {disk_format!r} is not raw or qcow2")
    with (where / f"{SCRATCH}.img").open("xb") as scratch:
        scratch.truncate(SCRATCH_SIZE)


def down(workdir: Path = DEFAULT_WORKDIR, log: Log = print) -> list[str]:
    """Remove everything a lab made: domains, daemons, servers, namespaces, files.

    Works from ``lab.json`` when there is one, and also scans for lab
    namespaces, processes inside them and /etc/netns entries, so that a lab
    whose ``up`` died half-way is removed as well. Returns what it removed.
    """
    workdir = workdir.absolute()
    removed: list[str] = []
    lab: Lab | None = None
    with contextlib.suppress(FerryError):
        lab = Lab.load(workdir)
    if lab is not None:
        for daemon in lab.daemons.values():
            removed += stop_host(daemon)
        removed += [f"stopped {name}" for name in storage.stop(lab.servers)]
    removed += [f"killed leftover {what}" for what in kill_namespace_processes()]
    removed += [f"removed {what}" for what in topology.teardown()]
    if RUN_ROOT.exists():
        shutil.rmtree(RUN_ROOT, ignore_errors=True)
        removed.append(f"removed {RUN_ROOT}")
    for entry in _MADE:
        path = workdir / entry
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(f"removed {path}")
    with contextlib.suppress(OSError):
        workdir.rmdir()  # only if empty: it may be a directory of the user's
    for line in removed:
        log(line)
    return removed


def load(workdir: Path = DEFAULT_WORKDIR) -> Lab:
    return Lab.load(workdir)
