"""The S-expression reader, xend-config.sxp, ferryd.toml and hosts-allow."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ferry.config.host import (
    HostConfig,
    MetricsConfig,
    RelocationConfig,
    hosts_allow_matches,
    load_host_config,
)
from ferry.config.sxp import parse_sxp, parse_sxp_lines
from ferry.errors import ConfigError

CLASSIC = Path(__file__).resolve().parents[3] / "shared" / "classic"


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_host_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- sxp reader -------------------------------------------------------------------


def test_sxp_lists_strings_symbols_comments() -> None:
    text = "# c\n(a b) ; \n(x 'it\\'s' \"two\\nlines\" (n (m)))  # tail\nbare\n"
    assert parse_sxp(text.replace(";", ""), "s") == [
        ["a", "b"],
        ["x", "it's", "two\nlines", ["n", ["m"]]],
        "bare",
    ]


def test_sxp_escapes_keep_unknown_backslashes() -> None:
    assert parse_sxp(r"(h '^a\\.b$' '^a\.b$')", "s") == [["h", r"^a\.b$", r"^a\.b$"]]


def test_sxp_lines_are_kept() -> None:
    assert [line for line, _ in parse_sxp_lines("\n(a)\n\n(b\n c)\n", "s")] == [2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(a b)\n)\n", "s:2: unbalanced ')': no list is open"),
        ("(a b)\n(c\n(d)\n", "s:2: unbalanced '(': the list opened here is never closed"),
        ("(a\n 'open\n", "s:2: unterminated string: the ' opened here is never closed"),
    ],
)
def test_sxp_errors_have_lines(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sxp(text, "s")
    assert str(info.value) == message


def test_sxp_deep_nesting_does_not_recurse() -> None:
    depth = 100_000
    value = parse_sxp("(" * depth + ")" * depth, "s")[0]
    for _ in range(depth - 1):
        value = value[0]
    assert value == []


# -- xend-config.sxp --------------------------------------------------------------


def test_classic_xend_config_as_it_is() -> None:
    path = CLASSIC / "xend-config.sxp"
    if not path.is_file():
        pytest.skip(f"classic files not found at {CLASSIC} (shared/ must sit beside the repo)")
    config = load_host_config(path)
    assert config.relocation == RelocationConfig(
        enabled=True, port=8002, address="", hosts_allow=()
    )
    assert config.dom0_min_mem == 256
    assert config.name == socket.gethostname()
    assert set(config.ignored) == {
        "network-script ignored: ferry attaches taps to the bridge named in each vif itself",
        "vif-script ignored: ferry attaches taps to the bridge named in each vif itself",
        "dom0-cpus ignored: ferry does not pin host CPUs",
        "vncpasswd ignored: ferry runs QEMU headless",
    }


def test_xend_hosts_allow_is_split_on_whitespace(tmp_path: Path) -> None:
    text = (
        "(xend-relocation-server no)\n(xend-relocation-hosts-allow '^localhost$  ^xen_host_2$')\n"
    )
    config = load_host_config(write(tmp_path, text, "xend-config.sxp"))
    assert config.relocation.hosts_allow == ("^localhost$", "^xen_host_2$")
    assert config.relocation.enabled is False


def test_xend_unknown_key_is_ignored_with_a_reason(tmp_path: Path) -> None:
    text = "(xend-http-server yes)\n(some-future-key (a b))\n"
    config = load_host_config(write(tmp_path, text, "x.sxp"))
    assert config.ignored == (
        "xend-http-server ignored: ferry's control API is a root-only unix socket, "
        "and TCP 8003 with mutual TLS for the management station",
        "some-future-key ignored: not used by ferry",
    )


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("\n(xend-relocation-port 70000)", 2, "'xend-relocation-port': 70000 is out of range"),
        ("(xend-relocation-port eighty)", 1, "'xend-relocation-port': 'eighty' is not a"),
        ("(xend-relocation-server maybe)", 1, "'xend-relocation-server': 'maybe' is not yes"),
        ("(xend-relocation-hosts-allow '^ok$ ^(bad$')", 1, "regex '^(bad$' does not compile"),
        ("(dom0-min-mem -1)", 1, "'dom0-min-mem': '-1' is not a non-negative integer"),
        ("(dom0-min-mem 1)\n(dom0-min-mem 2)", 2, "'dom0-min-mem' given twice: lines 1 and 2"),
        ("(xend-relocation-port 1 2)", 1, "expected (xend-relocation-port value)"),
        ("bare", 1, "expected (key value), got 'bare'"),
    ],
)
def test_xend_errors(tmp_path: Path, text: str, line: int, why: str) -> None:
    path = write(tmp_path, text + "\n", "xend-config.sxp")
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: ")
    assert why in message


# -- ferryd.toml --------------------------------------------------------------------


def test_no_path_gives_defaults() -> None:
    config = load_host_config(None)
    assert config == HostConfig(name=socket.gethostname())
    assert config.relocation.port == 8002 and config.storage_roots[0] == Path("/xen")


def test_native_host_config(tmp_path: Path) -> None:
    text = """\
name = "xen_host_1"
state_dir = "/srv/ferry"
accel = "tcg"
storage_roots = ["/xen"]
dom0_min_mem = 256

[relocation]
port = 8003
address = "192.168.1.10"
hosts_allow = ['^xen_host_2$', '^192\\.168\\.1\\.']
"""
    config = load_host_config(write(tmp_path, text, "ferryd.toml"))
    assert config.name == "xen_host_1"
    assert config.state_dir == Path("/srv/ferry") and config.run_dir == Path("/run/ferry")
    assert config.accel == "tcg" and config.storage_roots == (Path("/xen"),)
    assert config.relocation == RelocationConfig(
        enabled=True,
        port=8003,
        address="192.168.1.10",
        hosts_allow=("^xen_host_2$", r"^192\.168\.1\."),
    )
    # Metrics are on, and local, unless the config says otherwise.
    assert config.metrics == MetricsConfig(enabled=True, port=9177, address="127.0.0.1")


def test_metrics_table(tmp_path: Path) -> None:
    text = '[metrics]\nport = 9300\naddress = "10.0.0.5"\n'
    config = load_host_config(write(tmp_path, text, "ferryd.toml"))
    assert config.metrics == MetricsConfig(enabled=True, port=9300, address="10.0.0.5")
    off = load_host_config(write(tmp_path, "[metrics]\nenabled = false\n", "off.toml"))
    assert off.metrics.enabled is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('accel = "xen"\n', ":1: 'accel': 'xen' is not one of auto, kvm, tcg"),
        ('state_dir = "var/lib"\n', ":1: 'state_dir': expected an absolute path"),
        ('storage_roots = ["/xen", "rel"]\n', ":1: 'storage_roots': expected an absolute path"),
        ("colour = 1\n", ":1: 'colour': unknown key"),
        ("[relocation]\nport = 0\n", ":2: 'relocation.port': 0 is out of range 1..65535"),
        ("[relocation]\nport = true\n", ":2: 'relocation.port': expected a non-negative integer"),
        ("[relocation]\nenabled = 1\n", ":2: 'relocation.enabled': expected true or false"),
        ("[relocation]\nhosts = []\n", ":2: 'relocation.hosts': unknown key"),
        ("[relocation]\nhosts_allow = ['(']\n", ":2: 'relocation.hosts_allow': regex '('"),
        ("[relocation]\nhosts_allow = '^a$'\n", ":2: 'relocation.hosts_allow': expected a list"),
        ("relocation = 3\n", ":1: 'relocation': expected a [relocation] table"),
        ("[metrics]\npath = '/m'\n", ":2: 'metrics.path': unknown key"),
        ("[metrics]\nport = 70000\n", ":2: 'metrics.port': 70000 is out of range 1..65535"),
        ("name = \n", ":1:8: invalid TOML: "),
    ],
)
def test_native_host_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text, "ferryd.toml")
    assert error_of(path).startswith(f"{path}{message}")


# -- hosts-allow ---------------------------------------------------------------------


def test_hosts_allow_empty_allows_all() -> None:
    assert hosts_allow_matches([], "203.0.113.9", [])


def test_hosts_allow_matches_the_address_or_a_name_whole() -> None:
    patterns = ["^xen_host_2$", r"192\.168\.1\.\d+"]
    assert hosts_allow_matches(patterns, "10.0.0.2", ["xen_host_2"])
    assert hosts_allow_matches(patterns, "192.168.1.20", [])
    # xend's re.match let a prefix through; a whole-string match does not.
    assert not hosts_allow_matches(["xen_host"], "10.0.0.2", ["xen_host_2.lan"])
    assert not hosts_allow_matches([r"^192\.168\.1\.1"], "192.168.1.100", [])
    assert hosts_allow_matches([r"^192\.168\.1\.1"], "192.168.1.1", [])
    assert not hosts_allow_matches(patterns, "10.192.168.1.5", ["evil.xen_host_2"])
    assert not hosts_allow_matches(patterns, "10.0.0.3", ["xen_host_3"])
    assert not hosts_allow_matches(["^xen_host_2$"], "10.0.0.3", ["xen_host_2\n"])


def test_peer_names_are_forward_confirmed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PTR record naming xen_host_2 counts only if xen_host_2 resolves to the peer."""
    import socket

    from ferry.daemon import relocation

    forward = {"xen_host_2": "10.0.0.2", "alias": "10.0.0.2", "liar": "10.0.0.99"}
    monkeypatch.setattr(
        socket, "gethostbyaddr", lambda address: ("liar", ["xen_host_2", "nowhere"], [address])
    )

    def getaddrinfo(name: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if name not in forward:
            raise socket.gaierror("unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (forward[name], 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert relocation.peer_names("10.0.0.2") == ["xen_host_2"]
    assert relocation.peer_names("10.0.0.99") == ["liar"]
