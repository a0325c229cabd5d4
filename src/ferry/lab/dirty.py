"""The client side of the guest's write workload (port 8891): start, stop, status.

Run inside a lab namespace (``python -m ferry.lab.dirty start virt_server --rate 25
--wss 96``) to make the guest dirty its RAM faster than the link can send it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from collections.abc import Sequence
from typing import Any

PORT = 8891


def _request(host: str, method: str, path: str, timeout: float = 10.0) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, PORT, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = json.loads(response.read())
        if response.status != 200:
            raise OSError(f"{method} {path} on {host}: HTTP {response.status}: {body}")
        assert isinstance(body, dict)
        return body
    finally:
        conn.close()


def start(host: str, rate_mib: float, wss_mib: int, disk: bool = False) -> dict[str, Any]:
    """Dirty the guest's RAM (or, ``disk``, a file on its disk) at ``rate_mib``."""
    query = f"rate_mib={rate_mib:g}&wss_mib={wss_mib}" + ("&disk=1" if disk else "")
    return _request(host, "POST", f"/start?{query}")


def stop(host: str) -> dict[str, Any]:
    return _request(host, "POST", "/stop")


def status(host: str) -> dict[str, Any]:
    return _request(host, "GET", "/status")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferry.lab.dirty", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start")
    p.add_argument("host")
    p.add_argument("--rate", type=float, default=25.0, help="MiB/s of pages dirtied")
    p.add_argument("--wss", type=int, default=96, help="working set, MiB")
    p.add_argument("--disk", action="store_true", help="write a file on the guest's disk")
    for name in ("stop", "status"):
        sub.add_parser(name).add_argument("host")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            result = start(args.host, args.rate, args.wss, args.disk)
        else:
            result = stop(args.host) if args.cmd == "stop" else status(args.host)
    except (OSError, ValueError) as err:
        print(f"ferry.lab.dirty: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
