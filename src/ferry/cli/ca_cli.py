"""``ferry ca``: the cluster CA, kept on the management station."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ferry.pki.ca import CertificateAuthority

# ferry.pki.ca is imported by the commands, not here: every `ferry` command
# builds this parser, and cryptography takes 60 ms to import.


def _dir(args: argparse.Namespace) -> Path:
    from ferry.pki.ca import DEFAULT_CA_DIR

    return args.dir or DEFAULT_CA_DIR


def _open(args: argparse.Namespace) -> CertificateAuthority:
    from ferry.pki.ca import CertificateAuthority

    return CertificateAuthority.open(_dir(args))


def cmd_ca_init(args: argparse.Namespace) -> int:
    from ferry.pki.ca import CertificateAuthority

    ca = CertificateAuthority.init(_dir(args), args.cluster)
    print(f"CA of cluster {ca.cluster!r} created in {ca.dir} (keep ca.key there, nowhere else)")
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from ferry.pki.identity import Role

    role = Role.ADMIN if args.admin else Role.VIEWER if args.viewer else Role.HOST
    ca = _open(args)
    bundle = ca.issue(args.name, role, tuple(args.dns), tuple(args.ip), args.days, args.out)
    print(f"{role} certificate for {args.name} in {bundle}/")
    where = "the host's" if role is Role.HOST else "the operator's"
    print(f"copy its four files to {where} /etc/ferry/pki/ (key.pem stays mode 0600)")
    return 0


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    ca = _open(args)
    for entry in ca.revoke(args.who):
        print(f"revoked {entry.role} {entry.name} (serial {entry.serial})")
    print(
        f"publish {ca.dir / 'crl.pem'} to every host's /etc/ferry/pki/crl.pem: "
        "ferryd reads it at the next connection, no restart needed"
    )
    return 0


def cmd_ca_list(args: argparse.Namespace) -> int:
    entries = _open(args).issued()
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=1))
        return 0
    print(f"{'Name':<24} {'Role':<7} {'Serial':<42} {'Expires':<11} Revoked")
    for e in entries:
        revoked = e.revoked[:10] if e.revoked else "-"
        print(f"{e.name:<24} {e.role:<7} {e.serial:<42} {e.not_after[:10]:<11} {revoked}")
    return 0


def add_ca_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the cluster CA: certificates for hosts and operators")
    actions = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")

    def action(name: str, func: object, text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        p.add_argument(
            "--dir", type=Path, default=None, help="the CA's directory (default /etc/ferry/ca)"
        )
        return p

    p = action("init", cmd_ca_init, "create the cluster CA")
    p.add_argument("--cluster", default="ferry", help="the cluster's name (default ferry)")
    p = action("issue", cmd_ca_issue, "a key and certificate for a host or an operator")
    p.add_argument("name", help="the host's name (as its ferryd.toml says), or the operator's")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--admin", action="store_true", help="an operator who may do everything")
    kind.add_argument("--viewer", action="store_true", help="an operator who may only look")
    p.add_argument("--dns", action="append", default=[], help="another DNS name of the host")
    p.add_argument("--ip", action="append", default=[], help="an address of the host")
    p.add_argument("--days", type=int, help="validity (hosts 825, operators 365)")
    p.add_argument("--out", type=Path, help="bundle directory (default DIR/issued/NAME)")
    p = action("revoke", cmd_ca_revoke, "revoke a name's certificates (or one serial)")
    p.add_argument("who", metavar="NAME|SERIAL")
    p = action("list", cmd_ca_list, "every certificate issued")
    p.add_argument("--json", action="store_true")
