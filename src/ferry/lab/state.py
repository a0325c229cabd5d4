"""What a lab is made of, kept in ``<workdir>/lab.json``, and how to run commands in its nodes.

The record is saved as ``up`` goes, so that ``down`` (also after a crash
half-way through ``up``) finds everything again; ``status`` checks it live.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.lab import netns, topology
from ferry.lab.configs import vm_config_text
from ferry.lab.storage import LabProcess
from ferry.lab.topology import DEFAULT_WORKDIR, NODES, VM_ADDRESS, VM_MAC, VM_NAME

STATE_FILE = "lab.json"


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
    storage: str  # nfs, nbd, dir or local
    rate: str | None  # tc rate of every link; None: unshaped
    memory: int  # MiB, for the lab VM's config
    disk: str  # virt_server's disk as QEMU opens it: URL, or path for dir
    scratch_disk: str  # the same for the scratch image
    # "kernel": ferry boots its own kernel; "disk": the disk's own bootloader
    # does, as pygrub did for the classic guest.
    boot: str = "kernel"
    daemons: dict[str, HostDaemon] = field(default_factory=dict)
    servers: list[LabProcess] = field(default_factory=list)
    ready: bool = False  # False while `up` is under way (or if it died)

    @property
    def export_dir(self) -> Path:
        return self.workdir / "xen"

    def local_dir(self, host: str) -> Path:
        """``local`` storage: what ``host`` sees at export_dir (its own disks)."""
        return self.workdir / "local" / host

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
            "boot": self.boot, "export_dir": str(self.export_dir), "ready": self.ready,
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
                boot=str(data.get("boot", "kernel")),
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
        """The environment of a command run in ``node``: the venv first on PATH,
        FERRY_SOCKET set to the node's own ferryd on a host, and FERRY_PKI to the
        node's credentials on a client (the station's admin, the viewer's)."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env["FERRY_LAB_WORKDIR"] = str(self.workdir)
        name = topology.node(node).name
        env.pop("FERRY_SOCKET", None)
        env.pop("FERRY_PKI", None)
        if name in self.daemons:
            env["FERRY_SOCKET"] = str(self.daemons[name].socket)
        elif (self.workdir / "pki" / name / "cert.pem").exists():
            env["FERRY_PKI"] = str(self.workdir / "pki" / name)
        return env

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        return topology.exec_argv(node, list(argv))

    def vm_serving(self, node: str = "client_2") -> bool:
        """The VM's services answer from ``node``: its witness, and its media server
        accepts connections (it may come up after the witness; a player that
        connects first is refused)."""
        witness = ["python3", "-m", "ferry.lab.witness", "status", VM_NAME]
        media = [
            "python3",
            "-c",
            f"import socket; socket.create_connection(('{VM_NAME}', 8888), 5)",
        ]
        return all(self.run(node, argv, timeout=30).returncode == 0 for argv in (witness, media))

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
        return vm_config_text(self.storage, self.export_dir, name, memory or self.memory, self.boot)

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
