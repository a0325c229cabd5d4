"""The command line's argument parser read back as data: commands, options, arguments.

``ferry help``, the shell completion and the man page are all made from this,
so none of them can drift from what ``ferry`` really accepts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

# What a value is, for completion: a domain or host name (asked of ferryd),
# a file, one of fixed choices, or anything.
DOMAIN, HOST, FILE, CHOICE, ANY = "domain", "host", "file", "choice", "any"
_DOMAIN_DESTS = frozenset({"domain", "names"})
_FILE_DESTS = frozenset({"config", "path", "output", "report", "workdir", "status_file", "file"})


@dataclass(frozen=True)
class Argument:
    flags: tuple[str, ...]  # empty for a positional argument
    name: str  # the metavar shown: DOMAIN, HOST[:PORT], MS, ...
    help: str
    kind: str  # DOMAIN, HOST, FILE, CHOICE, ANY; "" for an option that takes no value
    choices: tuple[str, ...] = ()
    repeats: bool = False  # a positional that takes any number of words

    @property
    def takes_value(self) -> bool:
        return bool(self.kind)


@dataclass
class Command:
    path: tuple[str, ...]  # () for ferry itself, ("lab", "up") for `ferry lab up`
    help: str
    description: str
    parser: argparse.ArgumentParser
    options: list[Argument] = field(default_factory=list)
    positionals: list[Argument] = field(default_factory=list)
    subcommands: list[Command] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join(("ferry", *self.path))

    def find(self, path: list[str]) -> Command | None:
        if not path:
            return self
        sub = next((c for c in self.subcommands if c.path[-1] == path[0]), None)
        return sub.find(path[1:]) if sub else None

    def every(self) -> list[Command]:
        """This command and all below it, depth first."""
        return [self, *(c for sub in self.subcommands for c in sub.every())]


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help: str = "") -> Command:
    command = Command(path, help or parser.description or "", parser.description or "", parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                if name in helps:  # a command without help is hidden (`_names`)
                    command.subcommands.append(walk(sub, (*path, name), helps[name]))
            continue
        shown = action.help and action.help != argparse.SUPPRESS
        text = parser._get_formatter()._expand_help(action) if shown else ""
        if not text and "--json" in action.option_strings:
            text = "print the result as JSON (for scripts)"
        argument = _argument(action, text)
        if action.option_strings:
            command.options.append(argument)
        else:
            command.positionals.append(argument)
    return command


def _argument(action: argparse.Action, help: str) -> Argument:
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    positional = not action.option_strings
    name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return Argument(
        flags=tuple(action.option_strings),
        name=name,
        help=help,
        kind=_kind(action, choices),
        choices=choices,
        repeats=positional and action.nargs in ("*", "+", argparse.REMAINDER),
    )


def _kind(action: argparse.Action, choices: tuple[str, ...]) -> str:
    if action.option_strings and action.nargs == 0:
        return ""  # a flag
    name = str(action.metavar or "").upper()
    if choices:
        return CHOICE
    if action.dest in _DOMAIN_DESTS or name == "DOMAIN":
        return DOMAIN
    if action.dest in ("host", "to"):
        return HOST
    if action.type is Path or action.dest in _FILE_DESTS or name in ("SOCKET", "DIR", "FILE"):
        return FILE
    return ANY
