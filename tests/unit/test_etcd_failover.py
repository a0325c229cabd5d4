"""What the etcd client makes of a member's errors and silences, and what a failed renewal does.

Seen in the lab: with the leader's host cut off, the other members answered a
lease renewal "context deadline exceeded" while they elected a new leader. Taken
for a refusal, it ended the renewals (and the fencer) and fenced a healthy host.
And: a follower cut from its leader holds a renewal for its own request
timeout; waited out member after member, the renewal outlived the lease.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aetcd.exceptions
import pytest

from ferry.cluster.etcd import Endpoint, EtcdClient
from ferry.cluster.lease import HostLease, LeaseState
from ferry.errors import ClusterError, ClusterUnavailable

ELECTING = aetcd.exceptions.ClientError("UNKNOWN: context deadline exceeded")
REFUSED = aetcd.exceptions.ClientError("PERMISSION_DENIED: etcdserver: permission denied")


class Member:
    def __init__(
        self, error: Exception | None = None, silent: bool = False, delay: float = 0.0
    ) -> None:
        self.error = error
        self.silent = silent
        self.delay = delay
        self.calls = 0
        self.cancelled = 0

    async def _answer(self, reply: Any) -> Any:
        self.calls += 1
        if self.silent:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return reply

    async def refresh_lease(self, lease_id: int) -> Any:
        return await self._answer(SimpleNamespace(TTL=6))

    async def transaction(self, *args: Any) -> Any:
        return await self._answer((True, []))


def client(*members: Member) -> EtcdClient:
    endpoints = [Endpoint(f"10.0.0.{i}", 2379, False) for i in range(len(members))]
    etcd = EtcdClient(endpoints, None, timeout=1.0)
    etcd._clients = dict(zip(endpoints, members, strict=True))
    return etcd


async def test_a_member_electing_a_leader_sends_the_call_to_the_next() -> None:
    electing, healthy = Member(ELECTING), Member()
    assert await client(electing, healthy).keepalive(1) == 6
    assert electing.calls == 1 and healthy.calls == 1


async def test_no_member_able_to_answer_is_unavailability_not_refusal() -> None:
    with pytest.raises(ClusterUnavailable, match="deadline exceeded"):
        await client(Member(ELECTING), Member(ELECTING)).keepalive(1)


async def test_a_refusal_is_a_refusal() -> None:
    second = Member()
    with pytest.raises(ClusterError, match="refused to renew") as raised:
        await client(Member(REFUSED), second).keepalive(1)
    assert not isinstance(raised.value, ClusterUnavailable)
    assert second.calls == 0


async def test_a_silent_member_is_joined_by_the_next_within_the_hedge() -> None:
    """A renewal must not wait out a silent member (timeout 1 s here) before
    asking a healthy one: it is answered after the hedge, and the silent
    member's call is ended."""
    silent, healthy = Member(silent=True), Member()
    etcd = client(silent, healthy)
    started = time.monotonic()
    assert await etcd.keepalive(1) == 6
    assert time.monotonic() - started < etcd.timeout
    assert silent.cancelled == 1 and healthy.calls == 1
    assert etcd._current == 1  # the next call starts with the member that answered


async def test_a_transaction_is_never_sent_to_two_members_at_once() -> None:
    silent, healthy = Member(silent=True), Member()
    etcd = client(silent, healthy)
    started = time.monotonic()
    result = await etcd.txn([], [])
    assert result.succeeded
    # The silent member's whole timeout, then the next member.
    assert time.monotonic() - started >= etcd.timeout
    assert silent.cancelled == 1
    assert healthy.calls == 1


async def test_a_refusal_counts_only_if_no_member_already_asked_answers() -> None:
    slow, refusing = Member(delay=0.5), Member(REFUSED)  # the hedge: 0.25 s
    assert await client(slow, refusing).keepalive(1) == 6
    silent, refusing, unasked = Member(silent=True), Member(REFUSED), Member()
    with pytest.raises(ClusterError, match="refused to renew") as raised:
        await client(silent, refusing, unasked).keepalive(1)
    assert not isinstance(raised.value, ClusterUnavailable)
    assert unasked.calls == 0  # after a refusal, no new member is asked


async def test_a_failed_renewal_never_ends_the_renewals(tmp_path: Path) -> None:
    """Refused or unanswered, the host's own clock decides when the lease is lost."""
    lease = HostLease(client(Member(REFUSED)), 6, tmp_path / "lease")
    lease.id = 1
    lease.state = LeaseState.HELD
    lease.valid_until = time.monotonic() + 6
    await lease.renew()  # does not raise
    assert lease.state is LeaseState.LATE
    assert lease.renewals["failed"] == 1
