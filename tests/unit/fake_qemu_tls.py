"""The fake QEMU's TLS (see fake_qemu.py): real TLS, as QEMU's x509 credentials do it."""

from __future__ import annotations

import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

Machine = Any  # fake_qemu.Machine: that script is __main__, not importable here


def load_tls_creds(machine: Machine, spec: dict[str, Any]) -> dict[str, Any]:
    """As QEMU: the files are read when the object is created."""
    directory = Path(spec["dir"])
    side = "server" if spec["endpoint"] == "server" else "client"
    # Beside the QMP socket: in the domain's run directory, which ferry removes.
    keep = Path(tempfile.mkdtemp(prefix="fake-tls-", dir=machine.workdir))
    for name in ("ca-cert.pem", f"{side}-cert.pem", f"{side}-key.pem"):
        (keep / name).write_bytes((directory / name).read_bytes())
    return spec | {"files": keep, "side": side}


def tls_wrap(machine: Machine, sock: socket.socket) -> socket.socket:
    creds_id = machine.params.get("tls-creds")
    if not creds_id:
        return sock
    creds = machine.objects[creds_id]
    files, side = creds["files"], creds["side"]
    server = side == "server"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = not server
    # No session tickets: the source never reads, and unread bytes at its
    # close would reset the connection under the target's last reads.
    if server:
        ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(files / "ca-cert.pem"))
    ctx.load_cert_chain(str(files / f"{side}-cert.pem"), str(files / f"{side}-key.pem"))
    if server:
        wrapped = ctx.wrap_socket(sock, server_side=True)
    else:
        wrapped = ctx.wrap_socket(sock, server_hostname=machine.params["tls-hostname"])
    cert = wrapped.getpeercert()
    subject = ",".join(f"{k}={v}" for rdn in cert["subject"] for k, v in rdn)
    subject = subject.replace("organizationName", "O").replace(
        "organizationalUnitName", "OU").replace("commonName", "CN")  # fmt: skip
    machine.tls_peer = subject
    authz_id = machine.params.get("tls-authz")
    if server and authz_id and machine.objects[authz_id]["identity"] != subject:
        wrapped.close()
        raise OSError(f"TLS x509 authz check for {subject} is denied")
    return wrapped
