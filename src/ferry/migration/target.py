"""The target side of a migration, one relocation connection at a time.

A connection's first message says what it is: ``hello`` opens a migration
session (handshake, prepare, then waiting for commit or abort), ``data``
carries the memory stream (its socket is handed to QEMU), ``status`` asks how
a migration ended. The session never resumes the VM without the source's
commit, and aborts (ending its QEMU) when the source goes silent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferry.domain.migration_state import Outcome
from ferry.errors import FerryError, MigrationError, MigrationRefused, refusal_reason
from ferry.migration.channel import PROTOCOL_VERSION, Channel
from ferry.migration.params import MigrationParams
from ferry.pki.identity import Identity
from ferry.util.metrics import Metrics

log = logging.getLogger("ferryd")

HELLO_TIMEOUT = 10.0
# Longer than the source's stall timeout, so that a source that sees the link
# die cancels first and tells us; silence past this means the source is gone.
SILENCE_TIMEOUT = 30.0
# A migration id names files and directories here: nothing but what a source
# generates (uuid4 hex) may pass.
MIGRATION_ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Prepared:
    """The arriving QEMU waits for its stream: the token that admits it, and what prepare took."""

    token: str
    steps_ms: dict[str, float]
    # multifd: where the arriving QEMU listens and the channels' one-time key.
    stream: dict[str, Any] = field(default_factory=dict)
    # --copy-storage: where the arriving QEMU serves its new disks (port, exports).
    storage: dict[str, Any] = field(default_factory=dict)


class TargetHost(Protocol):
    async def prepare_incoming(
        self,
        migration_id: str,
        mapping: Mapping[str, Any],
        params: MigrationParams,
        disks: list[Any],
        boot: Mapping[str, Any],
        peer: str,
        source: Identity | None,
        source_host: str,
        bind: str,
        source_address: str,
    ) -> Prepared: ...

    async def start_incoming_stream(self, migration_id: str, token: str, fd: int) -> None: ...

    async def commit_incoming(self, migration_id: str, resume: bool) -> dict[str, Any]: ...

    async def finish_switch(self, migration_id: str) -> dict[str, Any]: ...

    async def abort_incoming(self, migration_id: str, reason: str) -> None: ...

    def migration_outcome(self, migration_id: str) -> str: ...


ALL_KINDS = frozenset({"hello", "data", "status"})


async def refuse(channel: Channel, refusal: MigrationRefused, metrics: Metrics | None) -> None:
    """Tell the peer why not, and count it by its reason."""
    if metrics is not None:
        metrics.refused(refusal.reason)
    await channel.send_error(refusal)


async def serve_connection(
    channel: Channel,
    host: TargetHost,
    local_name: str,
    kinds: frozenset[str] = ALL_KINDS,
    metrics: Metrics | None = None,
) -> None:
    """Serve one connection whose first message is one of ``kinds``."""
    try:
        first = await channel.recv(HELLO_TIMEOUT)
        kind = first["type"]
        if kind not in kinds and kind in ALL_KINDS:
            how = "in plain TCP" if channel.identity is None else "over TLS"
            raise MigrationRefused(f"host {local_name} takes no {kind!r} request {how}", "protocol")
        if kind == "hello":
            await _session(channel, host, local_name, first, metrics)
        elif kind == "data":
            await _data(channel, host, first, metrics)
        elif kind == "status":
            outcome = host.migration_outcome(str(first.get("migration_id")))
            await channel.send({"type": "status", "outcome": outcome})
        else:
            await channel.send_error(MigrationError(f"unknown relocation request {kind!r}"))
    except MigrationRefused as err:
        log.info("relocation connection from %s: %s", channel.peer, err)
        await refuse(channel, err, metrics)
    except MigrationError as err:
        log.info("relocation connection from %s: %s", channel.peer, err)
        # A peer still listening learns why (a closed one learns nothing more).
        await channel.send_error(err)
    except (FerryError, TypeError, ValueError, KeyError, AttributeError) as err:
        # Whatever shape a peer's message takes, it gets one line back and
        # changes nothing here.
        log.warning("malformed relocation request from %s: %r", channel.peer, err)
        refusal = MigrationRefused(f"malformed relocation request: {err}", "protocol")
        await refuse(channel, refusal, metrics)
    finally:
        # A data connection's socket lives on in QEMU, which holds its own copy.
        await channel.close()


async def _session(
    channel: Channel,
    host: TargetHost,
    local_name: str,
    hello: dict[str, Any],
    metrics: Metrics | None,
) -> None:
    if hello.get("version") != PROTOCOL_VERSION:
        raise MigrationRefused(
            f"host {local_name} speaks relocation protocol {PROTOCOL_VERSION}, "
            f"not {hello.get('version')}",
            "protocol",
        )
    await channel.send({"type": "hello", "version": PROTOCOL_VERSION, "host": local_name})
    prepare = await channel.recv(HELLO_TIMEOUT, "prepare")
    migration_id = str(prepare.get("migration_id", ""))
    if not MIGRATION_ID_RE.fullmatch(migration_id):
        raise MigrationRefused("a migration id is 32 lowercase hex digits", "protocol")
    try:
        config, params, disks, boot = (
            prepare.get(k) for k in ("config", "params", "disks", "boot")
        )
        if not isinstance(config, dict):
            raise MigrationRefused("the source sent no domain config", "protocol")
        if not isinstance(params, dict | None) or not isinstance(disks, list | None):
            raise MigrationRefused("'params' must be an object and 'disks' a list", "protocol")
        if not isinstance(boot, dict | None):
            raise MigrationRefused("'boot' must be an object", "protocol")
        prepared = await host.prepare_incoming(
            migration_id,
            config,
            MigrationParams.from_wire(params or {}),
            list(disks or []),
            dict(boot or {}),
            _describe(channel, hello),
            channel.identity,
            # Who owns the domain now: the certificate's name, else what the
            # (unauthenticated, insecure = true) source said it is.
            channel.identity.name if channel.identity else str(hello.get("host"))[:64],
            channel.local_address(),
            channel.peer_address(),
        )
    except FerryError as err:
        refusal = (
            err
            if isinstance(err, MigrationRefused)
            else MigrationRefused(str(err), refusal_reason(err))
        )
        await refuse(channel, refusal, metrics)
        return
    try:
        await channel.send(
            {
                "type": "prepared",
                "token": prepared.token,
                "steps_ms": prepared.steps_ms,
                "stream": prepared.stream,
                "storage": prepared.storage,
            }
        )
        while True:
            message = await channel.recv(SILENCE_TIMEOUT)
            if message["type"] == "ping":
                continue
            if message["type"] == "commit":
                break
            raise MigrationError(f"unexpected {message['type']!r} from the source")
    except MigrationError as err:
        await host.abort_incoming(migration_id, str(err))
        return
    try:
        times = await host.commit_incoming(migration_id, bool(message.get("resume", True)))
    except Exception as err:
        if host.migration_outcome(migration_id) == Outcome.COMMITTED:
            # Past the commit point the domain is ours whatever failed after it:
            # the source must hand over, never resume its copy.
            log.exception("migration %s committed, then failed", migration_id[:8])
            with contextlib.suppress(MigrationError):
                await channel.send({"type": "committed"})
            await host.finish_switch(migration_id)  # post-copy: it must still run
            return
        await host.abort_incoming(migration_id, f"commit failed: {err}")
        await channel.send_error(MigrationError(f"host {local_name} could not commit: {err}"))
        if not isinstance(err, FerryError):
            raise
        return
    if times.get("switch") != "after-commit":
        await channel.send({"type": "committed", **times})
        return
    # Post-copy: the source lets its device state through on hearing the
    # commit, and the domain runs here once it is loaded. A source that missed
    # the answer learns the outcome later and lets it through then.
    with contextlib.suppress(MigrationError):
        await channel.send({"type": "committed"})
    resumed = await host.finish_switch(migration_id)
    with contextlib.suppress(MigrationError):
        await channel.send({"type": "resumed", **resumed})


def _describe(channel: Channel, hello: dict[str, Any]) -> str:
    if channel.identity is not None:
        return f"{channel.identity.name} ({channel.peer})"
    return f"{str(hello.get('host'))[:64]} ({channel.peer}, unauthenticated)"


async def _data(
    channel: Channel, host: TargetHost, header: dict[str, Any], metrics: Metrics | None
) -> None:
    # Nothing more may be read by us: the rest of this socket is QEMU's.
    channel.writer.transport.pause_reading()  # type: ignore[attr-defined]
    fd = os.dup(channel.socket().fileno())
    try:
        await host.start_incoming_stream(
            str(header.get("migration_id")), str(header.get("token")), fd
        )
    except FerryError as err:
        if isinstance(err, MigrationRefused) and metrics is not None:
            metrics.refused(err.reason)
        channel.writer.write(f"refused: {err}\n".encode())
        await channel.writer.drain()
        return
    finally:
        os.close(fd)
    channel.writer.write(b"ready\n")
    await channel.writer.drain()
