"""``ferry disk``: disk images in a host's storage roots, made by its ferryd."""

from __future__ import annotations

import argparse
import json

from ferry.cli.parsers import ClientFactory, Subparsers


def add_disk_parser(sub: Subparsers, client: ClientFactory) -> None:
    disk = sub.add_parser("disk", help="disk images in the host's storage roots")
    actions = disk.add_subparsers(dest="disk_command", required=True, metavar="ACTION")

    def cmd_create(args: argparse.Namespace) -> int:
        made = client(args).call("disk_create", path=args.path, size=args.size, format=args.format)
        if args.json:
            print(json.dumps(made, indent=1))
        else:
            print(f"created {made['path']}: {made['format']}, {made['size']} bytes")
        return 0

    p = actions.add_parser(
        "create",
        help="a new empty disk image (never over an existing file)",
        description="create an empty raw or qcow2 image at PATH, inside one of the host's "
        "storage roots; an existing file is never overwritten",
    )
    p.set_defaults(func=cmd_create)
    p.add_argument("path", help="absolute path inside a storage root")
    p.add_argument("size", help="10G, 512M, or bytes")
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    p.add_argument("--json", action="store_true")
