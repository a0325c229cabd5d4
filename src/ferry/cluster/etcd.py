"""The cluster store: a typed face on etcd v3 (through ``aetcd``), over mutual TLS.

One gRPC channel per etcd member, each checked against the member's own
address in its certificate; a member that does not answer makes the next
call go to the next one. Every call has a deadline: a host cut from the
quorum learns it as :class:`ClusterUnavailable` within ``timeout`` seconds,
never as a hang.

Only compare-guarded transactions write ownership, so a call retried on
another member after a lost answer can never apply twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.transactions
import grpc

from ferry.errors import ClusterError, ClusterUnavailable, ConfigError
from ferry.pki.credentials import Credentials

log = logging.getLogger("ferryd")

DEFAULT_TIMEOUT = 2.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def parse_endpoints(urls: Sequence[str], where: str) -> list[Endpoint]:
    """``https://10.0.0.5:2379`` and the like; all of one scheme."""
    found: list[Endpoint] = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: etcd endpoint {url!r} is not http(s)://HOST:PORT")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ConfigError(f"{where}: etcd endpoint {url!r} has a bad port") from None
        found.append(Endpoint(parts.hostname, port, parts.scheme == "https"))
    if len({e.tls for e in found}) > 1:
        raise ConfigError(f"{where}: etcd endpoints mix http:// and https://")
    return found


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: ``target`` of ``key`` ``op`` ``value``."""

    key: str
    target: str  # "value" | "mod" | "create" | "version"
    op: str  # "==" | "!=" | "<" | ">"
    value: bytes | int

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "create", "==", 0)

    @staticmethod
    def unchanged(entry: Entry) -> Compare:
        return Compare(entry.key, "mod", "==", entry.mod_revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str


Op = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    # What the Get operations of the branch taken found, in order (None: absent).
    found: list[Entry | None]


def _raise_every_error(error: Exception) -> None:
    """aetcd maps some gRPC codes to its exceptions and *returns None* for the others,
    so an unmapped error would read as "no such key". Every error raises here."""
    _aetcd_handle_exception(error)
    if isinstance(error, aetcd.rpc.AioRpcError):
        raise aetcd.exceptions.ClientError(f"{error.code().name}: {error.details()}") from error
    raise error


_aetcd_handle_exception = aetcd.exceptions._handle_exception
aetcd.exceptions._handle_exception = _raise_every_error

# What a member answers while it cannot serve (no leader, an election after a
# partition heals, a slow disk): another member, or a moment later, may.
_TRANSIENT = ("deadline exceeded", "timed out", "leader", "unhealthy", "UNAVAILABLE", "UNKNOWN")


def _transient(err: Exception) -> bool:
    if isinstance(
        err, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError
    ):
        return True
    return isinstance(err, aetcd.exceptions.ClientError) and any(t in str(err) for t in _TRANSIENT)


class _Unanswered(Exception):
    """A member gave no answer it may stand by: the next one is asked."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


_COMPARE = {
    "value": aetcd.transactions.Value,
    "mod": aetcd.transactions.Mod,
    "create": aetcd.transactions.Create,
    "version": aetcd.transactions.Version,
}


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client with a TLS channel: aetcd itself only dials plain gRPC."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, timeout: float) -> None:
        super().__init__(host=endpoint.host, port=endpoint.port, timeout=timeout)
        self._ferry_credentials = credentials

    @aetcd.client._handle_errors  # type: ignore[untyped-decorator]
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        files = self._ferry_credentials
        _ = files.identity  # checked (present, valid, not revoked) before use
        creds = grpc.ssl_channel_credentials(
            root_certificates=files.path("ca.pem").read_bytes(),
            private_key=files.path("key.pem").read_bytes(),
            certificate_chain=files.path("cert.pem").read_bytes(),
        )
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", creds, options=list(self._options.items())
        )
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class EtcdClient:
    """The calls ferry makes on etcd, each with a deadline, failing over between members."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        credentials: Credentials | None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ConfigError("no etcd endpoint configured")
        if endpoints[0].tls and credentials is None:
            raise ConfigError("https:// etcd endpoints need this host's credentials")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._credentials = credentials
        self._clients: dict[Endpoint, Any] = {}
        self._current = 0
        # How long a hedged call waits on one member before asking the next too.
        self.hedge = timeout / 4

    def describe(self) -> str:
        return ", ".join(str(e) for e in self.endpoints)

    def _client(self, endpoint: Endpoint) -> Any:
        client = self._clients.get(endpoint)
        if client is None:
            if endpoint.tls:
                assert self._credentials is not None
                client = _TlsClient(endpoint, self._credentials, self.timeout)
            else:
                client = aetcd.Client(host=endpoint.host, port=endpoint.port, timeout=self.timeout)
            self._clients[endpoint] = client
        return client

    async def _call(
        self, what: str, method: str, *args: Any, hedged: bool = False, **kwargs: Any
    ) -> Any:
        """Try each member, starting with the last one that answered.

        One at a time, the next after the last has failed, unless ``hedged``:
        then a member silent for :attr:`hedge` seconds is joined by the next
        one, and the first answer wins. Only for calls that may run twice
        (reads, renewals): a follower cut from its leader holds a renewal for
        its own request timeout (7 s), which, waited out member by member, is
        longer than a lease's margin (read in etcd's code, not measured).
        """
        waiting = [
            (self._current + step) % len(self.endpoints) for step in range(len(self.endpoints))
        ]
        running: dict[asyncio.Task[Any], int] = {}
        last: Exception | None = None
        refused: ClusterError | None = None
        try:
            while waiting or running:
                if waiting and refused is None:
                    index = waiting.pop(0)
                    attempt = self._attempt(what, self.endpoints[index], method, args, kwargs)
                    running[asyncio.ensure_future(attempt)] = index
                done, _ = await asyncio.wait(
                    running,
                    timeout=self.hedge if hedged and waiting else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    index = running.pop(task)
                    try:
                        result = task.result()
                    except _Unanswered as err:
                        last = err.cause
                        continue
                    except ClusterError as err:
                        # Another member already asked may still answer: a
                        # refusal counts only if none does. No new one is asked.
                        refused = err
                        continue
                    self._current = index
                    return result
                if refused is not None and not running:
                    raise refused
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        raise ClusterUnavailable(
            f"no etcd member answered within {self.timeout:g} s to {what} "
            f"({self.describe()}): {_one_line(last)}"
        )

    async def _attempt(
        self,
        what: str,
        endpoint: Endpoint,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """One member's answer; :class:`_Unanswered` if it gave none (or not yet can)."""
        try:
            async with asyncio.timeout(self.timeout + 0.5):
                return await getattr(self._client(endpoint), method)(*args, **kwargs)
        except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                TimeoutError) as err:  # fmt: skip
            raise _Unanswered(err) from err
        except aetcd.exceptions.ClientError as err:
            if _transient(err):
                # No leader yet, an election: another member (or a moment
                # later) may answer. Seen in the lab with the leader's host
                # cut off: a lease renewal answered "context deadline exceeded".
                raise _Unanswered(err) from err
            raise ClusterError(f"etcd ({endpoint}) refused to {what}: {_one_line(err)}") from err

    # -- keys ------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        got = await self._call(f"read {key}", "get", key.encode(), hedged=True)
        return _entry(got.key, got) if got is not None else None

    async def get_prefix(self, prefix: str) -> list[Entry]:
        result = await self._call(f"read {prefix}*", "get_prefix", prefix.encode(), hedged=True)
        return [_entry(got.key, got) for got in result]

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        built = [_compare(c) for c in compare]
        ok, responses = await self._call(
            "run a transaction", "transaction", built, [_op(o) for o in success],
            [_op(o) for o in failure],
        )  # fmt: skip
        ops = success if ok else failure
        found: list[Entry | None] = []
        gets = iter(responses)
        for op in ops:
            response = next(gets, None)
            if isinstance(op, Get):
                kvs = response if isinstance(response, list) else []
                found.append(_entry(kvs[0][1].key, kvs[0][1]) if kvs else None)
        return TxnResult(bool(ok), found)

    # -- leases ----------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        lease = await self._call(f"grant a {ttl} s lease", "lease", ttl)
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> int:
        """Renew ``lease_id``; its remaining TTL, 0 if it has expired."""
        reply = await self._call(
            f"renew lease {lease_id:x}", "refresh_lease", lease_id, hedged=True
        )
        return int(reply.TTL) if reply is not None else 0

    async def time_to_live(self, lease_id: int) -> int:
        """The lease's remaining seconds as etcd sees them; -1 if it is gone."""
        reply = await self._call(
            f"read lease {lease_id:x}", "get_lease_info", lease_id, keys=False, hedged=True
        )
        return int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        await self._call(f"revoke lease {lease_id:x}", "revoke_lease", lease_id)

    async def close(self) -> None:
        for client in self._clients.values():
            try:
                await client.close()
            except Exception as err:  # closing must never fail ferryd's stop
                log.debug("closing etcd client: %s", err)
        self._clients.clear()


def _entry(key: bytes, got: Any) -> Entry:
    return Entry(
        key=key.decode(),
        value=bytes(got.value),
        create_revision=int(got.create_revision),
        mod_revision=int(got.mod_revision),
        lease=int(got.lease),
    )


def _compare(c: Compare) -> Any:
    built = _COMPARE[c.target](c.key.encode())
    value = c.value
    if c.op == "==":
        return built == value
    if c.op == "!=":
        return built != value
    if c.op == "<":
        return built < value
    if c.op == ">":
        return built > value
    raise ValueError(f"unknown comparison {c.op!r}")


def _op(op: Op) -> Any:
    if isinstance(op, Put):
        return aetcd.transactions.Put(op.key.encode(), op.value, lease=op.lease or None)
    if isinstance(op, Delete):
        end = aetcd.utils.prefix_range_end(op.key.encode()) if op.prefix else None
        return aetcd.transactions.Delete(op.key.encode(), range_end=end)
    return aetcd.transactions.Get(op.key.encode())


def _one_line(err: object) -> str:
    text = str(err) if err is not None else "no answer"
    return " ".join(text.split())[:300] or type(err).__name__
