"""Helpers shared by the config readers: bounded reading and error locating.

Every reader turns a file into the canonical mapping plus a ``where`` map that
tells, for a key (``memory``) or a list item (``disk[0]``), where it came from
(``/etc/xen/vm:7`` or ``command line 'vcpus=2'``). :func:`build_domain` uses it
to put that place in front of the errors :meth:`DomainConfig.from_mapping`
raises, since only the readers know the lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ferry.domain.config import DomainConfig
from ferry.errors import ConfigError

# Real config files are a few hundred bytes; a bound keeps a hostile or
# mistaken path (a disk image, /dev/zero) from being read into memory.
MAX_CONFIG_BYTES = 1 << 20

_KEY_PATH = re.compile(r"^([A-Za-z0-9_-]+)(\[\d+\])?(\..+)?$")


def read_config_text(path: Path) -> str:
    """The file's text, or a one-line ConfigError saying why it cannot be had."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read: is a directory") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read: permission denied") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: refused: larger than {MAX_CONFIG_BYTES} bytes")
    return decode_utf8(data, str(path))


def decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start]
        raise ConfigError(
            f"{source}:{line}: not UTF-8: byte 0x{bad:02x} cannot be decoded"
        ) from err


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def locate(err: ConfigError, source: str, where: Mapping[str, str]) -> ConfigError:
    """Replace the bare ``source`` prefix of a validator error by the key's place."""
    message = str(err)
    head = f"{source}: '"
    if not message.startswith(head):
        return err
    key = message[len(head) :].split("'", 1)[0]
    match = _KEY_PATH.match(key)
    if match is None:
        return err
    base, index, _ = match.groups()
    for candidate in (key, base + (index or ""), base):
        if candidate in where:
            return ConfigError(where[candidate] + message[len(source) :])
    return err


def build_domain(mapping: Mapping[str, Any], source: str, where: Mapping[str, str]) -> DomainConfig:
    """Validate through the single checker, with the line of the faulty key."""
    try:
        return DomainConfig.from_mapping(mapping, source)
    except ConfigError as err:
        located = locate(err, source, where)
        if located is err:
            raise
        raise located from err
