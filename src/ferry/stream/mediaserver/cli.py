"""The command line: ``ferry-media-server --port 8888 --root /home/mp3 ...``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .access import parse_network
from .config import Config, Network
from .server import MediaServer

DESCRIPTION = "HTTP media streaming server with paced delivery (gnump3d's job)"


def _network(value: str) -> Network:
    try:
        return parse_network(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry-media-server", description=DESCRIPTION)
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--root", type=Path, default=Path("/home/mp3"))
    p.add_argument(
        "--pace", type=float, default=1.0, help="real-time rate factor; 0 disables pacing"
    )
    p.add_argument(
        "--burst", type=float, default=2.0, help="seconds of media sent at once at the start"
    )
    p.add_argument(
        "--fallback-kbps",
        type=float,
        default=400.0,
        help="assumed bitrate of media whose duration is unknown",
    )
    p.add_argument(
        "--allow",
        type=_network,
        nargs="+",
        action="extend",
        default=[],
        metavar="CIDR",
        help="serve only these client networks (default: all)",
    )
    p.add_argument(
        "--deny",
        type=_network,
        nargs="+",
        action="extend",
        default=[],
        metavar="CIDR",
        help="never serve these client networks; wins over --allow",
    )
    p.add_argument("--access-log", metavar="PATH", help="common log format; '-' for stdout")
    p.add_argument("--stats-file", type=Path, metavar="PATH", help="persist play statistics")
    p.add_argument("--idle-timeout", type=float, default=20.0)
    p.add_argument("--send-timeout", type=float, default=60.0)
    p.add_argument("--max-clients", type=int, default=256)
    p.add_argument("--max-per-client", type=int, default=16)
    p.add_argument("--request-deadline", type=float, default=10.0)
    return p


def config_from_args(argv: Sequence[str] | None) -> Config:
    args = build_parser().parse_args(argv)
    return Config(
        root=args.root,
        bind=args.bind,
        port=args.port,
        pace=args.pace,
        burst=args.burst,
        fallback_kbps=args.fallback_kbps,
        allow=list(args.allow),
        deny=list(args.deny),
        access_log=args.access_log,
        stats_file=args.stats_file,
        idle_timeout=args.idle_timeout,
        send_timeout=args.send_timeout,
        max_clients=args.max_clients,
        max_per_client=args.max_per_client,
        request_deadline=args.request_deadline,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    if not config.root.is_dir():
        print(f"ferry-media-server: media root {config.root} is not a directory", file=sys.stderr)
        return 1
    try:
        server = MediaServer(config)
    except OSError as err:
        print(
            f"ferry-media-server: cannot listen on {config.bind}:{config.port}: {err}",
            file=sys.stderr,
        )
        return 1

    def stop(_signum: int, _frame: Any) -> None:
        # shutdown() waits for serve_forever, so it must run outside the signal handler's thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"ferry-media-server: serving {config.root} on {server.address()}",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0
