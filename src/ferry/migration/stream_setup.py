"""Both QEMUs set up for the memory stream: capabilities, parameters, TLS, and the URI.

One stream: the source's QEMU gets the data connection's socket (``fd:``)
after the token check, with QEMU's x509 TLS (or none with ``insecure = true``).
multifd: the target's QEMU listens on a port of its own, on the address the
source reached this host at, and every channel is gated by the migration's
one-time key (:mod:`ferry.pki.qemu_psk`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from ferry.errors import MigrationError, MigrationRefused
from ferry.hypervisor.monitor import Monitor
from ferry.migration.params import MigrationParams
from ferry.pki.identity import Identity
from ferry.pki.qemu_psk import StreamKey, setup_source_psk, setup_target_psk
from ferry.pki.qemu_tls import QemuTls, plain_stream


def _caps(names: dict[str, bool]) -> dict[str, Any]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in names.items()]}


def uri_host(address: str) -> str:
    """``address`` as QEMU's tcp: URI takes it (IPv6 in brackets)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    return f"[{address}]" if ip.version == 6 else address


async def setup_target(
    monitor: Monitor,
    params: MigrationParams,
    tls: QemuTls | None,
    source: Identity | None,
    key: StreamKey,
    key_dir: Path,
    bind: str,
) -> dict[str, Any]:
    """Ready the arriving QEMU; for multifd, start it listening and return how to reach it."""
    await monitor.execute(
        "migrate-set-capabilities",
        _caps(
            {
                # Disks stay inactive after the stream until our "cont".
                "late-block-activate": True,
                "events": True,
                "multifd": params.multifd,
                "postcopy-ram": params.postcopy,
            }
        ),
    )
    if not params.multifd:
        if tls is not None:
            if source is None:
                raise MigrationError("no certificate of the source to admit its stream")
            await tls.setup_target(monitor, source)
        return {}
    if tls is None:
        raise MigrationRefused("multifd needs TLS on the stream; this host has insecure = true")
    await monitor.execute("migrate-set-parameters", params.multifd_parameters())
    await setup_target_psk(monitor, key, key_dir)
    await monitor.execute("migrate-incoming", {"uri": f"tcp:{uri_host(bind)}:0"})
    info = await monitor.execute("query-migrate")
    try:
        port = int(info["socket-address"][0]["port"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise MigrationError(
            f"the arriving QEMU did not say which port it listens on: {info}"
        ) from err
    return {"port": port, "key_name": key.username, "key": key.key}


async def setup_source(
    monitor: Monitor,
    params: MigrationParams,
    tls: QemuTls | None,
    host: str,
    stream: dict[str, Any],
    address: str | None = None,
) -> str | None:
    """Ready the outgoing QEMU; the URI to migrate to, or None for the data connection's fd."""
    await monitor.execute("migrate-set-capabilities", _caps(params.capabilities()))
    await monitor.execute("migrate-set-parameters", params.qemu_parameters())
    if not params.multifd:
        if tls is not None:
            await tls.setup_source(monitor, host)
        else:
            await plain_stream(monitor)
        return None
    if tls is None or "port" not in stream:
        raise MigrationError(f"{host} did not open a multifd stream")
    key = StreamKey.from_wire(stream.get("key_name"), stream.get("key"))
    port = stream["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise MigrationError(f"{host} sent a malformed stream port")
    await setup_source_psk(monitor, key, tls.directory)
    # The address the relocation channel reached; ``host`` is the name the
    # x509 certificate is checked against (one stream), not always an address.
    return f"tcp:{uri_host(address or host)}:{port}"
