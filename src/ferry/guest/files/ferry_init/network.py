"""Hostname and static IPv4 from the kernel command line (``ip=``, ``ferry.hostname=``)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from typing import NamedTuple

from . import nocloud
from .console import say
from .system import ENV

DEVICE_WAIT = 5.0
# The ip= client values that ask for autoconfiguration (or none), never a static address.
NOT_STATIC = ("off", "none", "dhcp", "on", "any", "bootp", "rarp", "both")


class IpConfig(NamedTuple):
    address: str
    prefix: int
    gateway: str
    hostname: str
    device: str


def parse_cmdline(text: str) -> dict[str, str]:
    """key -> value of each word of a kernel command line; a bare word maps to ""."""
    params = {}
    for word in text.split():
        key, _, value = word.partition("=")
        params[key] = value
    return params


def kernel_params() -> dict[str, str]:
    try:
        with open("/proc/cmdline") as f:
            return parse_cmdline(f.read())
    except OSError:
        return {}


def parse_ip(value: str) -> IpConfig | None:
    """The static configuration of the classic ip= form, or None if it asks for none.

    Raises ValueError for a netmask that is not a dotted IPv4 address.
    """
    fields = (value.split(":") + [""] * 7)[:7]
    client, _server, gateway, netmask, hostname, device, _autoconf = fields
    if not client or client in NOT_STATIC:
        return None
    prefix = 24
    if netmask:
        try:
            packed = struct.unpack("!I", socket.inet_aton(netmask))[0]
        except OSError as err:
            raise ValueError(f"ip={value}: netmask {netmask!r} is not an IPv4 address") from err
        prefix = bin(packed).count("1")
    return IpConfig(client, prefix, gateway, hostname, device or "eth0")


def set_hostname(name: str) -> None:
    try:
        socket.sethostname(name)
    except OSError as err:
        say(f"warning: cannot set hostname {name}: {err.strerror}")


def write_config(path: str, text: str) -> None:
    # Write-then-rename: a crash never leaves a half-written file behind.
    tmp = f"{path}.ferry-new"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        say(f"warning: cannot write {path}: {err.strerror}")


def hosts_text(hostname: str, address: str | None) -> str:
    """/etc/hosts: localhost, and the hostname on its static address or on 127.0.1.1."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{address}\t{hostname}" if address else f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


def write_host_files(hostname: str, address: str | None) -> None:
    write_config("/etc/hostname", f"{hostname}\n")
    write_config("/etc/hosts", hosts_text(hostname, address))


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def seed_config() -> tuple[IpConfig | None, str | None]:
    """The static address and host name of a NoCloud seed drive, if there is one."""
    device = nocloud.find_seed()
    if device is None:
        return None, None
    files = nocloud.read_seed(device)
    meta = nocloud.parse_document(files.get("meta-data", b""))
    hostname = meta.get("local-hostname")
    hostname = str(hostname) if hostname else None
    found = nocloud.static_address(nocloud.parse_document(files.get("network-config", b"")))
    say(f"cloud-init seed {device}: host name {hostname or '-'}, address {found and found[0]}")
    if found is None:
        return None, hostname
    address, prefix, gateway, mac = found
    device = nocloud.device_with_mac(mac)
    return IpConfig(address, prefix, gateway, hostname or "", device), hostname


def setup_network(params: dict[str, str]) -> None:
    try:
        ip("link", "set", "lo", "up")
    except (OSError, RuntimeError) as err:
        say(f"warning: loopback: {err}")
    conf = None
    try:
        conf = parse_ip(params["ip"]) if "ip" in params else None
    except ValueError as err:
        say(f"network failed: {err}")
    seed_hostname = None
    if "ip" not in params:
        # No address on the command line: a cloud-init seed may give one.
        conf, seed_hostname = seed_config()
    hostname = (conf.hostname if conf else "") or params.get("ferry.hostname") or seed_hostname
    if hostname:
        set_hostname(hostname)
        write_host_files(hostname, conf.address if conf else None)
    if conf is None:
        return
    deadline = time.monotonic() + DEVICE_WAIT
    while not os.path.exists(f"/sys/class/net/{conf.device}") and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        ip("addr", "add", f"{conf.address}/{conf.prefix}", "dev", conf.device)
        ip("link", "set", conf.device, "up")
        if conf.gateway:
            ip("route", "add", "default", "via", conf.gateway, "dev", conf.device)
    except (OSError, RuntimeError) as err:
        say(f"network failed on {conf.device}: {err}")
        return
    say(f"network up {conf.address} on {conf.device}")
