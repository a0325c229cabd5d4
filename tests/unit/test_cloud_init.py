"""[cloud_init]: the table, the NoCloud files, the seed image, and the guest's reader of it."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ferry.config.toml_domain import parse_toml_domain
from ferry.domain.config import DomainConfig
from ferry.errors import ConfigError
from ferry.hypervisor.seed import build_seed, seed_digest
from tests.unit.guest_files import load_init

nocloud = load_init("nocloud")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample ops@station"
TOML = f"""
name = "web"
uuid = "6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c"
ip = "10.42.0.100"
netmask = "255.255.255.0"
gateway = "10.42.0.254"
firmware = "uefi"
[[disk]]
path = "/xen/web.qcow2"
[[vif]]
mac = "00:16:3e:4a:21:07"
bridge = "xenbr0"
[cloud_init]
hostname = "web1"
nameservers = ["10.42.0.53"]
ssh_authorized_keys = ["{KEY}"]
[[cloud_init.users]]
name = "ops"
sudo = true
ssh_authorized_keys = ["{KEY}"]
"""


def config(text: str = TOML) -> DomainConfig:
    return DomainConfig.from_mapping(parse_toml_domain(text, "web.toml"), "web.toml")


def test_seed_files_carry_hostname_users_and_the_static_network() -> None:
    files = config().seed_files()
    assert files is not None
    assert json.loads(files["meta-data"]) == {
        "instance-id": "6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c",
        "local-hostname": "web1",
    }
    user_data = files["user-data"].decode()
    assert user_data.startswith("#cloud-config\n")
    doc = json.loads(user_data.split("\n", 1)[1])
    assert doc["ssh_authorized_keys"] == [KEY]
    assert doc["users"][1] == {
        "name": "ops", "shell": "/bin/sh", "ssh_authorized_keys": [KEY],
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
    }  # fmt: skip
    assert json.loads(files["network-config"]) == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": "00:16:3e:4a:21:07"},
                "set-name": "eth0",
                "addresses": ["10.42.0.100/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "10.42.0.254"}],
                "nameservers": {"addresses": ["10.42.0.53"]},
            }
        },
    }


def test_the_table_survives_the_round_trip_through_the_api() -> None:
    cfg = config()
    again = DomainConfig.from_mapping(json.loads(json.dumps(cfg.to_mapping())))
    assert again == cfg and again.seed_files() == cfg.seed_files()
    # The address goes to the guest in its seed: not reported as unused.
    assert not any("not given to the guest" in n for n in again.ignored)


def test_user_data_replaces_the_generated_document() -> None:
    text = TOML.replace(
        'hostname = "web1"\n', 'hostname = "web1"\nuser_data = """#!/bin/sh\necho hi\n"""\n'
    )
    files = config(text).seed_files()
    assert files is not None and files["user-data"] == b"#!/bin/sh\necho hi\n"


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"hostname": "bad host"}, "cloud_init.hostname"),
        ({"users": [{"name": "Root!"}]}, "cloud_init.users[0].name"),
        ({"ssh_authorized_keys": ["not a key"]}, "is not an SSH public key"),
        ({"userdata": "x"}, "cloud_init.userdata': unknown key"),
        ({"user_data": ""}, "expected the user-data document"),
        ({"nameservers": ["ns1"]}, "cloud_init.nameservers"),
    ],
)
def test_bad_tables_are_refused(table: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why.replace("[", r"\[").replace("]", r"\]")):
        DomainConfig.from_mapping({"name": "a", "cloud_init": table})


def test_no_table_no_seed() -> None:
    assert DomainConfig.from_mapping({"name": "a"}).seed_files() is None
    assert tomllib.loads(TOML)["cloud_init"]["hostname"] == "web1"


def test_the_seed_image_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    files = config().seed_files()
    assert files is not None
    first = build_seed(files, tmp_path / "a.img")
    assert seed_digest(files) == first
    changed = dict(files, **{"meta-data": b'{"local-hostname": "other"}\n'})
    assert seed_digest(changed) != first
    blkid = subprocess.run(
        ["blkid", "-o", "export", str(tmp_path / "a.img")], capture_output=True, text=True
    ).stdout
    assert "LABEL=CIDATA" in blkid and "TYPE=vfat" in blkid


def test_the_guest_finds_the_seed_by_its_label(tmp_path: Path) -> None:
    files = config().seed_files()
    assert files is not None
    blocks, dev = tmp_path / "sys", tmp_path / "dev"
    blocks.mkdir()
    dev.mkdir()
    for name in ("vda", "vdb"):
        (blocks / name).mkdir()
    (dev / "vda").write_bytes(b"\0" * 1024)
    build_seed(files, dev / "vdb")
    assert nocloud.find_seed(str(blocks), str(dev)) == str(dev / "vdb")
    (dev / "vdb").write_bytes(b"\0" * 1024)
    assert nocloud.find_seed(str(blocks), str(dev)) is None


def test_the_guest_reads_the_network_and_hostname_ferry_wrote() -> None:
    files = config().seed_files()
    assert files is not None
    meta = nocloud.parse_document(files["meta-data"])
    assert meta["local-hostname"] == "web1"
    found = nocloud.static_address(nocloud.parse_document(files["network-config"]))
    assert found == ("10.42.0.100", 24, "10.42.0.254", "00:16:3e:4a:21:07")
    # Another tool's block-YAML meta-data still gives the host name.
    assert (
        nocloud.parse_document(b"instance-id: i-1\nlocal-hostname: web2\n")["local-hostname"]
        == "web2"
    )


def test_the_guest_finds_its_interface_by_mac(tmp_path: Path) -> None:
    for name, mac in (("lo", "00:00:00:00:00:00"), ("ens3", "00:16:3e:4a:21:07")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    assert nocloud.device_with_mac("00:16:3e:4a:21:07", str(tmp_path)) == "ens3"
    assert nocloud.device_with_mac(None, str(tmp_path)) == "eth0"
