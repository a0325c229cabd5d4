"""Migration settings: per call, with host defaults, checked in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ferry.errors import ConfigError

COMPRESSIONS = ("auto", "zstd", "zlib", "none")
MAX_CHANNELS = 16


@dataclass(frozen=True)
class MigrationParams:
    live: bool = True
    # QEMU's default of 300 ms is more than a viewer tolerates. Below about
    # 100 ms QEMU's own estimate, which is cautious, never lets a lightly busy
    # guest converge over 100 Mbit (measured: 200 passes at 50 ms); at 100 ms
    # it converges in a few passes and the real stop lasts about half that.
    max_downtime_ms: int = 100
    bandwidth_mbit: float = 0.0  # 0: no cap beyond the link
    auto_converge: bool = True
    xbzrle: bool = False
    # No progress in the memory stream for this long: the link is taken as
    # cut and the migration is cancelled (QEMU itself would wait for TCP's
    # retransmission timeout, minutes).
    stall_timeout_s: float = 10.0
    # Not converging (ferry.migration.convergence): the downtime limit steps up
    # its schedule after stall_passes passes whose dirty memory did not shrink,
    # or converge_after_s seconds after the last step, up to
    # max_downtime_cap_ms (`ferry migrate --max-downtime`); after
    # converge_timeout_s (0: never) the migration is cancelled with the reason.
    converge_after_s: float = 20.0
    max_downtime_cap_ms: int = 500  # below max_downtime_ms: the limit never steps
    stall_passes: int = 2
    converge_timeout_s: float = 180.0
    # auto-converge's first vCPU throttle (raised from the measured rates by
    # ferry.migration.convergence) and its step (QEMU: 20, 10). QEMU throttles
    # only after two passes that dirtied more than half of what they sent, and
    # steps every two passes after: a bigger step reaches a working throttle
    # in fewer of those long passes.
    throttle_initial_pct: int = 30
    throttle_increment_pct: int = 25
    # Migrate a disk whose cache mode keeps data in the page cache of a file
    # system shared between hosts (see ferry.storage.cache_safety): the
    # operator says the risk is taken, as virsh migrate --unsafe.
    unsafe_cache: bool = False
    # The memory stream's compression: "auto" (ferry chooses, see
    # ferry.migration.stream_plan), "zstd", "zlib" or "none". Compression
    # rides on multifd, whose channels need TLS to be gated.
    compression: str = "auto"
    # multifd channels: 0 lets ferry choose (with compression), 1 keeps one
    # stream, 2..16 force multifd with that many channels.
    channels: int = 0
    # Post-copy (`ferry migrate --postcopy`), an opt-in with a weaker
    # guarantee: after the first pre-copy pass the VM switches to the target,
    # which fetches the pages it still lacks from the source. The target
    # commits before the switch, and from then on a cut link or a dead host
    # loses the VM (ferry does not drive QEMU's post-copy recovery). Its gain:
    # the migration ends after one pass however fast the guest dirties memory.
    postcopy: bool = False
    # Copy the domain's writable file disks to the target while it runs
    # (`ferry migrate --copy-storage`), for disks only the source sees: the
    # target makes empty ones of the same size and format and exports them
    # over NBD (TLS, admitting the source only); the source mirrors into
    # them, and disk and RAM switch over together at the held switchover.
    copy_storage: bool = False
    # How the mirror keeps up with the guest's writes once the bulk is copied:
    # in the background (the guest never waits on the link, but what it wrote
    # since the last round is copied while it is stopped at the switch), or
    # synchronously (`--sync-writes`: each guest write also reaches the target
    # before it completes, so nothing is left for the switch).
    sync_writes: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        # A target from before these refuses settings it does not know.
        for optional in ("postcopy", "copy_storage", "sync_writes"):
            if not wire[optional]:
                del wire[optional]
        return wire

    @classmethod
    def from_wire(
        cls, data: Mapping[str, Any], source: str = "migration settings"
    ) -> MigrationParams:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown setting '{unknown[0]}'")
        params = replace(cls(), **{k: _coerce(k, v, source) for k, v in data.items()})
        params.check(source)
        return params

    def check(self, source: str = "migration settings") -> None:
        if not 1 <= self.max_downtime_ms <= 60_000:
            raise ConfigError(
                f"{source}: max_downtime_ms {self.max_downtime_ms} is not in 1..60000"
            )
        if self.bandwidth_mbit < 0:
            raise ConfigError(f"{source}: bandwidth_mbit must not be negative")
        if self.stall_timeout_s <= 0 or self.converge_after_s <= 0:
            raise ConfigError(f"{source}: timeouts must be positive")
        if self.converge_timeout_s < 0 or self.stall_passes < 1:
            raise ConfigError(f"{source}: converge_timeout_s >= 0 and stall_passes >= 1 please")
        if not (1 <= self.throttle_initial_pct <= 99 and 1 <= self.throttle_increment_pct <= 99):
            raise ConfigError(f"{source}: throttle percentages must be in 1..99")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"{source}: compression {self.compression!r} is not one of "
                f"{', '.join(COMPRESSIONS)}"
            )
        if not 0 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(f"{source}: channels {self.channels} is not in 0..{MAX_CHANNELS}")
        if self.channels == 1 and self.compression not in ("auto", "none"):
            raise ConfigError(f"{source}: compression {self.compression} needs 2 or more channels")
        if self.postcopy and (self.channels >= 2 or self.compression in ("zstd", "zlib")):
            raise ConfigError(
                f"{source}: postcopy runs on one stream without compression (QEMU 7.2 refuses "
                "post-copy with multifd channels)"
            )
        if self.sync_writes and not self.copy_storage:
            raise ConfigError(f"{source}: sync_writes is a setting of copy_storage")
        if self.postcopy and self.copy_storage:
            raise ConfigError(
                f"{source}: postcopy and copy_storage do not go together (the disks would "
                "switch before the memory, and a broken link would leave neither host whole)"
            )

    @property
    def multifd(self) -> bool:
        """The stream runs on several channels (resolved settings only)."""
        return self.channels >= 2

    def capabilities(self) -> dict[str, bool]:
        """QEMU capabilities for the source."""
        return {
            "auto-converge": self.auto_converge,
            "xbzrle": self.xbzrle,
            "events": True,
            "multifd": self.multifd,
            "postcopy-ram": self.postcopy,
            # The source stops before the switch and waits for ferry: the
            # target commits there (post-copy), or the disks' mirrors end
            # there (copy_storage), while the source can still take the VM back.
            "pause-before-switchover": self.postcopy or self.copy_storage,
        }

    def qemu_parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {"downtime-limit": self.max_downtime_ms}
        # QEMU caps at 128 MiB/s by default; "no cap" must be said explicitly.
        bandwidth = self.bandwidth_mbit * 1_000_000 / 8 if self.bandwidth_mbit else 1 << 40
        params["max-bandwidth"] = int(bandwidth)
        params["cpu-throttle-initial"] = self.throttle_initial_pct
        params["cpu-throttle-increment"] = self.throttle_increment_pct
        return params | self.multifd_parameters()

    def multifd_parameters(self) -> dict[str, Any]:
        """What both ends must agree on before the stream starts."""
        if not self.multifd:
            return {}
        if self.compression == "auto":
            raise ConfigError("migration settings: compression 'auto' was not resolved")
        return {"multifd-channels": self.channels, "multifd-compression": self.compression}


def _coerce(key: str, value: Any, source: str) -> Any:
    default = getattr(MigrationParams(), key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, not {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: '{key}' must be a number, not {value!r}")
    return int(value) if isinstance(default, int) else float(value)
