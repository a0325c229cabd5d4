"""xm domain files: the classic file as it is, translation rules, and refusal of code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferry.config.loader import find_domain_file, load_domain_file
from ferry.config.xm import load_xm, parse_xm
from ferry.domain.config import DomainConfig
from ferry.errors import ConfigError

CLASSIC = Path(__file__).resolve().parents[3] / "shared" / "classic"


def write(tmp_path: Path, text: str | bytes, name: str = "vm") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_domain_file(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- the classic file ------------------------------------------------------------


@pytest.fixture
def classic_vm() -> Path:
    path = CLASSIC / "virt_server"
    if not path.is_file():
        pytest.skip(f"classic files not found at {CLASSIC} (shared/ must sit beside the repo)")
    return path


def test_classic_virt_server_imports_as_it_is(classic_vm: Path) -> None:
    config = load_xm(classic_vm)
    assert config.name == "virt_server"
    assert config.uuid == "6f2a8c1e-3b1d-4c2e-9a57-1d2e3f4a5b6c"
    assert (config.memory, config.vcpus) == (512, 1)
    assert config.kernel is None
    assert (config.on_poweroff, config.on_reboot, config.on_crash) == (
        "destroy",
        "restart",
        "restart",
    )
    assert config.sdl is True and config.vnc is False
    assert [d.to_mapping() for d in config.disks] == [
        {"path": "/xen/virt_server.img", "target": "xvda", "mode": "w"}
    ]
    assert [v.to_mapping() for v in config.vifs] == [
        {"mac": "00:16:3e:4a:21:07", "bridge": "xenbr0"}
    ]
    assert config.root == "/dev/vda"


def test_classic_virt_server_says_what_it_ignores(classic_vm: Path) -> None:
    notes = load_xm(classic_vm).ignored
    assert any(
        n.startswith(
            "bootloader='/usr/bin/pygrub' mapped: the disk's own bootloader boots the guest's "
            "kernel (firmware bios)"
        )
        for n in notes
    )
    assert any(n.startswith("maxmem=512 ignored: no ballooning") for n in notes)
    assert any(n.startswith("sdl=1 ignored: ferry runs QEMU headless") for n in notes)
    assert len(notes) == 3


def test_classic_virt_server_found_and_loaded_through_loader(classic_vm: Path) -> None:
    found = find_domain_file(str(classic_vm))
    config = load_domain_file(found, ["vcpus=2", "memory=256"])
    assert (config.vcpus, config.memory) == (2, 256)


# -- translation rules ----------------------------------------------------------


def test_disk_types_map_to_paths_and_devices() -> None:
    mapping = parse_xm(
        "name = 'a'\n"
        "disk = ['file:/xen/a.img,xvda,w',\n"
        "        'phy:sdb,ioemu:hdb,r',\n"
        "        'tap:tapdisk:aio:/xen/c.img,xvdc,w',\n"
        "        'nbd://store:10809/d,xvdd,w',\n"
        "        'phy:/dev/vg/e,sde,w!',\n"
        "        ',hdc:cdrom,r']\n",
        "vm",
    )
    assert mapping["disk"] == [
        {"path": "/xen/a.img", "target": "xvda", "mode": "w"},
        {"path": "/dev/sdb", "target": "hdb", "mode": "r"},
        {"path": "/xen/c.img", "target": "xvdc", "mode": "w"},
        {"path": "nbd://store:10809/d", "target": "xvdd", "mode": "w"},
        {"path": "/dev/vg/e", "target": "sde", "mode": "w"},
    ]
    assert any("mode 'w!' taken as 'w'" in n for n in mapping["ignored"])
    assert any("CD-ROM" in n for n in mapping["ignored"])


@pytest.mark.parametrize(
    ("disk", "why"),
    [
        ("tap:qcow:/xen/a.qcow,xvda,w", "image format 'qcow' is not supported"),
        ("drbd:res0,xvda,w", "disk type 'drbd:' is not supported"),
        ("file:/xen/a.img,xvda1,w", "partition target 'xvda1' cannot be honoured"),
        ("file:/xen/a.img,xvda", "expected 'type:path,target,mode'"),
        ("file:/xen/a.img,xvda,w,dom1", "driver) domain is not supported"),
    ],
)
def test_unusable_disks_are_refused_with_their_line(tmp_path: Path, disk: str, why: str) -> None:
    path = write(tmp_path, f"name = 'a'\n\ndisk = [\n  '{disk}',\n]\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: disk ")
    assert why in message


def test_validator_error_on_a_disk_gets_the_item_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "name = 'a'\ndisk = ['file:/xen/a.img,xvda,w',\n 'file:relative,xvdb,w']\n"
    )
    message = error_of(path)
    assert message.startswith(f"{path}:3: 'disk[1].path'")


def test_vif_keys_and_defaults() -> None:
    mapping = parse_xm(
        "name = 'a'\n"
        "vif = ['mac=00:16:3e:12:34:56, bridge=br1 , ip=10.0.0.5, script=vif-bridge', '']\n",
        "vm",
    )
    assert mapping["vif"] == [{"mac": "00:16:3e:12:34:56", "bridge": "br1"}, {}]
    notes = mapping["ignored"]
    assert any(
        n.startswith("vif[0] ip=10.0.0.5 ignored: xm gave it to the host's vif") for n in notes
    )
    assert any(n.startswith("vif[0] script=vif-bridge ignored") for n in notes)
    assert "ip" not in mapping


def test_vif_default_entry_gets_a_xen_mac_and_xenbr0(tmp_path: Path) -> None:
    config = load_xm(write(tmp_path, "name = 'a'\nvif = ['']\n"))
    assert config.vifs[0].bridge == "xenbr0"
    assert config.vifs[0].mac.startswith("00:16:3e:")


@pytest.mark.parametrize(
    ("vif", "why"),
    [
        ("mac=00:16:3e:12:34:56,brigde=xenbr0", "unknown vif key 'brigde'"),
        ("mac", "'mac' is not key=value"),
        ("bridge=a,bridge=b", "'bridge' given twice"),
    ],
)
def test_bad_vifs_are_refused(tmp_path: Path, vif: str, why: str) -> None:
    path = write(tmp_path, f"name = 'a'\nvif = ['{vif}']\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: vif ")
    assert why in message


def test_root_is_renamed_to_virtio_and_flags_move_to_extra() -> None:
    mapping = parse_xm("name='a'\nroot = '/dev/xvda1 ro'\nextra = 'console=hvc0'\n", "vm")
    assert mapping["root"] == "/dev/vda1"
    assert mapping["extra"] == "ro console=hvc0"
    assert any("root='/dev/xvda1 ro' taken as '/dev/vda1'" in n for n in mapping["ignored"])


def test_bootloader_with_a_kernel_says_the_kernel_is_used() -> None:
    mapping = parse_xm("name='a'\nkernel='/boot/vmlinuz'\nbootloader='/usr/bin/pygrub'\n", "vm")
    assert any("kernel '/boot/vmlinuz' is booted directly" in n for n in mapping["ignored"])


def test_pygrub_config_boots_from_its_disk() -> None:
    mapping = parse_xm("name='a'\nbootloader='/usr/bin/pygrub'\n", "vm")
    config = DomainConfig.from_mapping(mapping)
    assert config.boots_from_disk and config.firmware == "bios" and config.kernel is None


def test_hvmloader_is_mapped_to_the_bios() -> None:
    mapping = parse_xm("name='w'\nkernel='/usr/lib/xen/boot/hvmloader'\nbuilder='hvm'\n", "vm")
    assert "kernel" not in mapping
    assert any("hvmloader' mapped: Xen's HVM firmware" in n for n in mapping["ignored"])


def test_uefi_firmware_is_taken_with_a_bootloader() -> None:
    mapping = parse_xm("name='a'\nfirmware='uefi'\nbootloader='pygrub'\n", "vm")
    assert mapping["firmware"] == "uefi"
    assert any("(firmware uefi)" in n for n in mapping["ignored"])


def test_qcow2_disk_states_its_format() -> None:
    mapping = parse_xm("name='a'\ndisk=['tap:qcow2:/xen/a.qcow2,xvda,w']\n", "vm")
    assert mapping["disk"] == [
        {"path": "/xen/a.qcow2", "target": "xvda", "mode": "w", "format": "qcow2"}
    ]


def test_kernel_ip_keys_and_none_values() -> None:
    mapping = parse_xm(
        "name='a'\nip='10.0.0.5'\nnetmask='255.255.0.0'\ngateway='10.0.0.1'\n"
        "hostname='web'\nkernel=None\nmemory=-1\n",
        "vm",
    )
    assert mapping["ip"] == "10.0.0.5" and mapping["hostname"] == "web"
    assert "kernel" not in mapping
    assert mapping["memory"] == -1


def test_vnc_and_other_real_xm_keys_are_noted(tmp_path: Path) -> None:
    text = "name='a'\nvnc=1\nvncunused=1\ncpus='0-1'\nacpi=1\nlocaltime=0\npci=['01:00.0']\n"
    config = load_xm(write(tmp_path, text))
    joined = "\n".join(config.ignored)
    for key in ("vnc=1", "vncunused=1", "cpus='0-1'", "acpi=1", "localtime=0", "pci=['01:00.0']"):
        assert f"{key} ignored: " in joined
    assert config.vnc is True


def test_unknown_key_names_file_line_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "name = 'a'\n\nmemroy = 512\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: unknown key 'memroy'")
    assert "did you mean 'memory'" in message


def test_key_assigned_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name = 'a'\nmemory = 256\n\nmemory = 512\n")
    assert error_of(path) == f"{path}:4: 'memory' assigned twice: lines 2 and 4"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('memory = "lots"', "'memory': expected an integer, got str 'lots'"),
        ("vcpus = [1]", "'vcpus': expected an integer, got list [1]"),
        ("memory = True", "'memory': expected an integer, got bool True"),
        ("on_crash = 'explode'", "'on_crash': 'explode' is not one of"),
    ],
)
def test_wrong_types_name_the_key_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = write(tmp_path, f"name = 'a'\n# comment\n{line}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: {why}")


# -- refusing code ---------------------------------------------------------------

SENTINEL_CASES = [
    ("__import__('os').system('touch {s}')", 1, "function call"),
    ("name = 'a'\nname2 = __import__('os').system('touch {s}')", 2, "function call"),
    ("name = open('{s}', 'w').write('x')", 1, "function call"),
    ("import os\nos.system('touch {s}')", 1, "import"),
    ("from os import system", 1, "import"),
    ("name = \"a\"; exec(\"open('{s}', 'w')\")", 1, "function call"),
    ("name = (lambda: open('{s}', 'w'))()", 1, "function call"),
    ("name = 'a'\nmemory = [open('{s}','w') for i in range(3)][0]", 2, "subscript"),
    ("name = 'a'\nx = [open('{s}', 'w') for i in range(3)]", 2, "comprehension"),
    ("name = 'a'\ndisk = [f\"{{open('{s}','w')}}\"]", 2, "f-string"),
    ("def f():\n    open('{s}', 'w')\nname = f()", 1, "function definition"),
    ("class A:\n    open('{s}', 'w')", 1, "class definition"),
    ("name = 'a'\nif True:\n    open('{s}', 'w')", 2, "'if' statement"),
    ("name = 'a'\nwith open('{s}', 'w'):\n    pass", 2, "'with' statement"),
]


@pytest.mark.parametrize(("template", "line", "what"), SENTINEL_CASES)
def test_code_is_refused_and_never_run(tmp_path: Path, template: str, line: int, what: str) -> None:
    sentinel = tmp_path / "pwned"
    path = write(tmp_path, template.format(s=sentinel) + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: ")
    assert what in message
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("name = 'a'\nmemory = 512 * 2", 2, "'memory': expression refused"),
        ("name = 'a'\ndel name", 2, "'del' statement refused"),
        ('name: str = "x"', 1, "annotated assignment refused"),
        ("name = 'a'\nmemory = 1\nmemory += 1", 3, "augmented assignment refused"),
        ("name = 'a'\nkernel = name", 2, "name 'name' (quote it"),
        ("name = 'a'\nextra = os.environ", 2, "attribute access refused"),
        ("name = 'a'\na = b = 1", 2, "chained assignment refused"),
        ("name, memory = 'a', 1", 1, "multiple-target assignment refused"),
        ("name = 'a'\nx[0] = 1", 2, "assignment to subscript refused"),
        ("name = 'a'\nname.x = 1", 2, "assignment to attribute access refused"),
        ("name = 'a'\nextra = {'a': 1}", 2, "dict refused"),
        ("name = b'a'", 1, "bytes literal refused"),
        ("name = 'a'\nmemory = 1j", 2, "complex literal refused"),
        ("name = 'a'\nmemory = -True", 2, "expression refused"),
        ("name = 'a'\n'docstring'", 2, "bare expression refused"),
        ("name = 'a'\ndisk = [[[['x']]]]", 2, "lists nested too deeply"),
        ("name = 'a'\nmemory = (" * 1 + "(" * 300 + "1" + ")" * 301, 2, "syntax error"),
        ("name = 'a'\nmemory = ", 2, "syntax error: invalid syntax"),
        ("name = 'a'\n  memory = 1", 2, "syntax error: unexpected indent"),
        ("name = 'a'\nmemory = 0755", 2, "syntax error"),
    ],
)
def test_non_literals_are_refused(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = write(tmp_path, text + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: ")
    assert what in message


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"name = 'a'\n# caf\xe9\n")
    assert error_of(path) == f"{path}:2: not UTF-8: byte 0xe9 cannot be decoded"


def test_nul_byte_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"name = 'a'\nmemory = 1\x00\n")
    assert error_of(path).startswith(f"{path}:2: NUL byte")


def test_huge_file_is_refused_without_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "# x\n" * 300_000)
    assert re.fullmatch(rf"{re.escape(str(path))}: refused: larger than \d+ bytes", error_of(path))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope") == f"{tmp_path / 'nope'}: cannot read: no such file"
    assert error_of(tmp_path) == f"{tmp_path}: cannot read: is a directory"


def test_missing_name_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "memory = 256\n")
    assert error_of(path) == f"{path}: 'name' is required"


@pytest.mark.parametrize("value", ["-" * 500_000 + "1", "a." * 300_000 + "b"])
def test_parser_stress_is_a_config_error_not_a_crash(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"name = 'a'\nmemory = {value}\n")
    assert error_of(path).startswith(f"{path}")
