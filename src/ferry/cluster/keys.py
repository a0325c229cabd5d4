"""Where things live in etcd, and the normal form of a disk's name.

Under ``/ferry/<cluster>/``:

=======================  =========  ===============================================
key                      lease      value (JSON)
=======================  =========  ===============================================
``hosts/<host>``         host's     what the host publishes: addresses, capacity,
                                    its domains and their states
``domains/<name>``       owner's    ``{"host", "migration", "since"}``: who runs it
``disks/<disk id>``      owner's    ``{"domain", "host"}``: who writes it
``maintenance/<host>``   none       ``{"since", "by"}``: no new domains there
``ha/<name>``            none       ``{"config", "state", "restarts", ...}``: a domain
                                    to restart elsewhere if its host fails
=======================  =========  ===============================================

A domain key and its disks' keys are only ever written together, in one
transaction, by the host that holds the lease they are bound to. A host whose
lease expires loses them all at once: that is how a dead host's domains
become free, and why a host must stop its VMs before its lease can expire.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ferry.errors import ClusterError

_DEFAULT_PORTS = {"nbd": 10809, "iscsi": 3260, "nfs": None}


@dataclass(frozen=True)
class Keys:
    cluster: str

    @property
    def root(self) -> str:
        return f"/ferry/{self.cluster}/"

    def host(self, name: str) -> str:
        return f"{self.root}hosts/{name}"

    @property
    def hosts(self) -> str:
        return f"{self.root}hosts/"

    def domain(self, name: str) -> str:
        return f"{self.root}domains/{name}"

    @property
    def domains(self) -> str:
        return f"{self.root}domains/"

    def disk(self, disk: str) -> str:
        return f"{self.root}disks/{disk_id(disk)}"

    def maintenance(self, host: str) -> str:
        return f"{self.root}maintenance/{host}"

    def ha(self, name: str) -> str:
        return f"{self.root}ha/{name}"

    @property
    def has(self) -> str:
        return f"{self.root}ha/"

    @property
    def maintenances(self) -> str:
        return f"{self.root}maintenance/"

    def name_of(self, key: str, prefix: str) -> str:
        return key[len(prefix) :]


def disk_id(disk: str) -> str:
    """One name for one disk, whichever host spells it.

    A file disk is its real path (resolved by the caller); a URL gets its
    scheme and server in lower case and the protocol's default port made
    explicit, so ``nbd://Store/x`` and ``nbd://store:10809/x`` are one disk.
    Two servers names for one export cannot be told apart here.
    """
    if "://" not in disk:
        return disk
    parts = urlsplit(disk)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    netloc = f"{host}:{port}" if port else host
    path = parts.path or "/"
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes, key: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise ClusterError(f"etcd key {key} holds no JSON; written by something else?") from None
    if not isinstance(value, dict):
        raise ClusterError(f"etcd key {key} holds {type(value).__name__}, not an object")
    return value
