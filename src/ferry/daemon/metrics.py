"""ferryd's Prometheus endpoint: the collectors read at scrape time, and a small HTTP server.

Event counts (migrations, refusals) are ``ferry.util.metrics.Metrics``; what
is a state is read here when Prometheus asks, from its one owner: the domain
table, and the fencer's status file for the lease (its counters are the
fencer's, as of its last write).

The server runs on ferryd's event loop, so a scrape reads the table between
two of its changes, never during one (prometheus_client's own server runs in
a thread). It serves ``GET /metrics`` and nothing else, plain HTTP as
Prometheus scrapes by default: on 127.0.0.1 unless the host config says
otherwise. No label carries a domain's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ferry import __version__
from ferry.cluster.lease import LeaseState
from ferry.cluster.lease_status import LeaseView
from ferry.config.host import MetricsConfig
from ferry.daemon.listener import listening_socket
from ferry.domain.state import DomainState
from ferry.errors import FerryError
from ferry.host.table import DomainTable
from ferry.util.metrics import Metrics

log = logging.getLogger("ferryd")

FENCING_EVENTS = ("stopped", "continued", "killed")
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
MAX_CONNECTIONS = 16


class DomainStates(Collector):
    def __init__(self, table: DomainTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        states = Counter(d.record.state for d in self.table.everyone())
        gauge = GaugeMetricFamily(
            "ferry_domains", "Domains on this host (arriving ones too), by state", labels=["state"]
        )
        for state in DomainState:
            gauge.add_metric([state.value], states[state])
        yield gauge
        memory = GaugeMetricFamily(
            "ferry_domains_memory_mib",
            "Memory of this host's domains, as configured (arriving and leaving ones too)",
        )
        everyone = [*self.table.everyone(), *self.table.leaving()]
        memory.add_metric([], sum(d.record.config.memory for d in everyone))
        yield memory


class HostInfo(Collector):
    def __init__(self, host: str) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "ferry_host_info", "This ferryd: its host name and version", labels=["host", "version"]
        )
        info.add_metric([self.host, __version__], 1)
        yield info


class LeaseMetrics(Collector):
    """The host lease and fencing, from the fencer's status file (cluster hosts only)."""

    def __init__(self, view: LeaseView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        status = self.view.status()
        state = self.view.state
        gauge = GaugeMetricFamily(
            "ferry_lease_state", "The host lease's state as ferryd judges it", labels=["state"]
        )
        for each in LeaseState:
            gauge.add_metric([each.value], 1 if each is state else 0)
        yield gauge
        remaining = GaugeMetricFamily(
            "ferry_lease_remaining_seconds", "How long the host lease is valid without a renewal"
        )
        remaining.add_metric([], round(self.view.remaining(), 3))
        yield remaining
        renewals = CounterMetricFamily(
            "ferry_lease_renewals", "Renewals of the host lease, by result", labels=["result"]
        )
        counts = status.renewals if status else {}
        for result in ("ok", "failed"):
            renewals.add_metric([result], counts.get(result, 0))
        yield renewals
        events = CounterMetricFamily(
            "ferry_fencing_events",
            "What fencing did to this host's QEMUs: stopped (lease expiring), "
            "continued (renewed in time), killed (lease lost)",
            labels=["event"],
        )
        done = status.event_counts if status else {}
        for kind in FENCING_EVENTS:
            events.add_metric([kind], done.get(kind, 0))
        yield events
        fenced = GaugeMetricFamily(
            "ferry_fenced_qemus", "QEMUs the fencer holds stopped now (SIGSTOP)"
        )
        fenced.add_metric([], len(status.stopped) if status else 0)
        yield fenced


class MetricsServer:
    def __init__(self, config: MetricsConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self) -> None:
        address = self.config.address
        try:
            sock = listening_socket(address, self.config.port)
        except OSError as err:
            where = f"{address or '*'}:{self.config.port}"
            raise FerryError(f"cannot listen for metrics on {where}: {err.strerror}") from err
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST)
        if not _is_loopback(address):
            log.warning(
                "metrics on %s:%d are plain HTTP: whoever reaches that address reads "
                "this host's counts (never a domain's name)",
                address or "every address",
                self.port,
            )
        log.info("metrics on http://%s:%d/metrics", address or "0.0.0.0", self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()
            return
        async with self._slots:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                status, body, kind = self._answer(head)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, body, kind = "400 Bad Request", b"bad request\n", "text/plain"
            except (ConnectionError, OSError):
                writer.close()
                return
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        words = head.split(b"\r\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, target = words[0], words[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return "404 Not Found", b"only /metrics is served here\n", "text/plain"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        return "200 OK", generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def register_state(
    metrics: Metrics, host: str, table: DomainTable, lease: LeaseView | None
) -> None:
    """Add the scrape-time collectors of this daemon's state to its registry."""
    metrics.registry.register(HostInfo(host))
    metrics.registry.register(DomainStates(table))
    if lease is not None:
        metrics.registry.register(LeaseMetrics(lease))
