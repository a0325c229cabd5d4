"""``ferry dashboard``: the cluster live in a browser, with the operator's own credentials."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from ferry.cli.parsers import ClientFactory, Subparsers, note
from ferry.errors import PkiError

# Where the operator's credentials are (--pki, $FERRY_PKI, ...): the CLI's rule.
PkiDir = Callable[[argparse.Namespace], Path]


def add_dashboard_parser(sub: Subparsers, client: ClientFactory, pki_dir: PkiDir) -> None:
    text = "serve a live page of the cluster on localhost (hosts, domains, migrations)"
    p = sub.add_parser("dashboard", help=text, description=text)
    p.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS", help="a loopback address")
    p.add_argument("--port", type=int, default=8780, help="default 8780 (0: any free port)")
    p.add_argument(
        "--player-status", type=Path, metavar="FILE",
        help="chart the buffer of a player writing this status file (ferry watch --status-file)",
    )  # fmt: skip
    # A listening socket made by whoever started us (ferry demo --dashboard).
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda args: cmd_dashboard(client, pki_dir, args))


def cmd_dashboard(client: ClientFactory, pki_dir: PkiDir, args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from ferry.dashboard.cluster_view import ClusterView, Source
    from ferry.dashboard.server import serve
    from ferry.pki.credentials import Credentials

    source = Source(first=lambda: client(args))
    remote = args.remote_host or os.environ.get("FERRY_HOST")
    directory = pki_dir(args)
    if remote or directory.joinpath("cert.pem").exists():
        try:
            credentials = Credentials(directory)
            role = credentials.identity.role.value
        except PkiError as err:
            if remote:
                raise
            note(f"note: no operator credentials ({err}): other hosts' migrations not shown")
        else:
            if role in ("admin", "viewer"):
                source.credentials, source.role = credentials, role
            elif remote:
                raise PkiError(f"the certificate in {directory} is a {role}'s, not an operator's")
    if remote and source.credentials is None:
        raise PkiError("no operator credentials for --host")

    def ready(url: str) -> None:
        note(f"ferry dashboard: {url} ({source.role}); Ctrl-C ends it")

    view = ClusterView(source, args.player_status)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(view, args.listen, args.port, ready, args.listen_fd))
    return 0
