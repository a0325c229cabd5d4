"""QEMU's own TLS for the memory stream: ``tls-creds-x509`` and ``authz-simple`` objects.

The stream goes QEMU to QEMU and never through Python, so Python's TLS cannot
cover it; QEMU's can (GnuTLS). Both ends use the host's certificate of the
cluster CA: the source verifies that the target's certificate names the host
it migrates to (``tls-hostname``), the target verifies the source's chain and
then admits exactly the source that the relocation channel authenticated
(``tls-authz``, by its certificate's distinguished name).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferry.errors import QmpError
from ferry.hypervisor.monitor import Monitor
from ferry.pki.credentials import Credentials
from ferry.pki.dh_params import ffdhe2048_pem
from ferry.pki.files import write_private, write_public
from ferry.pki.identity import Identity

# tls-creds-x509 reads these names from its directory (QEMU's crypto/tlscredsx509.h).
_PUBLIC = {"ca.pem": ("ca-cert.pem",), "crl.pem": ("ca-crl.pem",)}
_CERT = ("server-cert.pem", "client-cert.pem")
_KEY = ("server-key.pem", "client-key.pem")


def write_qemu_dir(credentials: Credentials, directory: Path) -> Path:
    """Lay the credentials out under the names QEMU reads."""
    credentials.identity  # noqa: B018  (checks the files before QEMU sees them)
    for source, targets in _PUBLIC.items():
        for target in targets:
            write_public(directory / target, credentials.path(source).read_bytes())
    for target in _CERT:
        write_public(directory / target, credentials.path("cert.pem").read_bytes())
    for target in _KEY:
        write_private(directory / target, credentials.path("key.pem").read_bytes())
    # Without it a server object generates a DH group of its own, for seconds of CPU.
    write_public(directory / "dh-params.pem", ffdhe2048_pem())
    return directory


def creds_object(object_id: str, directory: Path, endpoint: str) -> dict[str, Any]:
    return {
        "qom-type": "tls-creds-x509",
        "id": object_id,
        "dir": str(directory),
        "endpoint": endpoint,
        "verify-peer": True,
    }


def authz_object(object_id: str, peer: Identity) -> dict[str, Any]:
    """Admit exactly ``peer``'s certificate (by its subject, as GnuTLS writes it)."""
    return {"qom-type": "authz-simple", "id": object_id, "identity": peer.gnutls_dn}


CREDS_ID = "ferry-tls"
AUTHZ_ID = "ferry-authz"
# The disks' NBD connections (--copy-storage) have objects of their own: the
# memory stream may run on multifd's one-time key instead of x509.
NBD_CREDS_ID = "ferry-nbd-tls"
NBD_AUTHZ_ID = "ferry-nbd-authz"


class QemuTls:
    """This host's side of QEMU's TLS on the memory stream, set up over QMP."""

    def __init__(self, credentials: Credentials, directory: Path) -> None:
        self.credentials = credentials
        self.directory = directory

    async def setup_source(self, monitor: Monitor, target: str) -> None:
        """Encrypt the outgoing stream; its target's certificate must name ``target``."""
        with self._files() as directory:
            await replace_object(monitor, creds_object(CREDS_ID, directory, "client"))
        await monitor.execute(
            "migrate-set-parameters", {"tls-creds": CREDS_ID, "tls-hostname": target}
        )

    async def setup_target(self, monitor: Monitor, source: Identity) -> None:
        """Decrypt the arriving stream, admitting ``source``'s certificate only."""
        with self._files() as directory:
            await replace_object(monitor, creds_object(CREDS_ID, directory, "server"))
        await replace_object(monitor, authz_object(AUTHZ_ID, source))
        await monitor.execute(
            "migrate-set-parameters", {"tls-creds": CREDS_ID, "tls-authz": AUTHZ_ID}
        )

    async def setup_nbd_server(self, monitor: Monitor, source: Identity) -> tuple[str, str]:
        """The arriving QEMU's disk exports: TLS admitting ``source``'s certificate only."""
        with self._files() as directory:
            await replace_object(monitor, creds_object(NBD_CREDS_ID, directory, "server"))
        await replace_object(monitor, authz_object(NBD_AUTHZ_ID, source))
        return NBD_CREDS_ID, NBD_AUTHZ_ID

    async def setup_nbd_client(self, monitor: Monitor) -> str:
        """The departing QEMU's connections to the target's disk exports."""
        with self._files() as directory:
            await replace_object(monitor, creds_object(NBD_CREDS_ID, directory, "client"))
        return NBD_CREDS_ID

    @contextlib.contextmanager
    def _files(self) -> Iterator[Path]:
        """A directory of its own for each setup (migrations run side by side), removed
        once QEMU has read it: QEMU loads the files, the CRL included, at object-add."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(dir=self.directory))
        try:
            yield write_qemu_dir(self.credentials, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


async def plain_stream(monitor: Monitor) -> None:
    """No TLS on the stream (insecure = true): clear whatever an earlier setup left."""
    await monitor.execute("migrate-set-parameters", {"tls-creds": ""})


async def replace_object(monitor: Monitor, spec: dict[str, Any]) -> None:
    # An earlier migration of this QEMU (one that failed) left its object.
    with contextlib.suppress(QmpError):
        await monitor.execute("object-del", {"id": spec["id"]})
    await monitor.execute("object-add", spec)
