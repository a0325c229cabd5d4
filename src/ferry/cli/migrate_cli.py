"""``ferry migrate``: its flags, the parameters they become, and a clean Ctrl-C."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ferry.cli.parsers import ClientFactory, Subparsers, note
from ferry.client.daemon_client import DaemonClient
from ferry.errors import FerryError, WaitTimeout

# The downtime limit a migration starts with (MigrationParams' default), known
# here without importing the migration layer into the command line.
DEFAULT_START_DOWNTIME_MS = 100


def add_migrate_parser(sub: Subparsers, client: ClientFactory) -> None:
    text = "move a domain to another host (-l: live)"
    p = sub.add_parser("migrate", help=text, description=text)
    p.set_defaults(func=lambda args: cmd_migrate(client(args), args))
    p.add_argument("-l", "--live", action="store_true", help="live migration (else stop-and-copy)")
    p.add_argument("-p", "--port", type=int, help="the target's relocation port (default 8002)")
    p.add_argument("--abort", action="store_true", help="cancel the domain's running migration")
    p.add_argument(
        "--max-downtime",
        type=int,
        metavar="MS",
        help="the longest pause the guest may see (default 500); a guest too busy to meet it "
        "keeps running here, and the migration ends with the reason",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        metavar="S",
        help="cancel a migration not converged after S seconds, the domain running here "
        "(default 180; 0: never), as xl's --abort-if-busy",
    )
    p.add_argument("--bandwidth", type=float, metavar="MBIT", help="bandwidth cap, Mbit/s")
    p.add_argument("--auto-converge", dest="auto_converge", action="store_true", default=None)
    p.add_argument("--no-auto-converge", dest="auto_converge", action="store_false")
    p.add_argument("--xbzrle", action="store_true", help="compress re-sent pages (XBZRLE)")
    p.add_argument(
        "--compression",
        choices=("auto", "zstd", "zlib", "none"),
        help="the memory stream's compression (default auto: zstd on multifd channels where "
        "the stream has TLS and this host 2 CPUs or more)",
    )
    p.add_argument(
        "--channels",
        type=int,
        metavar="N",
        help="multifd channels (default: chosen with compression; 1: one stream)",
    )
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to post-copy after the first pass: ends however busy the guest, but a "
        "link or host lost after the switch loses the domain (one stream, no compression)",
    )
    p.add_argument(
        "--copy-storage",
        action="store_true",
        help="copy the domain's writable file disks to the target while it runs (disks only "
        "this host sees; the target makes them, which must not exist there yet)",
    )
    p.add_argument(
        "--sync-writes",
        action="store_true",
        help="with --copy-storage: each guest write reaches the target's disk before it "
        "completes, so nothing is left to copy at the switch (slower writes meanwhile)",
    )
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="migrate even a disk cached in the page cache of a shared file system (risk of "
        "stale reads on the target)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("domain")
    p.add_argument("host", nargs="?")


def cmd_migrate(client: DaemonClient, args: argparse.Namespace) -> int:
    from ferry.client.migrate_view import MigrationView, summary

    if args.abort:
        client.call("migrate_abort", name=args.domain)
        print(f"abort of the migration of {args.domain} requested")
        return 0
    if not args.host:
        raise FerryError("ferry migrate: a target HOST is required (or --abort)")
    params: dict[str, Any] = {"live": args.live}
    if args.max_downtime is not None:
        # The most the convergence schedule may reach; it starts lower.
        params["max_downtime_cap_ms"] = args.max_downtime
        params["max_downtime_ms"] = min(args.max_downtime, DEFAULT_START_DOWNTIME_MS)
    if args.bandwidth is not None:
        params["bandwidth_mbit"] = args.bandwidth
    if args.auto_converge is not None:
        params["auto_converge"] = args.auto_converge
    if args.xbzrle:
        params["xbzrle"] = True
    if args.unsafe:
        params["unsafe_cache"] = True
    if args.give_up_after is not None:
        params["converge_timeout_s"] = args.give_up_after
    if args.compression is not None:
        params["compression"] = args.compression
    if args.channels is not None:
        params["channels"] = args.channels
    if args.copy_storage:
        params["copy_storage"] = True
    if args.sync_writes:
        params["sync_writes"] = True
    if args.postcopy:
        params["postcopy"] = True
        note(
            "post-copy: after the switch the domain runs on the target with pages still on "
            "this host; a link or host lost then loses the domain"
        )
    request = {"name": args.domain, "host": args.host, "port": args.port, "params": params}
    with MigrationView(args.domain, args.host) as view:
        try:
            result = client.call_stream("migrate", view.update, **request)
        except KeyboardInterrupt:
            return _abort_after_interrupt(client, args.domain)
    print(json.dumps(result) if args.json else summary(args.domain, args.host, result))
    return 0


def _abort_after_interrupt(client: DaemonClient, name: str) -> int:
    """Ctrl-C: cancel cleanly and wait until the domain is settled on the source."""
    from ferry.util.wait import wait_until_sync

    note(f"interrupted: aborting the migration of {name} ...")
    try:
        client.call("migrate_abort", name=name)
    except FerryError as err:
        note(f"ferry migrate: {err}")

    def settled() -> str | None:
        """The domain's state once it has left migrating-out ("gone" if it has no row)."""
        rows = {r["name"]: r for r in client.call("list")}
        state = rows.get(name, {}).get("state")
        return None if state == "migrating-out" else str(state or "gone")

    try:
        state = wait_until_sync(
            settled, timeout=120, what=f"{name} to leave migrating-out", interval=0.2
        )
    except WaitTimeout:
        note(f"{name} is still migrating out after 120 s; see `ferry list`")
        return 130
    note(f"migration aborted; {name} is {state} here")
    return 130
