"""What ``query-migrate`` says, in one immutable record per sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    status: str  # QEMU's: setup, active, device, completed, failed, cancelled ...
    elapsed_s: float
    transferred: int  # bytes sent so far
    remaining: int  # RAM bytes still to send
    total: int  # guest RAM
    rate_mbit: float  # QEMU's current throughput
    dirty_rate: float  # pages dirtied per second
    passes: int  # dirty-sync count: 1 is the first full pass
    downtime_ms: int | None  # once completed
    expected_downtime_ms: int | None
    setup_ms: int | None
    throttle_pct: int = 0  # auto-converge's vCPU throttle
    postcopy_requests: int = 0  # pages the target asked for after a post-copy switch

    @property
    def eta_s(self) -> float | None:
        if self.rate_mbit <= 0:
            return None
        return self.remaining * 8 / (self.rate_mbit * 1_000_000)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self) | {"eta_s": self.eta_s}

    @classmethod
    def from_qmp(cls, info: Any) -> Progress:
        info = info if isinstance(info, dict) else {}
        ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
        return cls(
            status=str(info.get("status", "none")),
            elapsed_s=float(info.get("total-time", 0)) / 1000,
            transferred=int(ram.get("transferred", 0)),
            remaining=int(ram.get("remaining", 0)),
            total=int(ram.get("total", 0)),
            rate_mbit=float(ram.get("mbps", 0.0)),
            dirty_rate=float(ram.get("dirty-pages-rate", 0)),
            passes=int(ram.get("dirty-sync-count", 0)),
            downtime_ms=_opt_int(info.get("downtime")),
            expected_downtime_ms=_opt_int(info.get("expected-downtime")),
            setup_ms=_opt_int(info.get("setup-time")),
            throttle_pct=int(info.get("cpu-throttle-percentage", 0) or 0),
            postcopy_requests=int(ram.get("postcopy-requests", 0) or 0),
        )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
