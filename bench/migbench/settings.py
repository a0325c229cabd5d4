"""What the benchmark holds fixed, and its log line.

The guest and hosts, the bare side's port and taps, the migration settings
ferry uses (so that the bare side uses them too), the clip, the scenarios and
the targets.
"""

from __future__ import annotations

import time

from ferry.lab import topology

VM = topology.VM_NAME
HOSTS = ("xen_host_1", "xen_host_2")
BARE_PORT = 8004  # ferryd holds 8002 (relocation) and 8003 (control API)
BARE_TAPS = {"xen_host_1": "bare1.0", "xen_host_2": "bare2.0"}
DOWNTIME_LIMIT_MS = 100  # ferry's default max downtime (MigrationParams)
MAX_BANDWIDTH = 1 << 40  # what ferry sets for "no cap"
CLIP = "http://virt_server:8888/clip.ogg"
CLIP_S = 30.0
PLAYER_LEAD_S = 4.0  # the player fills its buffer before the migration starts
SCENARIOS: dict[str, str | None] = {"idle": None, "classic": "100mbit", "busy": "100mbit"}
# busy: the guest dirties incompressible pages at twice the 100 Mbit link.
BUSY_RATE_MIB = 25.0
BUSY_WSS_MIB = 96
BARE_GIVE_UP_S = 120.0  # a bare pre-copy still running then is cancelled
BUSY_WALL_MAX_S = 60.0
BUSY_DOWNTIME_MAX_MS = 500.0

# ferry's variants (``ferry migrate -l`` plus these flags): no flags, and
# the post-copy opt-in where pre-copy has the most trouble.
FERRY_VARIANTS: dict[str, list[str]] = {"ferry": [], "ferry_postcopy": ["--postcopy"]}
POSTCOPY_SCENARIOS = ("busy",)

# The bare side's variants: QEMU's default transport, and the same with the
# stream ferry chooses by default (multifd, 2 channels, zstd; no TLS), so that
# what compression gives and what the toolstack adds are told apart.
BARE_VARIANTS: dict[str, dict[str, int | str]] = {
    "bare": {},
    "bare_zstd": {"multifd-channels": 2, "multifd-compression": "zstd"},
}

# libvirt's variants (``virsh migrate --live --p2p`` plus these flags): its
# defaults, and its best flags here: multifd with ferry's channel count and
# XBZRLE (libvirt 9.0 refuses zstd: "Unsupported compression method").
LIBVIRT_VARIANTS: dict[str, list[str]] = {
    "libvirt": [],
    "libvirt_best": ["--parallel", "--parallel-connections", "2", "--compressed"],
}
LIBVIRT_SCENARIOS = ("idle", "classic")  # busy would only repeat bare's unfinished runs

# Targets (issue 11; ratios within one run).
CLASSIC_WALL_RATIO_MAX = 0.5  # ferry's wall <= 0.5 x bare's default
SWITCHOVER_MAX_MS = 60.0  # STOP -> RESUME, median
PLAYER_GAP_MAX_MS = 150.0  # the worst ferry rep
IDLE_WALL_RATIO_MAX = 1.5  # ferry's wall <= 1.5 x bare's incl. the target's launch
CONTROL_OVERHEAD_MAX_S = 0.2
LIBVIRT_WALL_RATIO_MAX = 0.5  # classic: ferry's wall <= 0.5 x libvirt's default


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
