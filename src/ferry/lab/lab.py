"""``ferry lab``: the classic two-host set-up on one machine, brought up and down whole.

``up`` builds the topology (:mod:`ferry.lab.topology`), the shared storage
(:mod:`ferry.lab.storage`) with the VM's disk, and a ferryd in each host, and
records all of it in ``<workdir>/lab.json`` as it goes, so that ``down`` (also
after a crash half-way through ``up``) finds everything again. The workdir::

    lab.json            what the lab made: nodes, disk, processes
    virt_server         the VM's xm config, for `ferry create`
    xen/                the shared export: virt_server.img, scratch.img
    hosts/<host>/       ferryd.toml, state/, ferryd.log
    storage/            the storage servers' configs and logs

The ferryd run directories (control sockets) are ``/run/ferrylab/<host>``,
short enough for unix socket paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import FerryError, ImageError
from ferry.guest.image import build_image, load_image, make_domain_disk
from ferry.hypervisor import process
from ferry.lab import netns, storage, topology
from ferry.lab.ferryd_process import FerrydProcess
from ferry.lab.storage import LabProcess, StorageSpec
from ferry.lab.topology import HOSTS, NODES, VM_ADDRESS, VM_MAC, VM_NAME

DEFAULT_WORKDIR = Path(os.environ.get("FERRY_LAB_WORKDIR") or "/var/lib/ferry-lab")
RUN_ROOT = Path("/run/ferrylab")
STATE_FILE = "lab.json"
RELOCATION_PORT = 8002
HOSTS_ALLOW = (r"^10\.42\.0\.", "^xen_host_", "^localhost")
SCRATCH = "scratch"  # a small image for storage checks, never a VM's disk
SCRATCH_SIZE = 64 << 20
DEFAULT_MEMORY = 256
_MADE = ("lab.json", "xen", "hosts", "storage", VM_NAME)  # workdir entries `down` may remove

Log = Callable[[str], None]


@dataclass
class HostDaemon:
    """The ferryd of one lab host."""

    host: str
    config: str
    state_dir: str
    run_dir: str
    log: str
    process: LabProcess | None = None

    @property
    def socket(self) -> Path:
        return Path(self.run_dir) / "ferryd.sock"

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "process"}
        return data | {"socket": str(self.socket), "process": self._proc_json()}

    def _proc_json(self) -> dict[str, Any] | None:
        return self.process.to_json() if self.process else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostDaemon:
        proc = data.get("process")
        return cls(
            host=data["host"], config=data["config"], state_dir=data["state_dir"],
            run_dir=data["run_dir"], log=data["log"],
            process=LabProcess.from_json(proc) if proc else None,
        )  # fmt: skip


@dataclass
class Lab:
    workdir: Path
    storage: str  # nfs, nbd or dir
    rate: str | None  # tc rate of every link; None: unshaped
    memory: int  # MiB, for the lab VM's config
    disk: str  # virt_server's disk as QEMU opens it: URL, or path for dir
    scratch_disk: str  # the same for the scratch image
    daemons: dict[str, HostDaemon] = field(default_factory=dict)
    servers: list[LabProcess] = field(default_factory=list)
    ready: bool = False  # False while `up` is under way (or if it died)

    @property
    def export_dir(self) -> Path:
        return self.workdir / "xen"

    @property
    def state_file(self) -> Path:
        return self.workdir / STATE_FILE

    @property
    def domain_config(self) -> Path:
        """virt_server's xm config, written by `up`."""
        return self.workdir / VM_NAME

    # -- persistence ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "storage": self.storage, "rate": self.rate,
            "memory": self.memory, "disk": self.disk, "scratch_disk": self.scratch_disk,
            "export_dir": str(self.export_dir), "ready": self.ready,
            "domain_config": str(self.domain_config),
            "vm": {"name": VM_NAME, "address": VM_ADDRESS, "mac": VM_MAC},
            "nodes": {
                n.name: {"ns": n.ns, "address": n.address, "role": n.role,
                         "iface": n.addressed_iface}
                for n in NODES
            },
            "daemons": {name: d.to_json() for name, d in self.daemons.items()},
            "servers": [s.to_json() for s in self.servers],
        }  # fmt: skip

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, workdir: Path = DEFAULT_WORKDIR) -> Lab:
        path = workdir / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(
                workdir=Path(data["workdir"]), storage=data["storage"], rate=data["rate"],
                memory=int(data["memory"]), disk=data["disk"], scratch_disk=data["scratch_disk"],
                daemons={k: HostDaemon.from_json(v) for k, v in data["daemons"].items()},
                servers=[LabProcess.from_json(s) for s in data["servers"]],
                ready=bool(data.get("ready")),
            )  # fmt: skip
        except FileNotFoundError:
            raise FerryError(f"no lab in {workdir}: run `ferry lab up`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FerryError(f"lab state {path} is unreadable: {err}") from err

    # -- using the lab -------------------------------------------------------------

    def socket(self, host: str) -> Path:
        """The control socket of ``host``'s ferryd."""
        return self.daemons[topology.node(host).name].socket

    def exec_env(self, node: str) -> dict[str, str]:
        """The environment of a command run in ``node``: the venv first on PATH, and
        FERRY_SOCKET set to the node's own ferryd on a host."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env["FERRY_LAB_WORKDIR"] = str(self.workdir)
        name = topology.node(node).name
        if name in self.daemons:
            env["FERRY_SOCKET"] = str(self.daemons[name].socket)
        else:
            env.pop("FERRY_SOCKET", None)
        return env

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        return topology.exec_argv(node, list(argv))

    def run(
        self, node: str, argv: Sequence[str], timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``node`` with output captured (for tests and the demo)."""
        return subprocess.run(
            self.exec_argv(node, argv), env=self.exec_env(node), capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in ``node`` in the background (kwargs go to Popen)."""
        return subprocess.Popen(
            self.exec_argv(node, argv), env=self.exec_env(node), text=True, **kwargs
        )

    def exec(self, node: str, argv: Sequence[str]) -> int:
        """Run ``argv`` in ``node`` on this terminal; its exit status (128+N for signal N)."""
        if not argv:
            raise FerryError(f"lab exec {node}: no command given")
        proc = subprocess.Popen(self.exec_argv(node, argv), env=self.exec_env(node))
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                continue  # the command got the same Ctrl-C; its exit decides
        return 128 - code if code < 0 else code

    def domain_config_text(self, name: str = VM_NAME, memory: int | None = None) -> str:
        """The lab VM's config in the classic xm format, with the lab's disk and address."""
        disk = StorageSpec(self.storage, self.export_dir).disk(name)
        if self.storage == "dir":
            disk = f"tap:aio:{disk}"  # as the classic config named its file on NFS
        mem = memory or self.memory
        return f"""\
# Like the classic /etc/xen/virt_server, on the lab's {self.storage} storage.
name = "{name}"
uuid = "6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c"
maxmem = {mem}
memory = {mem}
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

    def status(self) -> dict[str, Any]:
        """What is up now, checked live (namespaces, processes, daemons answering)."""
        data = self.to_json()
        for name, node in data["nodes"].items():
            node["present"] = netns.exists(node["ns"])
            if name in self.daemons:
                proc = self.daemons[name].process
                node["ferryd"] = bool(proc and proc.is_running())
        for server in data["servers"]:
            server["running"] = LabProcess.from_json(server).is_running()
        data["healthy"] = bool(
            data["ready"]
            and all(n["present"] for n in data["nodes"].values())
            and all(n.get("ferryd", True) for n in data["nodes"].values())
            and all(s["running"] for s in data["servers"])
        )
        return data


# -- up and down -------------------------------------------------------------------


def host_config_text(host: str, state_dir: Path, run_dir: Path, export_dir: Path) -> str:
    allow = ", ".join(f"'{p}'" for p in HOSTS_ALLOW)  # TOML literal strings: no escapes
    return f"""\
name = "{host}"
accel = "tcg"
state_dir = "{state_dir}"
run_dir = "{run_dir}"
storage_roots = ["{export_dir}"]

[relocation]
enabled = true
port = {RELOCATION_PORT}
address = ""
hosts_allow = [{allow}]
"""


def up(
    storage_kind: str = "nfs",
    rate: str | None = topology.DEFAULT_RATE,
    workdir: Path = DEFAULT_WORKDIR,
    memory: int = DEFAULT_MEMORY,
    log: Log = print,
) -> Lab:
    """Bring the lab up, after removing whatever a previous lab left behind."""
    storage.check_kind(storage_kind)
    rate = topology.parse_rate(rate) if rate is not None else None
    workdir = workdir.absolute()
    for line in down(workdir, log=lambda _line: None):
        log(f"cleaned up a previous lab: {line}")
    spec = StorageSpec(storage_kind, workdir / "xen")
    lab = Lab(
        workdir=workdir, storage=storage_kind, rate=rate, memory=memory,
        disk=spec.disk(VM_NAME), scratch_disk=spec.disk(SCRATCH),
    )  # fmt: skip
    try:
        lab.export_dir.mkdir(parents=True)
        lab.save()
        topology.build(rate)
        log(f"network: {len(NODES)} nodes on {topology.LAN_BRIDGE}, links at {rate or 'full'}")
        _make_disks(lab, log)
        lab.domain_config.write_text(lab.domain_config_text())
        lab.servers = storage.start(spec, [VM_NAME, SCRATCH], workdir / "storage")
        lab.save()
        log(f"storage: {storage_kind}, virt_server's disk {lab.disk}")
        for host in HOSTS:
            _start_ferryd(lab, host.name)
            log(f"{host.name}: ferryd answering on {lab.daemons[host.name].socket}")
        lab.ready = True
        lab.save()
    except BaseException:
        for line in down(workdir, log=lambda _line: None):
            log(f"undone: {line}")
        raise
    return lab


def _make_disks(lab: Lab, log: Log) -> None:
    try:
        image = load_image()
    except ImageError:
        image = build_image(log=log)
    make_domain_disk(image, lab.export_dir / f"{VM_NAME}.img")
    with (lab.export_dir / f"{SCRATCH}.img").open("xb") as scratch:
        scratch.truncate(SCRATCH_SIZE)


def restart_ferryd(lab: Lab, host: str, config_text: str | None = None) -> None:
    """Stop a host's ferryd (its domains keep running) and start it again,
    with a new host config if one is given."""
    daemon = lab.daemons[host]
    if daemon.process is not None:
        daemon.process.stop(timeout=20)
    _start_ferryd(lab, host, config_text)


def _start_ferryd(lab: Lab, host: str, config_text: str | None = None) -> None:
    base = lab.workdir / "hosts" / host
    base.mkdir(parents=True, exist_ok=True)
    state_dir, run_dir = base / "state", RUN_ROOT / host
    config = base / "ferryd.toml"
    config.write_text(config_text or host_config_text(host, state_dir, run_dir, lab.export_dir))
    daemon = HostDaemon(host, str(config), str(state_dir), str(run_dir), str(base / "ferryd.log"))
    ferryd = FerrydProcess(
        name=host, state_dir=state_dir, run_dir=run_dir, log=Path(daemon.log),
        ns=topology.node(host).ns, config=config,
    )  # fmt: skip
    lab.daemons[host] = daemon
    try:
        ferryd.start()
    finally:
        if ferryd.proc is not None:
            # Recorded even if it never answered, so that `down` ends it.
            daemon.process = LabProcess.started(
                f"ferryd-{host}", ferryd.proc, str(config), Path(daemon.log)
            )
        lab.save()


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
            removed += _stop_host(daemon)
        removed += [f"stopped {name}" for name in storage.stop(lab.servers)]
    removed += [f"killed leftover {what}" for what in _kill_namespace_processes()]
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


def _stop_host(daemon: HostDaemon) -> list[str]:
    """Destroy the host's domains through its ferryd, then end the ferryd."""
    done: list[str] = []
    if daemon.process is None or not daemon.process.is_running():
        return done
    ferryd = FerrydProcess(
        name=daemon.host, state_dir=Path(daemon.state_dir), run_dir=Path(daemon.run_dir),
        log=Path(daemon.log),
    )  # fmt: skip
    # OSError: a ferryd dying right now resets the connection (DaemonClient lets it through).
    with contextlib.suppress(FerryError, OSError):
        client = ferryd.client(timeout=30)
        for row in client.call("list"):
            with contextlib.suppress(FerryError, OSError):
                client.call("destroy", name=row["name"])
                done.append(f"destroyed {row['name']} on {daemon.host}")
    if daemon.process.stop(timeout=20):
        done.append(f"stopped ferryd of {daemon.host}")
    return done


def _lab_netns_ids() -> set[tuple[int, int]]:
    ids = set()
    for name in [*netns.list_names(topology.NS_PREFIX), topology.LAN_NS]:
        with contextlib.suppress(OSError):
            info = os.stat(f"/run/netns/{name}")
            ids.add((info.st_dev, info.st_ino))
    return ids


def _kill_namespace_processes(timeout: float = 10.0) -> list[str]:
    """End every process inside a lab namespace (QEMUs of a crashed ferryd, servers).

    Being inside the lab's own namespace is the proof that the lab (or a
    command run with ``lab exec``) started it; nothing else is touched.
    """
    ids = _lab_netns_ids()
    if not ids:
        return []
    victims: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            info = os.stat(entry / "ns" / "net")
            if (info.st_dev, info.st_ino) in ids and process.is_alive(int(entry.name)):
                victims[int(entry.name)] = (entry / "comm").read_text().strip()
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in victims:
        while process.is_alive(pid) and time.monotonic() < deadline:
            process.reap(pid)
            time.sleep(0.05)
        if process.is_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.reap(pid)
    return [f"{comm} (pid {pid})" for pid, comm in sorted(victims.items())]


def load(workdir: Path = DEFAULT_WORKDIR) -> Lab:
    return Lab.load(workdir)
