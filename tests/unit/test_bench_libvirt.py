"""The bench's libvirt rows: libvirt runs ferry's guest, and virsh's output is read right.

The libvirt runs themselves need libvirt (bench/setup-libvirt.sh) and the lab;
these check the pieces that decide what those runs measure.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.domain.config import DomainConfig, VifSpec
from ferry.domain.disks import DiskSpec
from ferry.hypervisor.cmdline import CPU_MODEL, BootFiles, kernel_command_line
from migbench.libvirt_mode import parse_events, parse_jobinfo
from migbench.libvirt_rig import domain_xml, qemu_conf

CFG = DomainConfig(
    name="virt_server",
    memory=256,
    vcpus=1,
    uuid="6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c",
    ip="10.42.0.100",
    disks=(DiskSpec("nfs://10.42.0.20/xen/virt_server.img", "xvda", True, "raw"),),
    vifs=(VifSpec("00:16:3e:4a:21:07", "xenbr0"),),
)
BOOT = BootFiles(Path("/cache/vmlinuz"), Path("/cache/initrd.img"))


def node(root: ET.Element, path: str) -> ET.Element:
    found = root.find(path)
    assert found is not None, path
    return found


def test_the_libvirt_guest_is_ferrys_guest() -> None:
    dom = ET.fromstring(domain_xml(CFG, BOOT))
    assert dom.get("type") == "qemu"  # TCG, as ferry runs here
    assert dom.findtext("name") == "virt_server"
    assert dom.findtext("uuid") == CFG.uuid
    assert (dom.findtext("memory"), node(dom, "memory").get("unit")) == ("256", "MiB")
    assert dom.findtext("os/kernel") == "/cache/vmlinuz"
    assert dom.findtext("os/initrd") == "/cache/initrd.img"
    assert dom.findtext("os/cmdline") == kernel_command_line(CFG)
    assert dom.findtext("cpu/model") == CPU_MODEL
    node(dom, "features/acpi")  # as ferry's machine (libvirt adds -no-acpi otherwise)
    disk = node(dom, "devices/disk")
    assert disk.get("type") == "network"
    assert node(disk, "source").attrib == {"protocol": "nfs", "name": "/xen/virt_server.img"}
    assert node(disk, "source/host").get("name") == "10.42.0.20"
    assert node(disk, "driver").attrib == {"name": "qemu", "type": "raw", "cache": "none"}
    assert node(disk, "address").get("slot") == "0x08"  # ferry's slot for disk 0
    nic = node(dom, "devices/interface")
    assert node(nic, "mac").get("address") == "00:16:3e:4a:21:07"
    assert node(nic, "source").get("bridge") == "xenbr0"
    assert node(nic, "address").get("slot") == "0x10"


def test_a_local_disk_is_a_file_and_other_urls_are_refused() -> None:
    local = replace(CFG, disks=(DiskSpec("/srv/vm.img", "xvda", True, "qcow2"),))
    disk = node(ET.fromstring(domain_xml(local, BOOT)), "devices/disk")
    assert disk.get("type") == "file"
    assert node(disk, "source").get("file") == "/srv/vm.img"
    assert node(disk, "driver").get("type") == "qcow2"
    assert disk.find("readonly") is None
    shared = replace(CFG, disks=(DiskSpec("/srv/iso.img", "xvdb", False, "raw"),))
    readonly = node(ET.fromstring(domain_xml(shared, BOOT)), "devices/disk")
    node(readonly, "readonly")
    nbd = replace(CFG, disks=(DiskSpec("nbd://10.0.0.1/vm", "xvda", True, "raw"),))
    with pytest.raises(ValueError, match="nbd://"):
        domain_xml(nbd, BOOT)


def test_each_libvirtd_sends_its_migration_to_its_lab_address() -> None:
    assert 'migration_host = "10.42.0.2"' in qemu_conf("10.42.0.2")


def test_events_are_read_with_qemus_own_timestamps() -> None:
    # As virsh 9.0 printed them here, on the source of a p2p migration.
    out = (
        'event MIGRATION at 1796418444.454003 for domain \'virt_server\': {"status":"setup"}\n'
        "event MIGRATION_PASS at 1796418444.454809 for domain 'virt_server': {\"pass\":1}\n"
        'event MIGRATION at 1796418444.454941 for domain \'virt_server\': {"status":"active"}\n'
        "event STOP at 1796418426.056685 for domain 'virt_server': <null>\n"
        "event MIGRATION at 1796418426.058020 for domain 'virt_server': "
        '{"status":"pre-switchover"}\n'
        "event MIGRATION at 1796418445.137294 for domain 'virt_server': "
        '{"status":"completed"}\n'
        "event RESUME at 1796418426.154990 for domain 'virt_server': <null>\n"
    )
    assert parse_events(out, "STOP") == [pytest.approx(1796418426.056685)]
    resume = parse_events(out, "RESUME")
    assert (resume[0] - parse_events(out, "STOP")[0]) * 1000 == pytest.approx(98.305, abs=1e-3)
    assert parse_events(out, "MIGRATION", "setup") == [pytest.approx(1796418444.454003)]
    assert parse_events(out, "MIGRATION", "completed") == [pytest.approx(1796418445.137294)]
    assert len(parse_events(out, "MIGRATION")) == 4
    assert parse_events(out, "MIGRATION", "failed") == []
    assert parse_events("error: failed to connect\n", "STOP") == []


def test_jobinfo_sizes_are_bytes_and_times_ms() -> None:
    # `virsh domjobinfo --completed` on the target, as libvirt 9.0 printed it here.
    out = """Job type:         Completed
Operation:        Incoming migration
Time elapsed:     908          ms
Data processed:   131.993 MiB
Data remaining:   0.000 B
Iteration:        3
Total downtime:   102          ms
"""
    job = parse_jobinfo(out)
    assert job["Time elapsed"] == 908
    assert job["Data processed"] == pytest.approx(131.993 * 2**20)
    assert job["Iteration"] == 3
    assert job["Total downtime"] == 102
    assert "Job type" not in job and "Operation" not in job
