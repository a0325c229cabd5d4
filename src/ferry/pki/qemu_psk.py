"""A one-time TLS key per migration, for QEMU's multifd channels (``tls-creds-psk``).

multifd channels are QEMU's own TCP connections to a port the target QEMU
listens on, so ferry's token check on its relocation port cannot gate them.
The key does instead: the target makes it at prepare and gives it to the source
over the authenticated relocation channel, and every channel, the main one
and each multifd one, must complete a TLS handshake with it. The key file holds
this migration's entry only: QEMU 7.2 ignores ``tls-authz`` with PSK, so the
file is the whole gate (verified: docs/research/multifd-design.md, 3c).
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import MigrationError
from ferry.hypervisor.monitor import Monitor
from ferry.pki.dh_params import ffdhe2048_pem
from ferry.pki.files import write_private, write_public
from ferry.pki.qemu_tls import replace_object

PSK_ID = "ferry-psk"
KEY_BYTES = 32
_KEY_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StreamKey:
    username: str
    key: str = field(repr=False)  # hex; never in a log line by accident

    @classmethod
    def new(cls, migration_id: str) -> StreamKey:
        return cls(f"ferry-{migration_id[:16]}", secrets.token_hex(KEY_BYTES))

    @classmethod
    def from_wire(cls, username: Any, key: Any) -> StreamKey:
        if not isinstance(username, str) or not re.fullmatch(r"ferry-[0-9a-f]{1,32}", username):
            raise MigrationError("the target sent a malformed stream key name")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise MigrationError("the target sent a malformed stream key")
        return cls(username, key)

    def write(self, directory: Path) -> Path:
        """``keys.psk`` (and a fixed DH group) under the names QEMU reads."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(directory / "keys.psk", f"{self.username}:{self.key}\n".encode())
        write_public(directory / "dh-params.pem", ffdhe2048_pem())
        return directory


async def setup_target_psk(monitor: Monitor, key: StreamKey, directory: Path) -> None:
    """The arriving QEMU admits channels that know ``key``.

    GnuTLS reads a server's key file at each handshake, so ``directory`` must
    stay until every channel has connected; the caller removes it after.
    """
    key.write(directory)
    await replace_object(
        monitor,
        {"qom-type": "tls-creds-psk", "id": PSK_ID, "dir": str(directory), "endpoint": "server"},
    )
    await monitor.execute(
        "migrate-set-parameters", {"tls-creds": PSK_ID, "tls-authz": "", "tls-hostname": ""}
    )


async def setup_source_psk(monitor: Monitor, key: StreamKey, parent: Path) -> None:
    """The outgoing channels prove they know ``key`` (read once, at object-add)."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(dir=parent))
    try:
        key.write(directory)
        await replace_object(
            monitor,
            {
                "qom-type": "tls-creds-psk",
                "id": PSK_ID,
                "dir": str(directory),
                "endpoint": "client",
                "username": key.username,
            },
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    await monitor.execute("migrate-set-parameters", {"tls-creds": PSK_ID, "tls-hostname": ""})
