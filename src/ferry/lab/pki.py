"""The lab's cluster CA: one per lab, with the bundles its nodes need.

``<workdir>/pki/``: ``ca/`` (the CA, as on a management station) and one
bundle per node, as an operator would copy them to ``/etc/ferry/pki``:
each host's (its name, ``localhost``, its LAN address and 127.0.0.1, so that
a host may also migrate to itself), the station's admin (``client_1``) and
the viewer's (``client_2``).
"""

from __future__ import annotations

from pathlib import Path

from ferry.lab import topology
from ferry.pki.ca import CertificateAuthority
from ferry.pki.identity import Role

STATION = "client_1"
VIEWER = "client_2"


def bundle_dir(workdir: Path, name: str) -> Path:
    return workdir / "pki" / name


def host_bundle(ca: CertificateAuthority, name: str, address: str, out: Path) -> Path:
    if not (out / "cert.pem").exists():
        ca.issue(name, Role.HOST, ("localhost",), (address, "127.0.0.1"), out=out)
    return out


def ensure_lab_pki(workdir: Path) -> Path:
    """The lab's CA and every node's bundle, made once; returns the pki directory."""
    root = workdir / "pki"
    ca_dir = root / "ca"
    ca = (
        CertificateAuthority.open(ca_dir)
        if (ca_dir / "ca.key").exists()
        else CertificateAuthority.init(ca_dir, "ferry-lab")
    )
    for node in topology.HOSTS:
        host_bundle(ca, node.name, node.address, bundle_dir(workdir, node.name))
    for name, role in ((STATION, Role.ADMIN), (VIEWER, Role.VIEWER)):
        out = bundle_dir(workdir, name)
        if not (out / "cert.pem").exists():
            ca.issue(name, role, out=out)
    return root
