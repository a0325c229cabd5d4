"""``ferry host``: the cluster's hosts, their health, lease and capacity; maintenance."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from ferry.cli.parsers import ClientFactory, Subparsers
from ferry.errors import FerryError


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


def add_host_parser(sub: Subparsers, client: ClientFactory) -> None:
    host = sub.add_parser("host", help="the cluster's hosts: health, lease, capacity")
    actions = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")

    def cmd_list(args: argparse.Namespace) -> int:
        rows = client(args).call("host_list")
        print(json.dumps(rows, indent=1) if args.json else format_hosts(rows))
        return 0

    p = actions.add_parser("list", help="every host of the cluster, as etcd knows it")
    p.set_defaults(func=cmd_list)
    p.add_argument("--json", action="store_true")

    def cmd_evacuate(args: argparse.Namespace) -> int:
        _aim_at(args, args.host)
        view = EvacuationView(args.host)
        with view:
            result = client(args).call_stream(
                "evacuate", view.update, host=args.host, to=args.to, parallel=args.parallel,
                params={"live": True} | _copy_settings(args),
            )  # fmt: skip
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(evacuation_summary(result))
        return 1 if result.get("failed") or result.get("left") else 0

    p = actions.add_parser(
        "evacuate",
        help="put a host in maintenance and live-migrate all its domains away",
        description="put HOST in maintenance (no new domains there) and live-migrate every "
        "domain it runs to the other hosts; a failed migration leaves that domain on HOST",
    )
    p.set_defaults(func=cmd_evacuate)
    p.add_argument("host")
    p.add_argument("--to", action="append", default=[], metavar="HOST", help="only to HOST")
    p.add_argument("--parallel", type=int, default=2, help="migrations at once (default 2)")
    p.add_argument(
        "--copy-storage",
        action="store_true",
        help="copy the writable file disks of each domain along (disks only HOST sees; as "
        "ferry migrate --copy-storage)",
    )
    p.add_argument(
        "--sync-writes", action="store_true", help="with --copy-storage: as ferry migrate's"
    )
    p.add_argument("--json", action="store_true")

    def cmd_activate(args: argparse.Namespace) -> int:
        client(args).call("host_activate", host=args.host)
        print(f"host {args.host} is out of maintenance: it takes domains again")
        return 0

    p = actions.add_parser("activate", help="end a host's maintenance")
    p.set_defaults(func=cmd_activate)
    p.add_argument("host")


def _aim_at(args: argparse.Namespace, host: str) -> None:
    """From a station, the request goes to HOST's own ferryd (same port as --host)."""
    remote = args.remote_host or os.environ.get("FERRY_HOST")
    if remote and not args.connect:
        _, _, port = remote.rpartition(":") if remote.count(":") == 1 else ("", "", "")
        args.remote_host = f"{host}:{port}" if port else host


def evacuation_summary(result: dict[str, Any]) -> str:
    lines = [f"host {result['host']} is in maintenance"]
    for moved in result.get("moved", []):
        lines.append(f"  {moved['domain']} -> {moved['target']} in {moved['total_s']:.1f} s")
    for failed in result.get("failed", []):
        lines.append(f"  {failed['domain']} stays on {result['host']}: {failed['error']}")
    left = result.get("left", [])
    lines.append(
        f"still on {result['host']}: {', '.join(left)}" if left else f"{result['host']} is empty"
    )
    return "\n".join(lines)


class EvacuationView:
    """One line per domain, updated in place while the migrations run (a terminal only)."""

    def __init__(self, host: str) -> None:
        # Here, not at the top: every `ferry` command builds this module's parser.
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self.host = host
        self.rows: dict[str, str] = {}
        self.live = Live(console=self.console, transient=True, auto_refresh=False)

    def __enter__(self) -> EvacuationView:
        if self.console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.live.stop()

    def update(self, p: dict[str, Any]) -> None:
        event, name = p.get("event"), str(p.get("domain", ""))
        if event == "start":
            self.rows[name] = f"-> {p['target']}: connecting"
        elif event == "progress":
            total = max(int(p.get("total") or 0), 1)
            done = 100 * (total - int(p.get("remaining") or 0)) // total
            self.rows[name] = f"-> {p['target']}: {p.get('phase', '')} {done}%"
        elif event == "done":
            self.rows[name] = f"-> {p['target']}: moved in {p['total_s']:.1f} s"
        elif event == "failed":
            self.rows[name] = f"-> {p['target']}: FAILED, stays on {self.host}"
        if self.console.is_terminal:
            from rich.table import Table

            table = Table("Domain", "Migration", box=None, title=f"evacuating {self.host}")
            for row_name, text in self.rows.items():
                table.add_row(row_name, text)
            self.live.update(table, refresh=True)


def _copy_settings(args: argparse.Namespace) -> dict[str, bool]:
    """--copy-storage and --sync-writes, as migration settings."""
    if args.sync_writes and not args.copy_storage:
        raise FerryError("--sync-writes is a setting of --copy-storage")
    settings = {"copy_storage": True} if args.copy_storage else {}
    return settings | ({"sync_writes": True} if args.sync_writes else {})
