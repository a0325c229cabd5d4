"""Two libvirtd's in the lab's host namespaces, and ferry's guest as a libvirt domain.

Optional: ``bench/setup-libvirt.sh`` installs libvirt; the main set-up never
does. Each libvirtd runs in its host's network namespace and in a mount
namespace of its own, where directories under the bench's work dir are bound
over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
/var/log/libvirt: two daemons on one machine then share no state. They listen
on plain TCP with no authentication on the host's lab address, which only the
lab's namespaces reach; that is what lets the source's libvirtd open the
target's (``--p2p``) without a PKI of its own.

The domain is built from the same config and boot files as ferry's QEMU: same
kernel, initrd and append line, the same disk URL on the NFS export, the same
MAC on xenbr0, the same machine and CPU model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

from ferry.domain.config import DomainConfig
from ferry.hypervisor import process
from ferry.hypervisor.cmdline import CPU_MODEL, BootFiles, kernel_command_line
from ferry.lab import topology

# libvirt's system paths, each bound to a directory of the daemon's own.
BOUND = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
QEMU_USER = "libvirt-qemu"  # libvirtd refuses to start its QEMU driver without it
SETUP_HINT = "run bench/setup-libvirt.sh once to add the libvirt rows"
# virsh translates its labels and formats numbers by locale: read it in C.
VIRSH_ENV = {**os.environ, "LC_ALL": "C"}


def missing() -> str | None:
    """Why libvirt cannot run here, or None."""
    for tool in ("libvirtd", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; {SETUP_HINT}"
    if not any(Path("/usr/lib").glob("*/libvirt/connection-driver/libvirt_driver_qemu.so")):
        return f"libvirt's QEMU driver is not installed; {SETUP_HINT}"
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        return f"user {QEMU_USER} does not exist; {SETUP_HINT}"
    missing_dirs = [d for d in BOUND.values() if not Path(d).is_dir()]
    if missing_dirs:
        return f"{', '.join(missing_dirs)} missing (mount points); {SETUP_HINT}"
    return None


def uri(host: str) -> str:
    return f"qemu+tcp://{topology.node(host).address}/system"


def libvirtd_conf(address: str) -> str:
    return (
        "listen_tls = 0\nlisten_tcp = 1\n"
        f'listen_addr = "{address}"\nauth_tcp = "none"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    )


def qemu_conf(address: str) -> str:
    # Root, no cgroups, no private /dev and no security driver: what a lab
    # namespace on this machine allows; none of it touches migration.
    # migration_host: the address the target's QEMU listens on (its hostname
    # would resolve outside the lab).
    return (
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
        'security_driver = "none"\nstdio_handler = "file"\n'
        "cgroup_controllers = [ ]\nnamespaces = [ ]\n"
        f'migration_host = "{address}"\n'
    )


def _disk_xml(path: str, fmt: str, cache: str, index: int, writable: bool) -> str:
    target = f"vd{chr(ord('a') + index)}"
    slot = f"{8 + index:#04x}"  # ferry's fixed layout: disk N in PCI slot 8+N
    driver = f"<driver name='qemu' type={quoteattr(fmt)} cache={quoteattr(cache)}/>"
    if not writable:
        driver += "<readonly/>"
    address = f"<address type='pci' domain='0' bus='0' slot='{slot}' function='0'/>"
    if path.startswith("nfs://"):
        url = urlsplit(path)
        source = (
            f"<source protocol='nfs' name={quoteattr(url.path)}>"
            f"<host name={quoteattr(url.hostname or '')}/></source>"
        )
        return (
            f"<disk type='network' device='disk'>{driver}{source}"
            f"<target dev='{target}' bus='virtio'/>{address}</disk>"
        )
    if "://" in path:
        raise ValueError(f"the libvirt rig knows nfs:// and file disks, not {path}")
    return (
        f"<disk type='file' device='disk'>{driver}<source file={quoteattr(path)}/>"
        f"<target dev='{target}' bus='virtio'/>{address}</disk>"
    )


def domain_xml(cfg: DomainConfig, boot: BootFiles) -> str:
    """ferry's guest for libvirt.

    libvirt sizes RAM in whole MiB, so the extra TCG page ferry adds (see
    ``cmdline.memory_size``) cannot be given: this guest runs with QEMU 7.2's
    TCG dirty-tracking loss armed, and the bench's guest check tells whether it
    survived. Left out as well: ferry's cloud-init seed, pvpanic and guest-agent
    channel (the lab's guest boots and serves without them).
    """
    if boot.kernel is None:
        raise ValueError("the libvirt rig boots ferry's kernel directly")
    initrd = f"<initrd>{escape(str(boot.initrd))}</initrd>" if boot.initrd else ""
    disks = "".join(
        _disk_xml(d.path, d.format or "raw", d.cache_mode, d.index, d.writable) for d in cfg.disks
    )
    nics = "".join(
        f"<interface type='bridge'><mac address={quoteattr(v.mac)}/>"
        f"<source bridge={quoteattr(v.bridge)}/><model type='virtio'/>"
        f"<address type='pci' domain='0' bus='0' slot='{16 + i:#04x}' function='0'/>"
        "</interface>"
        for i, v in enumerate(cfg.vifs)
    )
    uuid = f"<uuid>{escape(cfg.uuid)}</uuid>" if cfg.uuid else ""
    return (
        f"<domain type='qemu'><name>{escape(cfg.name)}</name>{uuid}"
        f"<memory unit='MiB'>{cfg.memory}</memory><vcpu>{cfg.vcpus}</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{escape(str(boot.kernel))}</kernel>{initrd}"
        f"<cmdline>{escape(kernel_command_line(cfg))}</cmdline></os>"
        # ACPI as ferry's machine has it (libvirt adds -no-acpi without it).
        "<features><acpi/></features>"
        f"<cpu mode='custom' match='exact'><model fallback='forbid'>{CPU_MODEL}</model></cpu>"
        f"<on_poweroff>{cfg.on_poweroff}</on_poweroff><on_reboot>{cfg.on_reboot}</on_reboot>"
        f"<on_crash>{cfg.on_crash}</on_crash>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"{disks}{nics}<serial type='pty'/><controller type='usb' model='none'/>"
        "<memballoon model='none'/></devices></domain>"
    )


def _zombie_qemus() -> list[int]:
    """qemu-system zombies whose parent is the bench (libvirt's capability probes too)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat.split(" (", 1)[1].rsplit(") ", 1)
        state, ppid = rest.split()[:2]
        if state == "Z" and int(ppid) == me and name.startswith("qemu-system"):
            found.append(int(entry.name))
    return found


class QemuReaper:
    """Reaps the QEMUs libvirt leaves to the bench, as soon as they end.

    libvirt's QEMUs (and the QEMUs it probes for capabilities) double-fork; the
    bench is a child subreaper, so they become its children. libvirtd waits for
    an ended QEMU to vanish; as an unreaped zombie it does not: each migration
    then took 41 s instead of 2, and a daemon's start hung on its probes (both
    seen here). Every 20 ms one ``waitid`` peeks, without reaping, whether any
    child has ended; only then is /proc searched, and only qemu-system zombies
    are reaped: the bench's own subprocesses keep their exit status for their
    waiters.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def reap_now() -> None:
        try:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if ended is None:
            return
        for pid in _zombie_qemus():
            process.reap(pid)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.reap_now()

    def __enter__(self) -> QemuReaper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for pid in _zombie_qemus():
            process.reap(pid)


@dataclass
class Libvirtd:
    host: str
    root: Path
    proc: subprocess.Popen[bytes]


@dataclass
class LibvirtRig:
    """A libvirtd per host; ``close`` destroys their domains and ends them."""

    base: Path
    daemons: dict[str, Libvirtd] = field(default_factory=dict)

    def start(self, host: str, timeout: float = 60.0) -> None:
        node = topology.node(host)
        root = self.base / host
        for name in BOUND:
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "libvirtd.conf").write_text(libvirtd_conf(node.address))
        (root / "etc" / "qemu.conf").write_text(qemu_conf(node.address))
        (root / "etc" / "libvirt.conf").write_text("")
        binds = " && ".join(f"mount --bind {root / k} {v}" for k, v in BOUND.items())
        script = f"{binds} && exec libvirtd --listen -p /run/libvirt/libvirtd.pid"
        with (root / "libvirtd.out").open("ab") as out:
            # ip netns exec, unshare and sh all exec: the Popen's PID is libvirtd's.
            proc = subprocess.Popen(
                ["ip", "netns", "exec", node.ns, "unshare", "-m", "--propagation", "private",
                 "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        self.daemons[host] = Libvirtd(host, root, proc)
        deadline = time.monotonic() + timeout
        while self.virsh(host, "version", check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                said = ""
                for name in ("libvirtd.out", "log/libvirtd.log"):
                    with contextlib.suppress(OSError):
                        said += (root / name).read_text(errors="replace")[-1500:]
                raise RuntimeError(f"libvirtd on {host} did not answer: {said or 'no output'}")
            time.sleep(0.2)

    def virsh(
        self, host: str, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ip", "netns", "exec", topology.node(host).ns, "virsh", "-c", uri(host), *args],
            capture_output=True, text=True, timeout=timeout, env=VIRSH_ENV,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)} on {host}: {result.stderr.strip()}")
        return result

    def events(self, host: str) -> subprocess.Popen[str]:
        """``virsh qemu-monitor-event``: every QEMU event, with QEMU's own timestamps."""
        return subprocess.Popen(
            ["ip", "netns", "exec", topology.node(host).ns, "virsh", "-c", uri(host),
             "qemu-monitor-event", "--loop"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=VIRSH_ENV,
        )  # fmt: skip

    def qemu_pids(self, host: str) -> list[int]:
        """The QEMUs this host's libvirtd runs (from its pidfiles)."""
        pids = []
        for pidfile in (self.base / host / "run" / "qemu").glob("*.pid"):
            pid = process.read_pidfile(pidfile)
            if pid is not None and process.is_alive(pid):
                pids.append(pid)
        return pids

    def close(self) -> None:
        """Destroy every domain, end any QEMU left, end the daemons; each step whatever failed."""
        for host, daemon in self.daemons.items():
            if daemon.proc.poll() is None:
                try:
                    listed = self.virsh(host, "list", "--name", check=False, timeout=30)
                    for name in listed.stdout.split():
                        self.virsh(host, "destroy", name, check=False, timeout=60)
                except subprocess.TimeoutExpired:
                    pass  # a hung libvirtd: its QEMUs are ended below all the same
            # libvirtd leaves its QEMUs running when it ends: end any it still had.
            for pid in self.qemu_pids(host):
                asyncio.run(process.terminate(pid, 5.0))
            if daemon.proc.poll() is None:
                daemon.proc.terminate()
                try:
                    daemon.proc.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.proc.kill()
                    daemon.proc.wait(10)
        self.daemons.clear()
