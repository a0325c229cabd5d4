"""The server's settings, as the command line gives them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Config:
    root: Path = Path("/home/mp3")
    bind: str = "0.0.0.0"
    port: int = 8888
    pace: float = 1.0
    burst: float = 2.0
    fallback_kbps: float = 400.0
    allow: list[Network] = field(default_factory=list)
    deny: list[Network] = field(default_factory=list)
    access_log: str | None = None
    stats_file: Path | None = None
    idle_timeout: float = 20.0
    send_timeout: float = 60.0
    max_clients: int = 256
    # The whole request head (line and headers) must arrive within this: a
    # per-read timeout alone lets a client dribble a byte a second for ever.
    request_deadline: float = 10.0
    max_per_client: int = 16
