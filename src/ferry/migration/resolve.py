"""Asking a target how a migration ended, for a source that lost the commit's answer."""

from __future__ import annotations

from ferry.errors import MigrationError
from ferry.migration.channel import Channel

ASK_TIMEOUT = 10.0


async def ask_outcome(host: str, port: int, migration_id: str, local_host: str) -> str:
    """``committed``, ``aborted`` or ``pending``, as the target says."""
    channel = await Channel.connect(host, port, ASK_TIMEOUT)
    try:
        await channel.send({"type": "status", "migration_id": migration_id, "host": local_host})
        reply = await channel.recv(ASK_TIMEOUT, "status")
    finally:
        await channel.close()
    outcome = reply.get("outcome")
    if outcome not in ("committed", "aborted", "pending"):
        raise MigrationError(f"{host} gave no usable outcome for migration {migration_id[:8]}")
    return str(outcome)
