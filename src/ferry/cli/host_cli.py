"""``ferry host``: the cluster's hosts, their health, lease and capacity; maintenance."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from ferry.client.daemon_client import DaemonClient

ClientFactory = Callable[[argparse.Namespace], DaemonClient]


def format_hosts(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'Host':<16} {'Health':<8} {'Maint':<5} {'Lease(s)':>8} {'Domains':>7} {'CPUs':>4} "
        f"{'Free/Total MiB':>15}  Mode"
    ]
    for r in rows:
        left, ttl = r.get("lease_ttl_left"), r.get("lease_ttl")
        lease = f"{left}/{ttl}" if isinstance(left, int) and left >= 0 and ttl else "-"
        free, total = r.get("free_mib"), r.get("memory_mib")
        memory = f"{free}/{total}" if free is not None and total else "-"
        maint = "yes" if r.get("maintenance") else "no"
        lines.append(
            f"{r['host']:<16} {r.get('health', '-'):<8} {maint:<5} "
            f"{lease:>8} {r.get('domains', '-')!s:>7} {r.get('cpus') or '-'!s:>4} {memory:>15}  "
            f"{r.get('mode', '')}"
        )
    return "\n".join(lines)


def add_host_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: ClientFactory
) -> None:
    host = sub.add_parser("host", help="the cluster's hosts: health, lease, capacity")
    actions = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")

    def cmd_list(args: argparse.Namespace) -> int:
        rows = client(args).call("host_list")
        print(json.dumps(rows, indent=1) if args.json else format_hosts(rows))
        return 0

    p = actions.add_parser("list", help="every host of the cluster, as etcd knows it")
    p.set_defaults(func=cmd_list)
    p.add_argument("--json", action="store_true")
