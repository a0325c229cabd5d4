"""The cluster views of the CLI: `ferry list --all` and `ferry host list`."""

from __future__ import annotations

from ferry.cli.host_cli import format_hosts
from ferry.cli.main import build_parser, format_cluster_list


def test_list_all_shows_each_domain_with_its_host() -> None:
    text = format_cluster_list(
        [
            {"host": "xen_host_1", "name": "virt_server", "id": 3, "mem": 256, "vcpus": 1,
             "state": "running"},
            {"host": "xen_host_2", "name": "web", "id": None, "mem": None, "vcpus": None,
             "state": "host lost"},
        ]
    )  # fmt: skip
    lines = text.splitlines()
    assert lines[0].split() == ["Host", "Name", "ID", "Mem", "VCPUs", "State"]
    assert lines[1].split() == ["xen_host_1", "virt_server", "3", "256", "1", "running"]
    assert lines[2].split() == ["xen_host_2", "web", "-", "-", "-", "host", "lost"]


def test_host_list_shows_lease_capacity_and_a_standalone_host() -> None:
    text = format_hosts(
        [
            {"host": "xen_host_1", "health": "up", "maintenance": True, "lease_ttl_left": 5,
             "lease_ttl": 6, "domains": 2, "cpus": 8, "free_mib": 1000, "memory_mib": 4000,
             "mode": "cluster"},
            {"host": "solo", "health": "up", "mode": "standalone (local ownership only)",
             "domains": 0, "cpus": 2},
        ]
    )  # fmt: skip
    first, second = text.splitlines()[1:]
    assert first.split()[:8] == ["xen_host_1", "up", "yes", "5/6", "2", "8", "1000/4000", "cluster"]
    assert "standalone (local ownership only)" in second and " - " in second


def test_the_parser_knows_the_cluster_verbs() -> None:
    args = build_parser().parse_args(["list", "--all", "--json"])
    assert args.all and args.json
    args = build_parser().parse_args(["host", "list"])
    assert args.func.__name__ == "cmd_list"
