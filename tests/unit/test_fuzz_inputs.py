"""Fuzzing every other parser a stranger or a careless file can reach.

- the control API (a real ControlServer on its unix socket, on its own loop):
  any request gets one JSON line, ``ok`` or a one-line error that is not an
  internal one, and the server keeps answering;
- the config parsers (xm, TOML domain, ``xend-config.sxp``, ``ferryd.toml``):
  any text gives a config or a one-line ``ConfigError``, nothing else;
- the media server (real, on loopback): any request head gets an HTTP status
  line (or a close), never a traceback, and the server keeps serving; its
  Range parser alone, on any header.

``FERRY_FUZZ_EXAMPLES`` sets the inputs per test, as in test_fuzz_relocation.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.config._common import build_domain
from ferry.config.host import HostConfig, parse_host_toml, parse_xend_config
from ferry.config.toml_domain import parse_toml_domain_located
from ferry.config.xm import parse_xm_located
from ferry.daemon.api import ControlServer
from ferry.daemon.services import Services
from ferry.errors import ConfigError
from ferry.host.layout import HostLayout
from ferry.hypervisor.cmdline import BootFiles
from ferry.stream.mediaserver.config import Config
from ferry.stream.mediaserver.ranges import Unsatisfiable, parse_range
from ferry.stream.mediaserver.server import MediaServer

from .fuzz_support import FUZZ, json_values

OPS = ["ping", "list", "info", "create", "pause", "unpause", "shutdown", "destroy",
       "migrate", "migrate_abort", "console_attach", "bogus"]  # fmt: skip


def one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


# -- the control API --------------------------------------------------------------


class ControlTarget:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        layout = HostLayout(tmp / "state", tmp / "run")
        layout.create()
        host = HostConfig(
            name="h1", state_dir=layout.state_dir, run_dir=layout.run_dir, accel="tcg"
        )
        services = Services.build(host, layout, lambda cfg: BootFiles(Path("/k"), None), None)
        self.server = ControlServer(services, layout.control_socket)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def exchange(self, line: bytes) -> Any:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(15)
            sock.connect(str(self.server.socket_path))
            sock.sendall(line + b"\n")
            reply = sock.makefile("rb").readline()
        return json.loads(reply) if reply else None

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlTarget]:
    target = ControlTarget(tmp_path_factory.mktemp("control"))
    yield target
    target.close()


def assert_answered(reply: Any) -> None:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        error = reply["error"]
        assert one_line(error["message"]), error
        assert "internal error" not in error["message"], error


@FUZZ
@given(op=st.sampled_from(OPS) | st.text(max_size=12), args=json_values)
def test_control_any_request(control: ControlTarget, op: str, args: Any) -> None:
    if op == "console_attach":
        op = "info"  # a console would hold the connection open by design
    assert_answered(control.exchange(json.dumps({"op": op, "args": args}).encode()))
    assert control.exchange(b'{"op": "ping"}')["ok"] is True


@FUZZ
@given(data=st.binary(max_size=300))
def test_control_any_bytes(control: ControlTarget, data: bytes) -> None:
    reply = control.exchange(data.replace(b"\n", b" "))
    if reply is not None:
        assert_answered(reply)
    assert control.exchange(b'{"op": "ping"}')["ok"] is True


# -- the config parsers ------------------------------------------------------------

XM_KEYS = ["name", "memory", "vcpus", "disk", "vif", "kernel", "ip", "on_crash", "bootloader",
           "maxmem", "uuid", "extra", "root", "netmask", "gateway", "sdl", "x"]  # fmt: skip
python_literals = st.recursive(
    st.integers().map(str)
    | st.text(max_size=20).map(repr)
    | st.sampled_from(["True", "None", "1e999", "-1", "0x10", "f(x)", "[", "'a' + 'b'"]),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=8,
)
xm_lines = st.lists(
    st.tuples(st.sampled_from(XM_KEYS), python_literals).map(lambda kv: f"{kv[0]} = {kv[1]}")
    | st.text(max_size=40),
    max_size=8,
).map("\n".join)
toml_values = st.sampled_from(['"x"', "1", "-5", "true", "[1, 2]", '["a"]', "{a = 1}", "1.5",
                               '"/xen/a.img"', "nan", '"""', "[[", "9" * 30])  # fmt: skip
toml_lines = st.lists(
    st.tuples(st.sampled_from([*XM_KEYS, "disk", "[[disk]]", "[relocation]", "path", "port",
                               "hosts_allow", "storage_roots", "insecure", "[control]"]),
              toml_values).map(lambda kv: kv[0] if kv[0].startswith("[") else f"{kv[0]} = {kv[1]}")
    | st.text(max_size=40),
    max_size=8,
).map("\n".join)  # fmt: skip
sxp_atoms = st.sampled_from(["xend-relocation-server", "yes", "xend-relocation-port", "8002",
                             "xend-relocation-hosts-allow", "''", "'^a$ ^b$'", "dom0-min-mem",
                             "(", ")", '"', "x"])  # fmt: skip
sxp_text = st.lists(sxp_atoms | st.text(max_size=10), max_size=20).map(" ".join)


def only_config_errors(parse: Any, text: str) -> None:
    try:
        parse(text)
    except ConfigError as err:
        assert one_line(str(err)), str(err)


def xm(text: str) -> None:
    mapping, where = parse_xm_located(text, "fuzz")
    build_domain(mapping, "fuzz", where)


def toml_domain(text: str) -> None:
    mapping, where = parse_toml_domain_located(text, "fuzz.toml")
    build_domain(mapping, "fuzz.toml", where)


@FUZZ
@given(text=xm_lines | st.text(max_size=200))
def test_xm_configs(text: str) -> None:
    only_config_errors(xm, text)


@FUZZ
@given(text=toml_lines | st.text(max_size=200))
def test_toml_configs(text: str) -> None:
    only_config_errors(toml_domain, text)
    only_config_errors(lambda t: parse_host_toml(t, "ferryd.toml"), text)


@FUZZ
@given(text=sxp_text | st.text(max_size=200))
def test_xend_configs(text: str) -> None:
    only_config_errors(lambda t: parse_xend_config(t, "xend-config.sxp"), text)


# -- the media server --------------------------------------------------------------


class MediaTarget:
    def __init__(self, root: Path) -> None:
        self.errors: list[str] = []
        self.server = MediaServer(Config(root=root, bind="127.0.0.1", port=0, pace=0.0))
        original = self.server.handle_error

        def record(request: Any, client_address: Any) -> None:
            import sys

            err = sys.exc_info()[1]
            if not isinstance(err, OSError):
                self.errors.append(repr(err))
            original(request, client_address)

        self.server.handle_error = record  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.port = self.server.socket.getsockname()[1]

    def exchange(self, head: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as sock:
            sock.sendall(head)
            sock.shutdown(socket.SHUT_WR)
            return sock.makefile("rb").readline()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaTarget]:
    root = tmp_path_factory.mktemp("media")
    (root / "movie.ogg").write_bytes(b"OggS" + bytes(5000))
    (root / "sub").mkdir()
    target = MediaTarget(root)
    yield target
    target.close()


header_values = st.text(max_size=30).map(lambda s: s.replace("\r", "").replace("\n", "")) | (
    st.sampled_from(
        [
            "bytes=0-",
            "bytes=²-",
            "bytes=-0",
            "bytes=5-2",
            "bytes=0-1,2-3",
            "bytes=99999999999999999999-",
            "bytes= 1 - 2 ",
        ]
    )
)
request_heads = st.builds(
    lambda method, path, headers: (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers)
        + "\r\n"
    ).encode("utf-8", "surrogateescape"),
    st.sampled_from(["GET", "HEAD", "POST", "DELETE", "G\x00T", ""]),
    st.sampled_from(["/movie.ogg", "/", "/sub/", "/../etc/passwd", "/%2e%2e/", "/?search=a",
                     "/stats", "/movie.ogg?x=%ff", "//", "*"]) | st.text(max_size=20),
    st.lists(st.tuples(st.sampled_from(["Range", "Host", "Connection", "X"]), header_values),
             max_size=3),
)  # fmt: skip


@FUZZ
@given(head=request_heads | st.binary(max_size=300))
def test_media_server_any_request(media: MediaTarget, head: bytes) -> None:
    line = media.exchange(head)
    assert line == b"" or line.startswith(b"HTTP/1."), line
    assert media.errors == []
    assert media.exchange(b"HEAD /movie.ogg HTTP/1.0\r\n\r\n").split()[1] == b"200"


@FUZZ
@given(header=header_values | st.text(max_size=30), size=st.integers(0, 10**6))
def test_range_header(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except Unsatisfiable:
        return
    if got is not None:
        first, last = got
        assert 0 <= first <= last < size
