"""The host (daemon) config: native ``ferryd.toml`` or a classic ``xend-config.sxp``.

::

    name = "xen_host_1"
    state_dir = "/var/lib/ferry"
    storage_roots = ["/xen"]
    pki_dir = "/etc/ferry/pki"      # ca.pem, crl.pem, cert.pem, key.pem (`ferry ca issue`)
    [relocation]
    port = 8002
    hosts_allow = ['xen_host_2', '192\\.168\\.1\\.\\d+']
    [control]                       # the control API for the management station
    port = 8003                     # (mutual TLS; admin and viewer certificates)
    [metrics]                       # Prometheus, plain HTTP GET /metrics
    address = "127.0.0.1"           # the default; elsewhere ferryd warns
    port = 9177
    [cluster]                       # absent: a standalone host (local ownership only)
    etcd = ["https://10.0.0.5:2379", "https://10.0.0.6:2379", "https://10.0.0.7:2379"]
    lease_ttl = 6                   # seconds; the host fences its VMs before it ends

``insecure = true`` turns TLS off on the relocation port (xend's plain
protocol) and the TCP control API off altogether; ferryd then says so loudly.

From ``xend-config.sxp`` only the relocation keys and ``dom0-min-mem`` carry
over; every other key is accepted and listed in ``ignored`` with the reason.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.config._common import read_config_text
from ferry.config.sxp import parse_sxp_lines
from ferry.config.toml_domain import load_toml_text, toml_key_lines
from ferry.errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")

Fail = Callable[[str], ConfigError]  # builds the error for one key from the reason


@dataclass(frozen=True)
class RelocationConfig:
    enabled: bool = True
    port: int = 8002
    address: str = ""  # '' = all addresses
    hosts_allow: tuple[str, ...] = ()  # regexes, xend semantics; empty = allow all


@dataclass(frozen=True)
class ControlConfig:
    enabled: bool = True
    port: int = 8003
    address: str = ""  # '' = all addresses


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    port: int = 9177
    address: str = "127.0.0.1"  # plain HTTP: local unless the config says otherwise


@dataclass(frozen=True)
class ClusterConfig:
    # etcd's client URLs; none: a standalone host whose ownership is local only.
    etcd: tuple[str, ...] = ()
    lease_ttl: int = 6
    # The cluster's name in etcd's keys when insecure = true (no certificate
    # to take it from); with TLS it is the certificate's organisation.
    name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.etcd)


DEFAULT_PKI_DIR = Path("/etc/ferry/pki")


@dataclass(frozen=True)
class HostConfig:
    name: str
    state_dir: Path = Path("/var/lib/ferry")
    run_dir: Path = Path("/run/ferry")
    accel: str = "auto"
    storage_roots: tuple[Path, ...] = (Path("/xen"), Path("/var/lib/ferry/images"))
    # The hosts that nfs://, nbd:// and iscsi:// disks may name (none: no URL disks).
    storage_servers: tuple[str, ...] = ()
    qemu_binary: str = "qemu-system-x86_64"
    relocation: RelocationConfig = field(default_factory=RelocationConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # This host's credentials, from the cluster CA (ferry.pki).
    pki_dir: Path = DEFAULT_PKI_DIR
    # Plain TCP relocation, as xend had it: only when a config says so.
    insecure: bool = False
    dom0_min_mem: int = 0  # MiB kept for the host
    ignored: tuple[str, ...] = ()
    # Host defaults for migration settings ([migration] table); checked by
    # ferry.migration.params when ferryd starts.
    migration: Mapping[str, Any] = field(default_factory=dict)


def load_host_config(path: Path | None) -> HostConfig:
    """``None`` gives the defaults; ``*.sxp`` is read as xend's config, else TOML."""
    if path is None:
        return HostConfig(name=socket.gethostname())
    source = str(path)
    text = read_config_text(path)
    if path.suffix == ".sxp":
        return parse_xend_config(text, source)
    return parse_host_toml(text, source)


def hosts_allow_matches(patterns: Iterable[str], addr: str, names: Iterable[str] = ()) -> bool:
    r"""No patterns allows all (xend's rule); else a pattern must match the peer's
    address or one of its (forward-confirmed) names whole.

    xend used ``re.match``, anchored at the start only: ``^192\.168\.1\.1``
    also let 192.168.1.100 in. ferry matches the whole string (``fullmatch``);
    xend's usual ``^name$`` patterns mean the same under both.
    """
    compiled = [re.compile(p) for p in patterns]
    if not compiled:
        return True
    candidates = [addr, *names]
    return any(p.fullmatch(c) for p in compiled for c in candidates)


def split_hosts_allow(text: str) -> tuple[str, ...]:
    # xend split on single spaces, so a double space made an empty, allow-all
    # pattern; splitting on any whitespace keeps only real patterns.
    return tuple(text.split())


# -- native TOML ---------------------------------------------------------------


_TOP_KEYS = frozenset(
    {"name", "state_dir", "run_dir", "accel", "storage_roots", "qemu_binary", "dom0_min_mem"}
    | {"storage_servers", "pki_dir", "insecure"}
    | {"relocation", "migration", "control", "cluster", "metrics"}
)
_CLUSTER_KEYS = frozenset({"etcd", "lease_ttl", "name"})
_RELOCATION_KEYS = frozenset({"enabled", "port", "address", "hosts_allow"})
_ENDPOINT_KEYS = frozenset({"enabled", "port", "address"})


def parse_host_toml(text: str, source: str) -> HostConfig:
    return _TomlHost(source, load_toml_text(text, source), toml_key_lines(text, source)).build()


class _TomlHost:
    def __init__(self, source: str, data: dict[str, Any], where: dict[str, str]) -> None:
        self.source = source
        self.data = data
        self.where = where

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where.get(key, self.source)}: '{key}': {why}")

    def build(self) -> HostConfig:
        data = self.data
        self.no_unknown(data, _TOP_KEYS, "")
        relocation = data.get("relocation", {})
        if not isinstance(relocation, dict):
            raise self.fail("relocation", "expected a [relocation] table")
        self.no_unknown(relocation, _RELOCATION_KEYS, "relocation.")
        control = self.table(data, "control")
        self.no_unknown(control, _ENDPOINT_KEYS, "control.")
        metrics = self.table(data, "metrics")
        self.no_unknown(metrics, _ENDPOINT_KEYS, "metrics.")
        cluster = self.table(data, "cluster")
        self.no_unknown(cluster, _CLUSTER_KEYS, "cluster.")
        defaults = HostConfig(name="")
        roots = data.get("storage_roots", [str(p) for p in defaults.storage_roots])
        if not isinstance(roots, list):
            raise self.fail("storage_roots", f"expected a list of paths, got {roots!r}")
        servers = data.get("storage_servers", [])
        if not isinstance(servers, list) or not all(
            isinstance(x, str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", x) for x in servers
        ):
            raise self.fail("storage_servers", "expected a list of host names or addresses")
        patterns = relocation.get("hosts_allow", [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise self.fail("relocation.hosts_allow", "expected a list of regex strings")
        return HostConfig(
            name=self.text(data, "name", socket.gethostname()),
            state_dir=self.path(data, "state_dir", defaults.state_dir),
            run_dir=self.path(data, "run_dir", defaults.run_dir),
            accel=self.accel(data),
            storage_roots=tuple(self.root(r) for r in roots),
            storage_servers=tuple(x.lower() for x in servers),
            qemu_binary=self.text(data, "qemu_binary", defaults.qemu_binary),
            relocation=RelocationConfig(
                **self.endpoint(relocation, "relocation", 8002),
                hosts_allow=check_patterns(
                    patterns, lambda why: self.fail("relocation.hosts_allow", why)
                ),
            ),
            control=ControlConfig(**self.endpoint(control, "control", 8003)),
            metrics=MetricsConfig(**self.endpoint(metrics, "metrics", 9177, "127.0.0.1")),
            cluster=self.cluster(cluster),
            pki_dir=self.path(data, "pki_dir", DEFAULT_PKI_DIR),
            insecure=self.flag(data, "insecure", "insecure", default=False),
            dom0_min_mem=self.integer(data, "dom0_min_mem", 0, "dom0_min_mem"),
            migration=self.table(data, "migration"),
        )

    def endpoint(
        self, table: Mapping[str, Any], name: str, port: int, address: str = ""
    ) -> dict[str, Any]:
        """``enabled``, ``port`` and ``address`` of a listening table ([relocation], ...)."""
        return {
            "enabled": self.flag(table, "enabled", f"{name}.enabled"),
            "port": check_port(
                self.integer(table, "port", port, f"{name}.port"),
                lambda why: self.fail(f"{name}.port", why),
            ),
            "address": self.text(table, "address", address, f"{name}.address", empty=True),
        }

    def cluster(self, table: Mapping[str, Any]) -> ClusterConfig:
        urls = table.get("etcd", [])
        if not isinstance(urls, list) or not all(
            isinstance(u, str) and re.fullmatch(r"https?://[A-Za-z0-9_.:\[\]-]{1,260}/?", u)
            for u in urls
        ):
            raise self.fail("cluster.etcd", "expected a list of http(s)://HOST:PORT URLs")
        ttl = self.integer(table, "lease_ttl", ClusterConfig.lease_ttl, "cluster.lease_ttl")
        if not 3 <= ttl <= 120:
            raise self.fail("cluster.lease_ttl", f"{ttl} s is outside 3..120")
        name = self.text(table, "name", "", "cluster.name", empty=True)
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise self.fail("cluster.name", "expected letters, digits, '_', '.' or '-'")
        return ClusterConfig(etcd=tuple(u.rstrip("/") for u in urls), lease_ttl=ttl, name=name)

    def table(self, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a [{key}] table")
        return dict(value)

    def no_unknown(self, table: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
        unknown = sorted(set(table) - known)
        if unknown:
            raise self.fail(prefix + unknown[0], "unknown key")

    def text(
        self, table: Mapping[str, Any], key: str, default: str, label: str = "", empty: bool = False
    ) -> str:
        value = table.get(key, default)
        label = label or key
        if not isinstance(value, str) or "\n" in value or (not value and not empty):
            raise self.fail(label, f"expected a non-empty single-line string, got {value!r}")
        return value

    def path(self, table: Mapping[str, Any], key: str, default: Path | None) -> Path:
        value = table.get(key, default)
        if not isinstance(value, str | Path) or not str(value).startswith("/"):
            raise self.fail(key, f"expected an absolute path, got {value!r}")
        return Path(value)

    def root(self, value: Any) -> Path:
        return self.path({"storage_roots": value}, "storage_roots", None)

    def integer(self, table: Mapping[str, Any], key: str, default: int, label: str) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(label, f"expected a non-negative integer, got {value!r}")
        return value

    def flag(self, table: Mapping[str, Any], key: str, label: str, default: bool = True) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(label, f"expected true or false, got {value!r}")
        return value

    def accel(self, data: Mapping[str, Any]) -> str:
        value = data.get("accel", "auto")
        if value not in ACCELS:
            raise self.fail("accel", f"{value!r} is not one of {', '.join(ACCELS)}")
        return str(value)


def check_port(port: int, fail: Fail) -> int:
    if not 1 <= port <= 65535:
        raise fail(f"{port} is out of range 1..65535")
    return port


def check_patterns(patterns: Iterable[str], fail: Fail) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise fail(f"regex {pattern!r} does not compile: {err}") from err
    return tuple(patterns)


# -- classic xend-config.sxp ---------------------------------------------------

_API = (
    "ferry's control API is a root-only unix socket, and TCP 8003 with mutual TLS "
    "for the management station"
)
_HEADLESS = "ferry runs QEMU headless"
_TLS = (
    "ferry's relocation is always mutual TLS, with the cluster CA's certificates in /etc/ferry/pki"
)


def _each(words: str, reason: str) -> dict[str, str]:
    return dict.fromkeys(words.split(), reason)


XEND_IGNORED: dict[str, str] = {
    **_each(
        "xend-http-server xend-unix-server xend-tcp-xmlrpc-server xend-port "
        "xend-unix-xmlrpc-server xend-address xend-unix-path xen-api-server "
        "xend-tcp-xmlrpc-server-address xend-tcp-xmlrpc-server-port",
        _API,
    ),
    **_each(
        "xend-relocation-ssl-server xend-relocation-ssl-port xend-relocation-ssl "
        "xend-relocation-server-ssl-key-file xend-relocation-server-ssl-cert-file",
        _TLS,
    ),
    "network-script": "ferry attaches taps to the bridge named in each vif itself",
    "vif-script": "ferry attaches taps to the bridge named in each vif itself",
    "dom0-cpus": "ferry does not pin host CPUs",
    "enable-dom0-ballooning": "no ballooning",
    "total_available_memory": "no ballooning",
    **dict.fromkeys(("vncpasswd", "vnc-listen", "vnc-tls", "keymap"), _HEADLESS),
    **dict.fromkeys(("logfile", "loglevel"), "ferryd logs to the journal"),
    "console-limit": "ferry's console has no rate limit",
    "xend-domain-lock": "ferry's migration protocol prevents two writers itself",
}
_XEND_USED = frozenset(
    {
        "xend-relocation-server", "xend-relocation-port", "xend-relocation-address",
        "xend-relocation-hosts-allow", "dom0-min-mem",
    }
)  # fmt: skip
_YES = ("yes", "y", "1", "on", "true", "t")
_NO = ("no", "n", "0", "off", "false", "f")


def parse_xend_config(text: str, source: str) -> HostConfig:
    values: dict[str, tuple[int, str]] = {}
    ignored: list[str] = []
    for line, item in parse_sxp_lines(text, source):
        if not isinstance(item, list) or not item or not isinstance(item[0], str):
            raise ConfigError(f"{source}:{line}: expected (key value), got {item!r}")
        key = item[0]
        if key in _XEND_USED:
            if len(item) != 2 or not isinstance(item[1], str):
                raise ConfigError(f"{source}:{line}: '{key}': expected ({key} value)")
            if key in values:
                first = values[key][0]
                raise ConfigError(f"{source}:{line}: '{key}' given twice: lines {first} and {line}")
            values[key] = (line, item[1])
        else:
            reason = XEND_IGNORED.get(key, "not used by ferry")
            ignored.append(f"{key} ignored: {reason}")

    def fail(key: str, why: str) -> ConfigError:
        line = values[key][0] if key in values else None
        return ConfigError(f"{source}:{line}: '{key}': {why}" if line else f"{source}: {why}")

    def get(key: str, default: str) -> str:
        return values[key][1] if key in values else default

    enabled_text = get("xend-relocation-server", "yes").lower()
    if enabled_text not in _YES + _NO:
        raise fail("xend-relocation-server", f"{enabled_text!r} is not yes or no")
    port = _xend_int(get("xend-relocation-port", "8002"), "xend-relocation-port", fail)
    check_port(port, lambda why: fail("xend-relocation-port", why))
    patterns = split_hosts_allow(get("xend-relocation-hosts-allow", ""))
    return HostConfig(
        name=socket.gethostname(),
        relocation=RelocationConfig(
            enabled=enabled_text in _YES,
            port=port,
            address=get("xend-relocation-address", ""),
            hosts_allow=check_patterns(
                patterns, lambda why: fail("xend-relocation-hosts-allow", why)
            ),
        ),
        dom0_min_mem=_xend_int(get("dom0-min-mem", "0"), "dom0-min-mem", fail),
        ignored=tuple(ignored),
    )


def _xend_int(text: str, key: str, fail: Callable[[str, str], ConfigError]) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise fail(key, f"{text!r} is not a non-negative integer")
    return int(text)
