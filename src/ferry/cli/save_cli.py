"""``ferry save DOMAIN FILE`` and ``ferry restore FILE``, as xm had them."""

from __future__ import annotations

import argparse
import json
import os

from ferry.cli.parsers import ClientFactory, Subparsers
from ferry.errors import FerryError


def add_save_parsers(sub: Subparsers, client: ClientFactory) -> None:
    text = "save a domain's memory to a file on its host, then end it there (xm save)"
    p = sub.add_parser("save", help=text, description=text)
    p.add_argument("--json", action="store_true")
    p.add_argument("domain")
    p.add_argument("file", metavar="FILE", help="a new file (never overwritten), 0600")
    p.set_defaults(func=lambda args: cmd_save(client, args))

    text = "start a saved domain again, on any host that sees its disks (xm restore)"
    p = sub.add_parser("restore", help=text, description=text)
    p.add_argument("--json", action="store_true")
    p.add_argument("file", metavar="FILE", help="a file written by ferry save")
    p.set_defaults(func=lambda args: cmd_restore(client, args))


def host_path(args: argparse.Namespace, path: str) -> str:
    """The path as ferryd must see it: a remote host has no idea of our directory."""
    if os.path.isabs(path):
        return path
    if args.remote_host or os.environ.get("FERRY_HOST"):
        raise FerryError(f"{path}: give an absolute path on the remote host")
    return os.path.abspath(path)


def cmd_save(client: ClientFactory, args: argparse.Namespace) -> int:
    result = client(args).call("save", name=args.domain, path=host_path(args, args.file))
    if args.json:
        print(json.dumps(result))
    else:
        mib = result["bytes"] / (1 << 20)
        print(f"Saved domain {result['name']} to {result['path']} "
              f"({mib:.1f} MiB in {result['seconds']:.2f} s)")  # fmt: skip
    return 0


def cmd_restore(client: ClientFactory, args: argparse.Namespace) -> int:
    result = client(args).call("restore", path=host_path(args, args.file))
    if args.json:
        print(json.dumps(result))
    else:
        how = "running" if result["running"] else "paused, as saved"
        print(f"Restored domain {result['name']} (id={result['id']}, {how}) "
              f"in {result['seconds']:.2f} s")  # fmt: skip
    return 0
