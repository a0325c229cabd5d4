"""The client side of the guest's witness service (port 8890): status, writes, ledger.

Run inside a lab namespace (``python -m ferry.lab.witness status virt_server``)
to learn whether the guest rebooted, to keep acknowledged disk writes flowing
during a migration, and to check afterwards that none was lost or doubled.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PORT = 8890


def _request(host: str, method: str, path: str, timeout: float) -> bytes:
    conn = http.client.HTTPConnection(host, PORT, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"{method} {path} on {host}: HTTP {response.status}")
        return body
    finally:
        conn.close()


def status(host: str, timeout: float = 5.0) -> dict[str, Any]:
    data = json.loads(_request(host, "GET", "/status", timeout))
    assert isinstance(data, dict)
    return data


def ledger(host: str, timeout: float = 10.0) -> list[int]:
    return [int(x) for x in _request(host, "GET", "/ledger", timeout).split()]


def append_loop(host: str, out: Path, interval: float, duration: float) -> int:
    """Append records for ``duration`` seconds; log each acknowledged number to ``out``.

    A request that fails or times out is not acknowledged: the record may or
    may not be on the disk, and the check allows for exactly that.
    """
    acked = 0
    deadline = time.monotonic() + duration
    with out.open("a") as log:
        while time.monotonic() < deadline:
            try:
                record = json.loads(_request(host, "POST", "/append", timeout=5))["record"]
                log.write(f"{record}\n")
                log.flush()
                acked += 1
            except (OSError, ValueError, KeyError):
                log.write("?\n")  # an unanswered request: at most one record unaccounted
                log.flush()
            time.sleep(interval)
    return acked


def check_ledger(acked: Sequence[str], written: Sequence[int]) -> list[str]:
    """Problems, if any: an acknowledged record missing or any record doubled or out of order."""
    problems = []
    numbers = [int(x) for x in acked if x.strip().isdigit()]
    unanswered = sum(1 for x in acked if x.strip() == "?")
    if written != list(range(1, len(written) + 1)):
        problems.append(f"the ledger is not 1..{len(written)} in order: it has {written[:20]}...")
    missing = sorted(set(numbers) - set(written))
    if missing:
        problems.append(f"acknowledged records lost: {missing[:20]}")
    extra = len(written) - len(set(numbers))
    if extra > unanswered:
        problems.append(f"{extra} records on disk were never requested ({unanswered} unanswered)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferry.lab.witness")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status").add_argument("host")
    sub.add_parser("ledger").add_argument("host")
    p = sub.add_parser("append")
    p.add_argument("host")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            print(json.dumps(status(args.host)))
        elif args.command == "ledger":
            print("\n".join(str(n) for n in ledger(args.host)))
        else:
            print(append_loop(args.host, args.out, args.interval, args.duration))
    except OSError as err:
        print(f"witness: {args.host}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
