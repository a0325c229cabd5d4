"""Native TOML domain config: the canonical keys, one ``[[disk]]``/``[[vif]]`` per device.

::

    name = "virt_server"
    memory = 512
    [[disk]]
    path = "/xen/virt_server.img"
    target = "xvda"
    mode = "w"
    [[vif]]
    mac = "00:16:3e:4a:21:07"
    bridge = "xenbr0"

tomllib gives no positions for values, so :func:`toml_key_lines` scans the
text for where keys and tables start; it only serves to put a line on errors.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from ferry.config._common import build_domain, read_config_text
from ferry.domain.config import DomainConfig
from ferry.errors import ConfigError

_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_-]+)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")


def parse_toml_domain(text: str, source: str) -> dict[str, Any]:
    """The canonical mapping of a TOML domain file (not yet validated)."""
    return parse_toml_domain_located(text, source)[0]


def parse_toml_domain_located(text: str, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    data = load_toml_text(text, source)
    where = toml_key_lines(text, source)
    for key, device in (("disk", "disk"), ("vif", "interface")):
        if isinstance(data.get(key), dict):
            raise ConfigError(
                f"{where.get(key, source)}: '{key}': write [[{key}]] (an array of tables), "
                f"one per {device}"
            )
    return data, where


def load_toml_domain(path: Path) -> DomainConfig:
    source = str(path)
    mapping, where = parse_toml_domain_located(read_config_text(path), source)
    return build_domain(mapping, source, where)


def load_toml_text(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = _POSITION.match(message)
        if match:
            why, line, column = match.groups()
            raise ConfigError(f"{source}:{line}:{column}: invalid TOML: {why}") from err
        raise ConfigError(f"{source}: invalid TOML: {message}") from err
    except ValueError as err:
        # tomllib lets Python's own limit on integer digits (4300) through.
        raise ConfigError(f"{source}: invalid TOML: {str(err).split(';')[0]}") from None


def toml_key_lines(text: str, source: str) -> dict[str, str]:
    """``file:line`` of each key (``memory``, ``relocation.port``, ``disk[1].path``)."""
    where: dict[str, str] = {}
    counts: dict[str, int] = {}
    table: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        at = f"{source}:{number}"
        if match := _ARRAY_HEADER.match(line):
            name = match[1]
            counts[name] = counts.get(name, 0) + 1
            where.setdefault(name, at)
            table = f"{name}[{counts[name] - 1}]"
            where[table] = at
        elif match := _TABLE_HEADER.match(line):
            table = match[1]
            where.setdefault(table, at)
        elif match := _KEY.match(line):
            where.setdefault(match[1] if table is None else f"{table}.{match[1]}", at)
    return where
