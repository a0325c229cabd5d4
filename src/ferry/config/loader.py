"""Finding and loading a domain config file, with ``key=value`` overrides.

As with ``xm create <file> vcpus=2 memory=256``, overrides from the command
line are applied to the canonical mapping before validation:

- a value is an int when it is an integer literal, a bool when it is
  ``true``/``false``, else a string; keys that are strings by nature (``name``,
  ``uuid``, ``kernel``...) always stay strings, so ``name=007`` works;
- ``disk=...``/``vif=...`` take one device in xm syntax; the overrides of one
  such key together replace the file's list (``vif=`` alone empties it).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.config._common import build_domain, read_config_text
from ferry.config.toml_domain import parse_toml_domain_located
from ferry.config.xm import parse_xm_located
from ferry.config.xm_devices import parse_disk_entry, parse_vif_entry
from ferry.domain.config import KNOWN_KEYS, NAME_RE, DomainConfig
from ferry.errors import ConfigError

SEARCH_PATTERNS = ("/etc/ferry/domains/{name}.toml", "/etc/xen/{name}")

OVERRIDABLE = KNOWN_KEYS - {"ignored"}
STRING_KEYS = frozenset(
    {"name", "uuid", "kernel", "ramdisk", "root", "extra", "hostname", "ip", "gateway"}
)
_INTEGER = re.compile(r"^[+-]?\d+$")


def find_domain_file(name_or_path: str | Path, patterns: Sequence[str] = SEARCH_PATTERNS) -> Path:
    """The path as given if it is a file, else the domain's file in the usual places."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    tried = [str(given)]
    name = str(name_or_path)
    # Only a plain domain name is looked up, so '../x' cannot reach outside the dirs.
    if NAME_RE.fullmatch(name):
        for pattern in patterns:
            candidate = Path(pattern.format(name=name))
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise ConfigError(f"{name}: domain config not found: looked at {', '.join(tried)}")


def load_domain_file(path: Path, overrides: Sequence[str] = ()) -> DomainConfig:
    """Parse by extension (``.toml`` native, anything else xm), override, validate."""
    source = str(path)
    text = read_config_text(path)
    if path.suffix == ".toml":
        mapping, where = parse_toml_domain_located(text, source)
    else:
        mapping, where = parse_xm_located(text, source)
    apply_overrides(mapping, where, overrides)
    return build_domain(mapping, source, where)


def apply_overrides(
    mapping: dict[str, Any], where: dict[str, str], overrides: Sequence[str]
) -> None:
    devices: dict[str, list[dict[str, str]]] = {}
    notes: list[str] = []
    for raw in overrides:
        at = f"command line {raw!r}"
        key, sep, value = raw.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{at}: malformed override: expected key=value")
        if key not in OVERRIDABLE:
            close = difflib.get_close_matches(key, sorted(OVERRIDABLE), n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{at}: unknown key '{key}'{hint}")
        where[key] = at
        if key in ("disk", "vif"):
            if key not in devices:
                # The file's items are replaced: their places must not label new errors.
                for stale in [k for k in where if k.startswith(f"{key}[")]:
                    del where[stale]
            items = devices.setdefault(key, [])
            if value.strip():
                where[f"{key}[{len(items)}]"] = at
                item, item_notes = _device(key, value, len(items), at)
                if item is not None:
                    items.append(item)
                notes.extend(item_notes)
        else:
            mapping[key] = value if key in STRING_KEYS else _scalar(value)
    mapping.update(devices)
    if notes:
        mapping["ignored"] = [*mapping.get("ignored", []), *notes]


def _device(key: str, value: str, index: int, at: str) -> tuple[dict[str, str] | None, list[str]]:
    if key == "disk":
        return parse_disk_entry(value, at)
    return parse_vif_entry(value, index, at)


def _scalar(value: str) -> int | bool | str:
    if _INTEGER.match(value):
        return int(value)
    if value in ("true", "false"):
        return value == "true"
    return value
