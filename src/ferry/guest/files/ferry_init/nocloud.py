"""The NoCloud seed (a drive labelled CIDATA): the guest's host name and static address.

ferry writes the seed's files as JSON (which YAML readers take too); a seed
written by another tool in block YAML is still read for its host name.
Standard library only, like the rest of the guest side.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

from .console import say
from .system import ENV

LABEL = b"CIDATA"
# Where a FAT boot sector keeps its volume label: FAT12/16, then FAT32.
LABEL_OFFSETS = (0x2B, 0x47)


def find_seed(block_dir: str = "/sys/class/block", dev_dir: str = "/dev") -> str | None:
    for name in sorted(os.listdir(block_dir)) if os.path.isdir(block_dir) else []:
        path = os.path.join(dev_dir, name)
        try:
            with open(path, "rb") as f:
                sector = f.read(512)
        except OSError:
            continue
        if any(sector[o : o + 11].rstrip(b" ").upper() == LABEL for o in LABEL_OFFSETS):
            return path
    return None


def read_seed(device: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="cidata-") as mnt:
        proc = subprocess.run(
            ["mount", "-t", "vfat", "-o", "ro,iocharset=utf8", device, mnt],
            capture_output=True, text=True, env=ENV, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            say(f"warning: cannot mount the cloud-init seed {device}: {proc.stderr.strip()}")
            return files
        try:
            for name in ("meta-data", "network-config"):
                try:
                    with open(os.path.join(mnt, name), "rb") as f:
                        files[name] = f.read()
                except OSError:
                    pass
        finally:
            subprocess.run(["umount", mnt], capture_output=True, env=ENV, check=False)
    return files


def parse_document(data: bytes) -> dict[str, Any]:
    """JSON, else flat ``key: value`` lines (the common shape of meta-data)."""
    text = data.decode(errors="replace")
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except ValueError:
        pass
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not line.startswith((" ", "\t", "#")):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def static_address(network: dict[str, Any]) -> tuple[str, int, str, str | None] | None:
    """(address, prefix, gateway, MAC) of the first interface with a static IPv4 address."""
    ethernets = network.get("ethernets")
    if network.get("version") != 2 or not isinstance(ethernets, dict):
        return None
    for eth in ethernets.values():
        if not isinstance(eth, dict):
            continue
        for cidr in eth.get("addresses", []):
            address, _, prefix = str(cidr).partition("/")
            if "." not in address:
                continue
            gateway = ""
            for route in eth.get("routes", []):
                if isinstance(route, dict) and route.get("to") in ("default", "0.0.0.0/0"):
                    gateway = str(route.get("via", ""))
            mac = (eth.get("match") or {}).get("macaddress")
            return address, int(prefix or 24), gateway, str(mac).lower() if mac else None
    return None


def device_with_mac(mac: str | None, net_dir: str = "/sys/class/net") -> str:
    if mac is not None and os.path.isdir(net_dir):
        for name in sorted(os.listdir(net_dir)):
            try:
                with open(os.path.join(net_dir, name, "address")) as f:
                    if f.read().strip().lower() == mac:
                        return name
            except OSError:
                continue
    return "eth0"
