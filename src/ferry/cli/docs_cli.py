"""``ferry help``, ``ferry completion``, ``ferry man``, and ``ferry _names`` (for completion)."""

from __future__ import annotations

import argparse
import sys

from ferry.cli.parser_walk import walk
from ferry.cli.parsers import ClientFactory, Subparsers
from ferry.errors import FerryError

NAMES_TIMEOUT = 3.0  # completion must not hang the shell on a ferryd that does not answer


def add_docs_parser(sub: Subparsers, root: argparse.ArgumentParser, client: ClientFactory) -> None:
    text = "the help of a command (ferry help migrate, ferry help lab up)"
    p = sub.add_parser("help", help=text, description=text)
    p.add_argument("topic", nargs="*", metavar="COMMAND")
    p.set_defaults(func=lambda args: cmd_help(root, args.topic))

    text = 'a shell completion script: eval "$(ferry completion bash)"'
    p = sub.add_parser("completion", help=text, description=text)
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(func=lambda args: cmd_completion(root))

    text = "the man page ferry(1), in roff: man -l <(ferry man)"
    p = sub.add_parser("man", help=text, description=text)
    p.set_defaults(func=lambda args: cmd_man(root))

    # Hidden (no help): what completion asks ferryd for.
    p = sub.add_parser("_names")
    p.add_argument("kind", choices=["domain", "host"])
    p.set_defaults(func=lambda args: cmd_names(client, args))


def cmd_help(root: argparse.ArgumentParser, topic: list[str]) -> int:
    command = walk(root).find(topic)
    if command is None:
        raise FerryError(f"no command 'ferry {' '.join(topic)}': see ferry help")
    command.parser.print_help()
    if command.subcommands:
        print("\nits commands (ferry help " + " ".join((*topic, "COMMAND")) + "):")
        for sub in command.subcommands:
            print(f"  {' '.join(sub.path):<22} {sub.help}")
    return 0


def cmd_completion(root: argparse.ArgumentParser) -> int:
    from ferry.cli.completion import bash_script

    sys.stdout.write(bash_script(walk(root)))
    return 0


def cmd_man(root: argparse.ArgumentParser) -> int:
    from ferry.cli.manpage import man_page
    from ferry.daemon.main import build_parser as ferryd_parser

    sys.stdout.write(man_page(walk(root), walk(ferryd_parser())))
    return 0


def cmd_names(client: ClientFactory, args: argparse.Namespace) -> int:
    try:
        ferryd = client(args)
        ferryd.timeout = NAMES_TIMEOUT
        if args.kind == "host":
            names = [str(row.get("host")) for row in ferryd.call("host_list")]
        else:
            names = [str(row.get("name")) for row in ferryd.call("list")]
    except FerryError:
        return 1  # nothing to offer; completion stays quiet
    print("\n".join(sorted(set(names))))
    return 0
