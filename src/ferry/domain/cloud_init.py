"""A domain's ``[cloud_init]`` table and the NoCloud seed files it makes.

Canonical keys of the table::

    hostname             str (default: the domain's hostname, else its name)
    instance_id          str (default: the domain's uuid, else its name)
    ssh_authorized_keys  list of str, for the image's default user
    nameservers          list of IPv4 addresses, the static network's DNS servers
    users                list of {name, ssh_authorized_keys, sudo (bool)}
    user_data            str, a whole user-data document (#cloud-config, a
                         script...); replaces the one made from the keys above

The static network comes from the domain's own ``ip``/``netmask``/
``gateway``, on its first interface (matched by MAC). Every file is written
as JSON, which is YAML too: cloud-init reads it as it reads any YAML, and
ferry's own guest reads it with the standard library. The files are a pure
function of the config, so that a migration's target makes the very same
seed (checked by digest at prepare).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ferry.errors import ConfigError

USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
KEYS = frozenset(
    {"hostname", "instance_id", "ssh_authorized_keys", "users", "user_data", "nameservers"}
)
MAX_USER_DATA = 64 << 10
SEED_LABEL = "CIDATA"  # NoCloud looks for a file system labelled cidata or CIDATA

Fail = Callable[[str, str], ConfigError]


@dataclass(frozen=True)
class CloudUser:
    name: str
    ssh_authorized_keys: tuple[str, ...] = ()
    sudo: bool = False


@dataclass(frozen=True)
class CloudInit:
    hostname: str | None = None
    instance_id: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    users: tuple[CloudUser, ...] = ()
    user_data: str | None = None
    nameservers: tuple[str, ...] = ()

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("hostname", "instance_id", "user_data"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.ssh_authorized_keys:
            out["ssh_authorized_keys"] = list(self.ssh_authorized_keys)
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.users:
            out["users"] = [
                {"name": u.name, "ssh_authorized_keys": list(u.ssh_authorized_keys), "sudo": u.sudo}
                for u in self.users
            ]
        return out


def parse_cloud_init(value: Any, fail: Fail, hostname_re: re.Pattern[str]) -> CloudInit | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise fail("cloud_init", "expected a table ([cloud_init])")
    unknown = sorted(set(value) - KEYS)
    if unknown:
        raise fail(f"cloud_init.{unknown[0]}", "unknown key")
    hostname = _line(value, "hostname", fail)
    if hostname is not None and not hostname_re.fullmatch(hostname):
        raise fail("cloud_init.hostname", f"{hostname!r} is not a valid host name")
    user_data = value.get("user_data")
    if user_data is not None:
        if not isinstance(user_data, str) or not user_data.strip():
            raise fail("cloud_init.user_data", "expected the user-data document as a string")
        if len(user_data.encode()) > MAX_USER_DATA:
            raise fail("cloud_init.user_data", f"larger than {MAX_USER_DATA >> 10} KiB")
    return CloudInit(
        hostname=hostname,
        instance_id=_line(value, "instance_id", fail),
        ssh_authorized_keys=_keys(value.get("ssh_authorized_keys", []), "cloud_init", fail),
        users=tuple(_user(u, i, fail) for i, u in enumerate(_list(value, "users", fail))),
        user_data=user_data,
        nameservers=_nameservers(value.get("nameservers", []), fail),
    )


def _nameservers(value: Any, fail: Fail) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise fail("cloud_init.nameservers", "expected a list of IPv4 addresses")
    try:
        return tuple(str(ipaddress.IPv4Address(str(v))) for v in value)
    except ValueError as err:
        raise fail("cloud_init.nameservers", str(err)) from None


def _line(data: Mapping[str, Any], key: str, fail: Fail) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\n" in value:
        raise fail(f"cloud_init.{key}", "expected a non-empty single-line string")
    return value


def _list(data: Mapping[str, Any], key: str, fail: Fail) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise fail(f"cloud_init.{key}", f"expected a list, got {type(value).__name__}")
    return value


def _keys(value: Any, where: str, fail: Fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise fail(f"{where}.ssh_authorized_keys", "expected a list of public key strings")
    for key in value:
        if "\n" in key or not key.startswith(("ssh-", "ecdsa-", "sk-")):
            raise fail(f"{where}.ssh_authorized_keys", f"{key[:30]!r}... is not an SSH public key")
    return tuple(value)


def _user(item: Any, index: int, fail: Fail) -> CloudUser:
    where = f"cloud_init.users[{index}]"
    if not isinstance(item, Mapping):
        raise fail(where, "expected a table with name, ssh_authorized_keys, sudo")
    unknown = sorted(set(item) - {"name", "ssh_authorized_keys", "sudo"})
    if unknown:
        raise fail(f"{where}.{unknown[0]}", "unknown key")
    name = item.get("name")
    if not isinstance(name, str) or not USER_RE.fullmatch(name):
        raise fail(f"{where}.name", f"{name!r} is not a user name")
    sudo = item.get("sudo", False)
    if not isinstance(sudo, bool):
        raise fail(f"{where}.sudo", "expected true or false")
    keys = _keys(item.get("ssh_authorized_keys", []), where, fail)
    return CloudUser(name=name, ssh_authorized_keys=keys, sudo=sudo)


@dataclass(frozen=True)
class SeedNetwork:
    mac: str | None
    ip: str | None
    netmask: str
    gateway: str | None


def seed_files(
    ci: CloudInit, name: str, hostname: str, uuid: str | None, net: SeedNetwork
) -> dict[str, bytes]:
    """meta-data, user-data and (with a static address) network-config."""
    meta = {
        "instance-id": ci.instance_id or uuid or name,
        "local-hostname": ci.hostname or hostname,
    }
    files = {"meta-data": _json(meta)}
    if ci.user_data is not None:
        files["user-data"] = ci.user_data.encode()
    else:
        cloud_config: dict[str, Any] = {"hostname": meta["local-hostname"]}
        if ci.ssh_authorized_keys:
            cloud_config["ssh_authorized_keys"] = list(ci.ssh_authorized_keys)
        if ci.users:
            cloud_config["users"] = ["default"] + [_user_doc(u) for u in ci.users]
        files["user-data"] = b"#cloud-config\n" + _json(cloud_config)
    if net.ip is not None:
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{net.netmask}").prefixlen
        eth: dict[str, Any] = {"addresses": [f"{net.ip}/{prefix}"]}
        if net.mac is not None:
            eth["match"] = {"macaddress": net.mac}
            eth["set-name"] = "eth0"
        if net.gateway is not None:
            # Not "to: default": cloud-init 22.4 (Debian 12) refuses it (checked).
            eth["routes"] = [{"to": "0.0.0.0/0", "via": net.gateway}]
        if ci.nameservers:
            eth["nameservers"] = {"addresses": list(ci.nameservers)}
        files["network-config"] = _json({"version": 2, "ethernets": {"eth0": eth}})
    return files


def _user_doc(user: CloudUser) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": user.name, "shell": "/bin/sh"}
    if user.ssh_authorized_keys:
        doc["ssh_authorized_keys"] = list(user.ssh_authorized_keys)
    if user.sudo:
        doc["sudo"] = "ALL=(ALL) NOPASSWD:ALL"
    return doc


def _json(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
