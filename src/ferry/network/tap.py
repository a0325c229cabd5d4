"""Tap devices for VIFs, attached to the bridge each VIF names (netlink only)."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ferry.errors import NetworkError

TAP_MAC = "fe:ff:ff:ff:ff:ff"


def tap_name(domid: int, index: int) -> str:
    """Xen's naming, vif<domid>.<n>: an operator finds a domain's ports at a glance."""
    return f"vif{domid}.{index}"


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else str(info.get_attr("IFLA_INFO_KIND"))


def bridge_index(ipr: IPRoute, bridge: str) -> int:
    found = ipr.link_lookup(ifname=bridge)
    if not found:
        raise NetworkError(f"bridge '{bridge}' does not exist on this host")
    if _link_kind(ipr, found[0]) != "bridge":
        raise NetworkError(f"'{bridge}' exists on this host but is not a bridge")
    return int(found[0])


def check_bridges(bridges: list[str]) -> None:
    """Raise NetworkError for the first bridge that is missing; changes nothing."""
    with IPRoute() as ipr:
        for bridge in bridges:
            bridge_index(ipr, bridge)


def create_tap(name: str, bridge: str) -> None:
    with IPRoute() as ipr:
        master = bridge_index(ipr, bridge)
        if ipr.link_lookup(ifname=name):
            # Left behind by a domain whose QEMU died while ferryd was down.
            ipr.link("del", ifname=name)
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index = ipr.link_lookup(ifname=name)[0]
            # Xen's vif scripts did the same: a bridge takes the lowest MAC of
            # its ports, so a random tap MAC could become the host's own, and
            # change again when the domain leaves, cutting the host off from
            # its peers' ARP caches.
            ipr.link("set", index=index, address=TAP_MAC)
            ipr.link("set", index=index, master=master, state="up")
        except (NetlinkError, OSError, IndexError) as err:
            delete_tap(name)
            raise NetworkError(f"cannot create tap '{name}' on bridge '{bridge}': {err}") from err


def delete_tap(name: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as err:
                if err.code != 19:  # ENODEV: gone already
                    raise NetworkError(f"cannot delete tap '{name}': {err}") from err


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))
