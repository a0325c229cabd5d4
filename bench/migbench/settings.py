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
SCENARIOS: dict[str, str | None] = {"idle": None, "classic": "100mbit"}

# Targets (ratios within one run).
WALL_RATIO_MAX = 1.25
DOWNTIME_EXTRA_MAX_MS = 15.0
LINK_RATIO_MAX = 1.10
PLAYER_GAP_MAX_MS = 100.0


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
