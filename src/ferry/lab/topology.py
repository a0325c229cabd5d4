"""The classic two-host LAN as network namespaces: nodes, addresses, links, shaping, names.

::

                       ferry-lan (bridge lan0, no address)
        +--------------+-----------+-----------+-----------+
    xen_host_1     xen_host_2   client_1    client_2    storage
    xenbr0 .1      xenbr0 .2    eth0 .11    eth0 .12    eth0 .20
     `- eth0        `- eth0

Every node is a namespace ``ferrylab-<name>`` joined to ``lan0`` by a veth
pair (``eth0`` in the node). Hosts carry their address on ``xenbr0``, with
``eth0`` enslaved to it, as Xen's network-bridge script left a host, so the
VM taps that ferryd adds to ``xenbr0`` sit on the LAN. Each link is shaped on
both of its ends, so both directions run at the lab's rate.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import NetworkError
from ferry.lab import netns

NS_PREFIX = "ferrylab-"
LAN_NS = "ferry-lan"
LAN_BRIDGE = "lan0"
HOST_BRIDGE = "xenbr0"
PREFIXLEN = 24
VM_NAME = "virt_server"
VM_ADDRESS = "10.42.0.100"
VM_MAC = "00:16:3e:4a:21:07"
NETNS_ETC = Path("/etc/netns")
DEFAULT_RATE = "100mbit"
# What `ferry lab up` offers; here, so that building the parser imports nothing heavy.
# local: each host has a disk directory of its own at the same path (no
# shared storage: what `ferry migrate --copy-storage` is for).
STORAGE_KINDS = ("nfs", "nbd", "dir", "local")
BOOTS = ("kernel", "disk", "uefi")
DEFAULT_MEMORY = 256  # MiB of the lab VM
DEFAULT_WORKDIR = Path(os.environ.get("FERRY_LAB_WORKDIR") or "/var/lib/ferry-lab")


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    role: str  # "host", "client" or "storage"

    @property
    def ns(self) -> str:
        return NS_PREFIX + self.name

    @property
    def lan_port(self) -> str:
        # The LAN-side end of the veth; interface names stop at 15 characters.
        return f"p-{self.name}"[:15]

    @property
    def addressed_iface(self) -> str:
        return HOST_BRIDGE if self.role == "host" else "eth0"


NODES: tuple[Node, ...] = (
    Node("xen_host_1", "10.42.0.1", "host"),
    Node("xen_host_2", "10.42.0.2", "host"),
    Node("client_1", "10.42.0.11", "client"),
    Node("client_2", "10.42.0.12", "client"),
    Node("storage", "10.42.0.20", "storage"),
)
HOSTS = tuple(n for n in NODES if n.role == "host")
STORAGE = next(n for n in NODES if n.role == "storage")


def node(name: str) -> Node:
    """The node called ``name`` (its lab name, or its namespace name)."""
    for candidate in NODES:
        if name in (candidate.name, candidate.ns):
            return candidate
    known = ", ".join(n.name for n in NODES)
    raise NetworkError(f"no lab node named {name!r} (nodes: {known})")


_RATE = re.compile(r"[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)", re.IGNORECASE)


def parse_rate(text: str) -> str | None:
    """A tc rate (``100mbit``, ``1gbit``), or None for ``none`` (links left unshaped)."""
    if text.lower() in ("none", "off", "0"):
        return None
    if not _RATE.fullmatch(text):
        raise NetworkError(f"link rate {text!r} is not a tc rate such as 100mbit or 1gbit, or none")
    return text.lower()


def hosts_text() -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{n.address}\t{n.name}" for n in NODES]
    lines.append(f"{VM_ADDRESS}\t{VM_NAME}")
    return "\n".join(lines) + "\n"


def build(rate: str | None) -> None:
    """Create the LAN and every node; ``rate`` None leaves links unshaped."""
    netns.create(LAN_NS)
    netns.add_bridge(LAN_NS, LAN_BRIDGE)
    for n in NODES:
        write_hosts_file(n.ns)  # before any process starts in the namespace
        netns.create(n.ns)
        netns.add_veth(n.ns, "eth0", LAN_NS, n.lan_port)
        netns.set_master(LAN_NS, n.lan_port, LAN_BRIDGE)
        if n.role == "host":
            netns.add_bridge(n.ns, HOST_BRIDGE)
            netns.set_master(n.ns, "eth0", HOST_BRIDGE)
            netns.pin_bridge_mac(n.ns, HOST_BRIDGE, "eth0")
        netns.add_address(n.ns, n.addressed_iface, f"{n.address}/{PREFIXLEN}")
        if rate is not None:
            shape(n.ns, "eth0", rate)
            shape(LAN_NS, n.lan_port, rate)


def write_hosts_file(ns_name: str) -> None:
    # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts.
    directory = NETNS_ETC / ns_name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts").write_text(hosts_text())


def shape(ns_name: str, dev: str, rate: str) -> None:
    """Limit ``dev``'s egress to ``rate`` with a token bucket.

    The bucket holds 1 ms at the rate (and never less than one 64 KiB GSO
    packet, which veths pass whole), which lets a single TCP flow reach the
    full rate; a 20 ms queue bounds the added latency as a 100 Mbit switch
    port would.
    """
    argv = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
            "burst", _burst(rate), "latency", "20ms"]  # fmt: skip
    result = netns.run(ns_name, argv, timeout=10)
    if result.returncode != 0:
        raise NetworkError(
            f"cannot shape {dev} in {ns_name} to {rate}: {result.stderr.strip() or 'tc failed'}"
        )


def _burst(rate: str) -> str:
    match = re.fullmatch(r"([0-9.]+)([kmg]?)(bit|bps)", rate)
    if match is None:
        return "128kb"
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
    bytes_per_s = float(match.group(1)) * scale / (8 if match.group(3) == "bit" else 1)
    return f"{max(128 * 1024, int(bytes_per_s / 1000))}b"


def qdisc(ns_name: str, dev: str) -> str:
    """``tc qdisc show`` of ``dev`` (for status and tests)."""
    return netns.run(ns_name, ["tc", "qdisc", "show", "dev", dev], timeout=10).stdout.strip()


def leftovers() -> list[str]:
    """Lab namespaces and /etc/netns entries present on this machine."""
    found = netns.list_names(NS_PREFIX) + [n for n in netns.list_names(LAN_NS) if n == LAN_NS]
    if NETNS_ETC.is_dir():
        found += [str(p) for p in sorted(NETNS_ETC.glob(NS_PREFIX + "*"))]
    return found


def teardown() -> list[str]:
    """Remove every lab namespace (which ends their links) and /etc/netns entry."""
    removed: list[str] = []
    for name in [*netns.list_names(NS_PREFIX), LAN_NS]:
        if netns.exists(name):
            netns.remove(name)
            removed.append(name)
    if NETNS_ETC.is_dir():
        for directory in sorted(NETNS_ETC.glob(NS_PREFIX + "*")):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(str(directory))
    return removed


def exec_argv(name: str, argv: list[str]) -> list[str]:
    """``argv`` run inside lab node ``name`` (with the lab's /etc/hosts)."""
    return netns.popen_argv(node(name).ns, argv)


def resolve(ns_name: str, hostname: str) -> str | None:
    """The address ``hostname`` resolves to inside ``ns_name``, or None."""
    try:
        result = netns.run(ns_name, ["getent", "hosts", hostname], timeout=10)
    except subprocess.TimeoutExpired:
        return None
    fields = result.stdout.split()
    return fields[0] if result.returncode == 0 and fields else None


# -- throughput check ------------------------------------------------------------

THROUGHPUT_PORT = 5201


def measure_throughput(src: str, dst: str, seconds: float = 3.0) -> float:
    """Bits per second of one TCP flow from lab node ``src`` to lab node ``dst``.

    The first half second is left out of the figure: it is TCP's slow start,
    not the link.
    """
    import sys

    target = node(dst)
    sink_argv = [sys.executable, "-m", "ferry.lab.topology", "sink", target.address,
                 str(THROUGHPUT_PORT), str(seconds)]  # fmt: skip
    sink = subprocess.Popen(
        netns.popen_argv(target.ns, sink_argv), stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "listening":
            raise NetworkError(f"throughput sink in {dst} did not start")
        source_argv = [sys.executable, "-m", "ferry.lab.topology", "source", target.address,
                       str(THROUGHPUT_PORT), str(seconds + 2)]  # fmt: skip
        netns.run(node(src).ns, source_argv, timeout=seconds + 30)
        out, _ = sink.communicate(timeout=seconds + 30)
    finally:
        if sink.poll() is None:
            sink.kill()
        sink.wait()
    try:
        return float(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise NetworkError(f"throughput check {src} -> {dst} gave no figure: {out!r}") from None


def _sink(address: str, port: int, seconds: float) -> None:
    import socket
    import time

    with socket.create_server((address, port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(seconds + 10)
            buf = bytearray(1 << 20)
            first = conn.recv_into(buf)
            start = time.monotonic()
            counted = 0
            mark = start + 0.5
            while (now := time.monotonic()) < start + 0.5 + seconds:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                if now >= mark:
                    counted += n
            elapsed = time.monotonic() - mark
    del first
    print(f"{counted * 8 / elapsed:.0f}", flush=True)


def _source(address: str, port: int, seconds: float) -> None:
    import socket
    import time

    data = b"\0" * (1 << 16)
    deadline = time.monotonic() + seconds
    with socket.create_connection((address, port), timeout=10) as conn:
        try:
            while time.monotonic() < deadline:
                conn.sendall(data)
        except OSError:
            pass  # the sink hangs up once it has measured enough


if __name__ == "__main__":
    import sys

    _role, _addr, _port, _secs = sys.argv[1:5]
    (_sink if _role == "sink" else _source)(_addr, int(_port), float(_secs))
