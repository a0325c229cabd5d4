"""``ferry lab``: topology, names, shaping, daemons, storage kinds, down and crash recovery."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import pytest

from ferry.config.loader import load_domain_file
from ferry.hypervisor import process
from ferry.lab import lab as lab_mod
from ferry.lab import netns, topology
from ferry.lab.lab import Lab
from ferry.lab.lab_cli import add_lab_parser
from tests.integration.conftest import wait_for
from tests.integration.lab_fixtures import lab_fixture, lab_workdir  # noqa: F401

pytestmark = pytest.mark.integration
KINDS = ["nfs", "nbd", "dir"]


def lab_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ferry")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *argv])
    code: int = args.func(args)
    return code


def qemu_io(lab: Lab, host: str, *commands: str) -> tuple[int, str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    result = lab.run(host, [*argv, lab.scratch_disk], timeout=60)
    return result.returncode, result.stdout + result.stderr


def lab_pids(lab: Lab) -> list[int]:
    procs = [d.process for d in lab.daemons.values() if d.process] + lab.servers
    return [p.pid for p in procs]


def assert_nothing_left(workdir: Path, pids: list[int]) -> None:
    assert topology.leftovers() == []
    assert not Path(lab_mod.RUN_ROOT).exists()
    mounts = Path("/proc/mounts").read_text()
    assert "ferrylab" not in mounts and str(workdir) not in mounts
    assert [pid for pid in pids if process.is_alive(pid)] == []
    assert not (workdir / "lab.json").exists() and not (workdir / "xen").exists()


@pytest.mark.parametrize("lab", KINDS, indirect=True)
def test_nodes_reach_each_other_by_name(lab: Lab) -> None:
    result = lab.run("client_1", ["ping", "-c", "1", "-W", "2", "xen_host_2"], timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in topology.NODES:
        assert topology.resolve(node.ns, "xen_host_2") == "10.42.0.2"
        assert topology.resolve(node.ns, "virt_server") == topology.VM_ADDRESS
        assert netns.ping(node.ns, "10.42.0.20", timeout=2), f"{node.name} cannot reach storage"


def test_links_are_shaped_to_100_mbit(lab: Lab) -> None:
    for node in topology.NODES:
        assert "rate 100Mbit" in topology.qdisc(node.ns, "eth0")
        assert "rate 100Mbit" in topology.qdisc(topology.LAN_NS, node.lan_port)
    rate = topology.measure_throughput("xen_host_1", "xen_host_2", seconds=3)
    print(f"one TCP flow xen_host_1 -> xen_host_2: {rate / 1e6:.1f} Mbit/s")
    assert 85e6 <= rate <= 115e6
    back = topology.measure_throughput("client_2", "client_1", seconds=2)
    assert 85e6 <= back <= 115e6


@pytest.mark.parametrize("lab", ["nfs"], indirect=True)
def test_ferryd_answers_in_both_hosts(lab: Lab, capfd: pytest.CaptureFixture[str]) -> None:
    for host in ("xen_host_1", "xen_host_2"):
        assert lab_cli("exec", "--workdir", str(lab.workdir), host, "ferry", "list") == 0
        out, err = capfd.readouterr()
        assert out.startswith("Name"), out + err
    assert lab_cli("exec", "--workdir", str(lab.workdir), "client_1", "sh", "-c", "exit 7") == 7
    assert lab_cli("status", "--workdir", str(lab.workdir)) == 0


@pytest.mark.parametrize("lab", KINDS, indirect=True)
def test_qemu_writes_on_one_host_and_reads_on_the_other(lab: Lab) -> None:
    code, out = qemu_io(lab, "xen_host_1", "write -P 0xab 0 4k", "read -P 0xab 0 4k")
    assert code == 0 and "Pattern verification failed" not in out, out
    code, out = qemu_io(lab, "xen_host_2", "read -P 0xab 0 4k", "write -P 0xcd 4k 4k")
    assert code == 0 and "Pattern verification failed" not in out, out
    with (lab.export_dir / "scratch.img").open("rb") as image:
        assert image.read(8192) == b"\xab" * 4096 + b"\xcd" * 4096


@pytest.mark.parametrize("lab", KINDS, indirect=True)
def test_domain_config_names_the_lab_disk(lab: Lab) -> None:
    cfg = load_domain_file(lab.domain_config)
    assert [d.path for d in cfg.disks] == [lab.disk]
    assert cfg.name == "virt_server"


@pytest.mark.parametrize("lab", KINDS, indirect=True)
def test_down_leaves_nothing_behind(lab: Lab) -> None:
    pids = lab_pids(lab)
    assert all(process.is_alive(pid) for pid in pids)
    assert lab_cli("down", "--workdir", str(lab.workdir)) == 0
    assert_nothing_left(lab.workdir, pids)


@pytest.mark.parametrize("forget_state", [False, True], ids=["with-state", "without-state"])
def test_up_after_a_crash_cleans_and_comes_up(lab: Lab, forget_state: bool) -> None:
    old = lab_pids(lab)
    # As a crash would end them; namespaces and rpcbind are left in place.
    crashed = [d.process for d in lab.daemons.values() if d.process]
    crashed += [s for s in lab.servers if s.name == "ganesha"]
    for proc in crashed:
        os.kill(proc.pid, signal.SIGKILL)
    dead = [proc.pid for proc in crashed]
    wait_for(lambda: not any(process.is_alive(pid) for pid in dead), 10, "crashed daemons to die")
    if forget_state:
        (lab.workdir / "lab.json").unlink()
    again = lab_mod.up("nfs", workdir=lab.workdir, log=print)
    assert [pid for pid in old if process.is_alive(pid)] == []
    result = again.run("xen_host_2", ["ferry", "list"], timeout=30)
    assert result.returncode == 0, result.stderr
    code, out = qemu_io(again, "xen_host_1", "write -P 0x11 0 4k", "read -P 0x11 0 4k")
    assert code == 0, out
    pids = lab_pids(again)
    lab_mod.down(lab.workdir, log=print)
    assert_nothing_left(lab.workdir, pids)
