"""``ferry man``: the man page ferry(1), in roff, made from the argument parsers.

``man -l <(ferry man)`` reads it without installing; packagers write it to
``/usr/share/man/man1/ferry.1``. ferryd's options are a section of the same page.
"""

from __future__ import annotations

import datetime
import re

from ferry import __version__
from ferry.cli.parser_walk import Argument, Command

_ENVIRONMENT = (
    ("FERRY_HOST", "the remote ferryd to talk to, as --host"),
    ("FERRY_PKI", "the operator's credentials for --host, as --pki"),
    ("FERRY_CACHE_DIR", "the guest image cache (default /var/cache/ferry/guest)"),
)
_FILES = (
    ("/etc/ferry/ferryd.toml", "the host config (or a classic xend-config.sxp)"),
    ("/etc/ferry/pki/", "this host's (or operator's) certificate bundle"),
    ("/etc/ferry/ca/", "the cluster CA, on the management station only"),
    ("/run/ferry/ferryd.sock", "ferryd's local control socket (root only)"),
    ("/var/lib/ferry/", "ferryd's state: domain records, migration outcomes"),
)


def man_page(root: Command, daemon: Command) -> str:
    date = datetime.date.today().isoformat()
    out = [
        f'.TH FERRY 1 "{date}" "ferry {__version__}" "ferry manual"',
        ".SH NAME",
        r"ferry, ferryd \- live-migrate running QEMU virtual machines between hosts",
        ".SH SYNOPSIS",
        r".B ferry",
        r"[\fIGLOBAL OPTIONS\fR] \fICOMMAND\fR [\fIOPTIONS\fR] [\fIARGUMENTS\fR]",
        ".br",
        r".B ferryd",
        r"[\fIOPTIONS\fR]",
        ".SH DESCRIPTION",
        _text(
            f"{root.description}. ferry is the command line; it talks to ferryd, the "
            "daemon on each host, over a local socket or, with --host, over mutual TLS."
        ),
        ".SH GLOBAL OPTIONS",
        *_options(root.options),
        ".SH COMMANDS",
    ]
    for command in root.every()[1:]:
        if command.subcommands:
            continue  # a group: its commands follow, each with its whole name
        out += [f'.SS "{_synopsis(command)}"', _text(command.description or command.help)]
        out += _options(command.options + [a for a in command.positionals if a.help])
    out += [".SH FERRYD", _text(daemon.description), *_options(daemon.options)]
    out += [".SH ENVIRONMENT", *_pairs(_ENVIRONMENT), ".SH FILES", *_pairs(_FILES)]
    out += [".SH SEE ALSO", r"\fBqemu-system-x86_64\fR(1), \fBetcd\fR(1), \fBsystemd.service\fR(5)"]
    return "\n".join(out) + "\n"


def _synopsis(command: Command) -> str:
    words = [command.name]
    if command.options:
        words.append("[options]")
    for arg in command.positionals:
        words.append(f"{arg.name}..." if arg.repeats else arg.name)
    return _escape(" ".join(words))


def _options(arguments: list[Argument]) -> list[str]:
    lines = []
    for arg in arguments:
        head = ", ".join(rf"\fB{_escape(f)}\fR" for f in arg.flags) or rf"\fI{_escape(arg.name)}\fR"
        if arg.flags and arg.takes_value:
            head += rf" \fI{_escape(arg.name)}\fR"
        text = arg.help or ""
        if arg.choices:
            text += f" (one of: {', '.join(arg.choices)})"
        lines += [".TP", head, _text(text) or "."]
    return lines


def _pairs(pairs: tuple[tuple[str, str], ...]) -> list[str]:
    return [line for name, text in pairs for line in (".TP", rf"\fB{name}\fR", _text(text))]


def _escape(text: str) -> str:
    return text.replace("\\", r"\e").replace("-", r"\-")


def _text(text: str) -> str:
    """A paragraph: escaped, and never a line roff would take for a request."""
    text = _escape(re.sub(r"\s+", " ", text.replace("%%", "%")).strip())
    return "\\&" + text if text[:1] in (".", "'") else text
