"""How the memory stream is carried: the plan, the one-time key, and the channels' socket option."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from ferry.errors import ConfigError, MigrationError, MigrationRefused
from ferry.hypervisor.qemu_sockets import (
    TCP_NOTSENT_LOWAT,
    set_notsent_lowat,
    socket_fds_to_port,
)
from ferry.migration.params import MigrationParams
from ferry.migration.stream_plan import plan_stream
from ferry.migration.stream_setup import uri_host
from ferry.pki.qemu_psk import StreamKey


def params(**kw: object) -> MigrationParams:
    return MigrationParams.from_wire(kw)


def test_auto_on_a_secure_host_with_two_cpus_is_zstd_on_two_channels() -> None:
    plan = plan_stream(params(), secure=True, cpus=2)
    assert (plan.params.channels, plan.params.compression) == (2, "zstd")
    assert plan.params.multifd and "2 CPUs" in plan.reason
    assert plan.params.qemu_parameters()["multifd-compression"] == "zstd"
    assert plan.params.capabilities()["multifd"] is True


def test_one_cpu_keeps_one_stream_and_says_why() -> None:
    plan = plan_stream(params(), secure=True, cpus=1)
    assert not plan.params.multifd and plan.params.compression == "none"
    assert "1 CPU" in plan.reason
    assert "multifd-channels" not in plan.params.qemu_parameters()


def test_an_insecure_host_keeps_the_gated_fd_stream() -> None:
    plan = plan_stream(params(), secure=False, cpus=8)
    assert not plan.params.multifd and "insecure" in plan.reason
    with pytest.raises(MigrationRefused, match="need TLS"):
        plan_stream(params(compression="zstd"), secure=False, cpus=8)
    with pytest.raises(MigrationRefused, match="need TLS"):
        plan_stream(params(channels=4), secure=False, cpus=8)


def test_what_the_operator_asks_is_kept() -> None:
    assert not plan_stream(params(channels=1), secure=True, cpus=8).params.multifd
    assert not plan_stream(params(compression="none"), secure=True, cpus=8).params.multifd
    asked = plan_stream(params(channels=3, compression="zlib"), secure=True, cpus=1).params
    assert (asked.channels, asked.compression) == (3, "zlib")
    plain = plan_stream(params(channels=2, compression="none"), secure=True, cpus=2).params
    assert plain.multifd and plain.qemu_parameters()["multifd-compression"] == "none"


def test_postcopy_runs_on_one_stream_held_before_its_switch() -> None:
    for secure in (True, False):
        plan = plan_stream(params(postcopy=True), secure=secure, cpus=8)
        assert not plan.params.multifd and plan.params.compression == "none"
        assert "post-copy" in plan.reason
        caps = plan.params.capabilities()
        assert caps["postcopy-ram"] and caps["pause-before-switchover"]
    caps = plan_stream(params(), secure=True, cpus=8).params.capabilities()
    assert not caps["postcopy-ram"] and not caps["pause-before-switchover"]


@pytest.mark.parametrize(
    "bad",
    [{"compression": "lz4"}, {"channels": 17}, {"channels": -1},
     {"channels": 1, "compression": "zstd"}, {"compression": 3},
     {"postcopy": True, "channels": 2}, {"postcopy": True, "compression": "zstd"},
     {"postcopy": "yes"}],
)  # fmt: skip
def test_bad_stream_settings_are_refused_in_one_line(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as err:
        MigrationParams.from_wire(bad, "migrate request")
    assert str(err.value).startswith("migrate request: ") and "\n" not in str(err.value)


def test_an_unresolved_auto_never_reaches_qemu() -> None:
    with pytest.raises(ConfigError, match="not resolved"):
        params(channels=2).qemu_parameters()


def test_the_stream_key_file_is_private_and_holds_this_migration_only(tmp_path: Path) -> None:
    key = StreamKey.new("ab" * 16)
    key.write(tmp_path / "k")
    keys = tmp_path / "k" / "keys.psk"
    assert keys.read_text() == f"{key.username}:{key.key}\n"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert (tmp_path / "k" / "dh-params.pem").exists()
    assert key != StreamKey.new("ab" * 16)  # fresh each time


@pytest.mark.parametrize(
    ("name", "key"),
    [("ferry-ab", "00" * 31), ("ferry-ab", "zz" * 32), ("other:x", "00" * 32), (None, "00" * 32)],
)
def test_a_malformed_stream_key_from_the_target_is_refused(name: object, key: object) -> None:
    with pytest.raises(MigrationError):
        StreamKey.from_wire(name, key)


def test_ipv6_targets_are_bracketed_in_the_uri() -> None:
    assert uri_host("10.0.0.2") == "10.0.0.2"
    assert uri_host("fd00::2") == "[fd00::2]"
    assert uri_host("host-b") == "host-b"


def test_the_low_water_mark_is_set_on_another_process_s_socket() -> None:
    """As on QEMU's channels: found by the remote port, set through a copied descriptor."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    try:
        found = socket_fds_to_port(os.getpid(), port)
        assert list(found) == [client.fileno()]  # not the listener, not the accepted end
        # By address too: the same port on another host is someone else's connection.
        assert list(socket_fds_to_port(os.getpid(), port, "127.0.0.1")) == [client.fileno()]
        assert socket_fds_to_port(os.getpid(), port, "::ffff:127.0.0.1") == found
        assert socket_fds_to_port(os.getpid(), port, "127.0.0.2") == {}
        set_notsent_lowat(os.getpid(), list(found), 131072)
        assert client.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == 131072
    finally:
        for s in (client, accepted, server):
            s.close()
