"""How the memory stream is carried: one connection, or multifd channels with compression.

The source decides before prepare and sends the resolved settings, so both
QEMUs agree. The choice, measured on this project's lab (bench/README.md):

- multifd needs QEMU's own sockets (7.2 refuses it on ``fd:``), so its
  channels are gated by a one-time TLS key per migration
  (:mod:`ferry.pki.qemu_psk`). Without TLS (``insecure = true``) there would be
  no gate at all: such hosts keep the single ``fd:`` stream behind the token.
- zstd at its default level costs far less CPU per byte than QEMU's TLS
  and cuts the guest's RAM to about a third of the bytes on the wire, so
  it wins on slow links and also on fast ones where TLS is the limit. It needs
  a CPU for itself: with one CPU the guest would pay for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ferry.errors import MigrationRefused
from ferry.migration.params import MigrationParams

# With 2 CPUs, 2 channels keep both busy while the guest is stopped for the
# final copy; more channels than CPUs only add TLS sessions.
MAX_AUTO_CHANNELS = 4


@dataclass(frozen=True)
class StreamPlan:
    params: MigrationParams  # resolved: no "auto", channels 1 or >= 2
    reason: str  # one line for the progress output and --json

    @property
    def describe(self) -> str:
        p = self.params
        if not p.multifd:
            return "one stream, no compression"
        return f"{p.channels} channels, {p.compression}"


def plan_stream(params: MigrationParams, secure: bool, cpus: int | None = None) -> StreamPlan:
    """Resolve ``compression`` and ``channels``; refuse what cannot be carried."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    if params.postcopy:
        return StreamPlan(
            replace(params, channels=1, compression="none"),
            "one stream, no compression: post-copy (QEMU 7.2 refuses it with multifd)",
        )
    wants_multifd = params.channels >= 2 or params.compression in ("zstd", "zlib")
    if not secure:
        if wants_multifd:
            raise MigrationRefused(
                "multifd and compression need TLS on the stream (each channel is gated by a "
                "one-time key); this host has insecure = true: migrate with --channels 1"
            )
        return StreamPlan(
            replace(params, channels=1, compression="none"),
            "one fd: stream: insecure = true leaves multifd channels without a gate",
        )
    if params.channels == 1 or (params.channels == 0 and params.compression == "none"):
        return StreamPlan(replace(params, channels=1, compression="none"), "one stream, as asked")
    if params.channels == 0 and params.compression == "auto" and cpus < 2:
        return StreamPlan(
            replace(params, channels=1, compression="none"),
            f"one stream: {cpus} CPU here, compression would take it from the guest",
        )
    channels = params.channels or min(max(cpus, 2), MAX_AUTO_CHANNELS)
    compression = "zstd" if params.compression == "auto" else params.compression
    why = "as asked" if params.compression != "auto" else f"chosen: {cpus} CPUs here"
    return StreamPlan(
        replace(params, channels=channels, compression=compression),
        f"multifd, {channels} channels, {compression} ({why})",
    )
