"""Network namespaces as lab hosts: create, wire, run commands inside, remove."""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
from collections.abc import Sequence

from ferry.errors import NetworkError

# pyroute2 takes 0.15 s to import, and every `ferry` command builds the lab's
# parser: it is imported by the functions that use it, not with this module.


def exists(name: str) -> bool:
    from pyroute2 import netns

    return name in netns.listnetns()


def create(name: str) -> None:
    """A fresh namespace with loopback up; an existing one of that name is replaced."""
    from pyroute2 import NetNS, netns

    if exists(name):
        remove(name)
    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> None:
    from pyroute2 import netns

    if exists(name):
        netns.remove(name)


def add_bridge(ns_name: str, bridge: str, address: str | None = None) -> None:
    """A bridge inside ``ns_name``, up, with ``address`` (CIDR) if given."""
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    with NetNS(ns_name) as ns:
        try:
            ns.link("add", ifname=bridge, kind="bridge", br_forward_delay=0)
        except NetlinkError as err:
            raise NetworkError(f"cannot create bridge {bridge} in {ns_name}: {err}") from err
        index = ns.link_lookup(ifname=bridge)[0]
        ns.link("set", index=index, state="up")
        if address:
            iface = ipaddress.IPv4Interface(address)
            ns.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def pin_bridge_mac(ns_name: str, bridge: str, uplink: str) -> None:
    """Give ``bridge`` its uplink's MAC for good, as Xen's network-bridge script did.

    Left alone, a bridge takes the lowest MAC among its ports and changes it as
    VM taps come and go; the host would then vanish from its peers' ARP caches.
    """
    from pyroute2 import NetNS

    with NetNS(ns_name) as ns:
        link = ns.get_links(ns.link_lookup(ifname=uplink)[0])[0]
        mac = link.get_attr("IFLA_ADDRESS")
        ns.link("set", index=ns.link_lookup(ifname=bridge)[0], address=mac)


def run(
    ns_name: str, argv: Sequence[str], timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns_name, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def popen_argv(ns_name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns_name, *argv]


def ping(ns_name: str, address: str, timeout: float = 1.0) -> bool:
    """One ICMP echo from inside ``ns_name``; True if it was answered."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        result = run(ns_name, ["ping", "-c", "1", "-W", f"{timeout:g}", address], timeout + 5)
        return result.returncode == 0
    return False


def add_veth(ns_name: str, ifname: str, peer_ns: str, peer_ifname: str) -> None:
    """A veth pair, ``ifname`` in ``ns_name`` and ``peer_ifname`` in ``peer_ns``, both up."""
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    with NetNS(ns_name) as ns:
        try:
            ns.link("add", ifname=ifname, kind="veth", peer=peer_ifname)
            ns.link("set", index=ns.link_lookup(ifname=peer_ifname)[0], net_ns_fd=peer_ns)
        except NetlinkError as err:
            raise NetworkError(
                f"cannot create veth {ifname} ({ns_name}) <-> {peer_ifname} ({peer_ns}): {err}"
            ) from err
        ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
    with NetNS(peer_ns) as ns:
        ns.link("set", index=ns.link_lookup(ifname=peer_ifname)[0], state="up")


def set_master(ns_name: str, ifname: str, bridge: str) -> None:
    """Enslave ``ifname`` to ``bridge``, both inside ``ns_name``."""
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    with NetNS(ns_name) as ns:
        try:
            master = ns.link_lookup(ifname=bridge)[0]
            ns.link("set", index=ns.link_lookup(ifname=ifname)[0], master=master)
        except (IndexError, NetlinkError) as err:
            raise NetworkError(
                f"cannot add {ifname} to bridge {bridge} in {ns_name}: {err}"
            ) from err


def add_address(ns_name: str, ifname: str, address: str) -> None:
    """Put ``address`` (CIDR) on ``ifname`` inside ``ns_name``."""
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    iface = ipaddress.IPv4Interface(address)
    with NetNS(ns_name) as ns:
        try:
            index = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except (IndexError, NetlinkError) as err:
            raise NetworkError(f"cannot put {address} on {ifname} in {ns_name}: {err}") from err


def list_names(prefix: str) -> list[str]:
    """The namespaces whose names start with ``prefix``."""
    from pyroute2 import netns

    return sorted(name for name in netns.listnetns() if name.startswith(prefix))
