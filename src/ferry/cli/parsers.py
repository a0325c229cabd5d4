"""What the command modules share: the shape of a subcommand table and of a client factory,
and how a note reaches the user."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from ferry.client.daemon_client import DaemonClient

if TYPE_CHECKING:
    # Generic only to the type checker: argparse's class is not subscriptable at run time.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction
# How a command reaches ferryd: the local socket, or a remote host (--host).
ClientFactory = Callable[[argparse.Namespace], DaemonClient]


def note(text: str) -> None:
    """A line for the user beside a command's output (stderr: stdout may be --json)."""
    print(text, file=sys.stderr)
