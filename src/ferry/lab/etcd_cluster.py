"""The lab's etcd: three members, one in each host's namespace and one on the storage node.

With three members, one host cut from the LAN is a minority: it loses its
lease (and fences its VMs) while the other two keep the quorum. Clients and
peers speak TLS with certificates of the lab's CA (``etcd-<node>`` bundles,
naming the node's LAN address). Data under ``<workdir>/etcd/<node>``.

etcd's own authorization is on: with ``--client-cert-auth`` etcd takes a
client certificate's CN for its user, and only the hosts' users have the
``ferry-host`` role, which may read and write ``/ferry/``. Any other
certificate of the CA (an operator's) is refused by etcd itself. The ``root``
user (a viewer's certificate named ``etcd-root``, kept beside the CA) only
sets this up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ferry.errors import FerryError
from ferry.lab import netns, topology
from ferry.lab.pki import bundle_dir
from ferry.lab.storage import LabProcess, spawn
from ferry.pki.ca import CertificateAuthority
from ferry.pki.identity import Role
from ferry.util.wait import wait_until_sync

MEMBERS = ("xen_host_1", "xen_host_2", "storage")
CLIENT_PORT = 2379
PEER_PORT = 2380
READY_TIMEOUT = 60.0
LEASE_TTL = 6


def client_urls() -> list[str]:
    return [f"https://{topology.node(m).address}:{CLIENT_PORT}" for m in MEMBERS]


def _member_name(node: str) -> str:
    return node.replace("_", "-")


def _bundle(workdir: Path, node: str) -> Path:
    out = bundle_dir(workdir, f"etcd-{node}")
    if not (out / "cert.pem").exists():
        ca = CertificateAuthority.open(workdir / "pki" / "ca")
        ca.issue(f"etcd-{node}", Role.HOST, (), (topology.node(node).address,), out=out)
    return out


ROLE = "ferry-host"


def auth_commands(hosts: Sequence[str]) -> list[list[str]]:
    """The etcdctl commands (after its connection flags) that turn authorization on:
    each host a user of its certificate's CN with the one role on /ferry/."""
    commands = [
        ["user", "add", "root", "--no-password"],
        ["user", "grant-role", "root", "root"],
        ["role", "add", ROLE],
        ["role", "grant-permission", ROLE, "--prefix=true", "readwrite", "/ferry/"],
    ]
    for host in hosts:
        commands += [["user", "add", host, "--no-password"], ["user", "grant-role", host, ROLE]]
    return [*commands, ["auth", "enable"]]


def etcdctl_argv(endpoint: str, bundle: Path, command: Sequence[str]) -> list[str]:
    return [
        "etcdctl", "--endpoints", endpoint, "--cacert", str(bundle / "ca.pem"),
        "--cert", str(bundle / "cert.pem"), "--key", str(bundle / "key.pem"), *command,
    ]  # fmt: skip


def root_bundle(workdir: Path) -> Path:
    out = bundle_dir(workdir, "etcd-root")
    if not (out / "cert.pem").exists():
        ca = CertificateAuthority.open(workdir / "pki" / "ca")
        # CN "root": etcd's root user. A viewer's role: no rights on ferry's control API.
        ca.issue("root", Role.VIEWER, out=out)
    return out


def enable_auth(workdir: Path) -> None:
    bundle = root_bundle(workdir)
    endpoint = client_urls()[-1]  # the storage node's member
    for command in auth_commands([h.name for h in topology.HOSTS]):
        result = netns.run(topology.STORAGE.ns, etcdctl_argv(endpoint, bundle, command))
        if result.returncode != 0:
            raise FerryError(f"etcdctl {' '.join(command)}: {result.stderr.strip()[-300:]}")


def start(workdir: Path, logdir: Path) -> list[LabProcess]:
    """Start the three members and wait until they serve clients (a quorum formed)."""
    logdir.mkdir(parents=True, exist_ok=True)
    peers = ",".join(
        f"{_member_name(m)}=https://{topology.node(m).address}:{PEER_PORT}" for m in MEMBERS
    )
    started: list[LabProcess] = []
    for member in MEMBERS:
        address = topology.node(member).address
        tls = _bundle(workdir, member)
        data = workdir / "etcd" / member
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        log = logdir / f"etcd-{member}.log"
        files = {k: str(tls / f"{k}.pem") for k in ("cert", "key", "ca")}
        argv = [
            "etcd", "--name", _member_name(member), "--data-dir", str(data),
            "--listen-client-urls", f"https://{address}:{CLIENT_PORT}",
            "--advertise-client-urls", f"https://{address}:{CLIENT_PORT}",
            "--listen-peer-urls", f"https://{address}:{PEER_PORT}",
            "--initial-advertise-peer-urls", f"https://{address}:{PEER_PORT}",
            "--initial-cluster", peers, "--initial-cluster-state", "new",
            "--initial-cluster-token", "ferry-lab",
            "--cert-file", files["cert"], "--key-file", files["key"],
            "--trusted-ca-file", files["ca"], "--client-cert-auth",
            "--peer-cert-file", files["cert"], "--peer-key-file", files["key"],
            "--peer-trusted-ca-file", files["ca"], "--peer-client-cert-auth",
        ]  # fmt: skip
        proc = spawn(topology.exec_argv(member, argv), log)
        started.append(LabProcess.started(f"etcd-{member}", proc, str(data), log))
    _wait_ready(started)
    enable_auth(workdir)
    return started


def _wait_ready(members: list[LabProcess]) -> None:
    def ready() -> bool:
        for member in members:
            if "ready to serve client requests" in Path(member.log).read_text(errors="replace"):
                continue
            if not member.is_running():
                raise FerryError(f"{member.name} ended at start; see {member.log}")
            return False
        return True

    wait_until_sync(ready, timeout=READY_TIMEOUT, what="the lab's etcd members to serve")
