"""Which clients may use the server: allowed and denied networks."""

from __future__ import annotations

import ipaddress

from .config import Config, Network


def parse_network(value: str) -> Network:
    """A network in CIDR notation (a bare address is a /32 or /128); ValueError if not."""
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as err:
        raise ValueError(f"not a network in CIDR notation: {value}") from err


def client_allowed(config: Config, host: str) -> bool:
    """Denied networks win; a non-empty allow list admits only its networks."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in config.deny):
        return False
    return not config.allow or any(addr in net for net in config.allow)
