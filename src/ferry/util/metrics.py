"""ferryd's Prometheus metrics that events feed: one registry per daemon.

The parts that see an event (the source driver, the relocation server) are
handed this object and call one method; nothing else in ferry touches
``prometheus_client``. What is a state rather than an event (domains by
state, the host lease) is read at scrape time by collectors in
``ferry.daemon.metrics``, so it can never drift from the state's one owner.

Labels come from small fixed sets only (outcomes, refusal reasons), never
from names or messages: a label per domain would grow without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from ferry.errors import REFUSAL_REASONS

# How an outgoing migration ended, from the source's side.
OUTCOMES = (
    "completed",  # the target runs the domain
    "kept",  # it failed before the commit: the domain runs here as before
    "aborted",  # the operator cancelled it: the domain runs here as before
    "in_doubt",  # the commit's answer was lost: held paused here until it is known
    "lost",  # post-copy broke after the commit (the opt-in's weaker guarantee)
)

# Seconds: from a sub-second idle guest to a busy one that takes minutes.
TOTAL_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# STOP -> RESUME: the switchover the guest's clients see.
DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
# No ``*_created`` series beside each counter: they double the exposition
# and say only when ferryd started. (A process-wide switch; ferryd is the process.)
disable_created_metrics()  # type: ignore[no-untyped-call]

MIB = 1 << 20
BYTES_BUCKETS = tuple(float(n * MIB) for n in (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.migrations = Counter(
            "ferry_migrations",
            "Outgoing live migrations that ended, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.total = Histogram(
            "ferry_migration_duration_seconds",
            "Completed outgoing migrations: from the request to the target running the domain",
            buckets=TOTAL_BUCKETS,
            registry=self.registry,
        )
        self.downtime = Histogram(
            "ferry_migration_downtime_seconds",
            "Completed outgoing migrations: the source's STOP to the target's RESUME",
            buckets=DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.bytes = Histogram(
            "ferry_migration_bytes",
            "Completed outgoing migrations: the bytes the memory stream carried",
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "ferry_relocation_refusals",
            "Relocation requests this host refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        # Every label value from the start: a rate over a series that appears
        # only at its first event misses that event.
        for outcome in OUTCOMES:
            self.migrations.labels(outcome)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)

    def migration_ended(
        self,
        outcome: str,
        total_s: float | None = None,
        downtime_ms: float | None = None,
        bytes_sent: int | None = None,
    ) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown migration outcome {outcome!r}")
        self.migrations.labels(outcome).inc()
        if total_s is not None:
            self.total.observe(total_s)
        if downtime_ms is not None:
            self.downtime.observe(downtime_ms / 1000)
        if bytes_sent is not None:
            self.bytes.observe(bytes_sent)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason if reason in REFUSAL_REASONS else "other").inc()
