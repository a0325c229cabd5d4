"""Native TOML domain files, the loader's overrides and the file search."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.config.loader import find_domain_file, load_domain_file
from ferry.config.toml_domain import load_toml_domain, parse_toml_domain
from ferry.errors import ConfigError

GOOD = """\
name = "virt_server"
memory = 512
vcpus = 2
ip = "192.168.1.50"
gateway = "192.168.1.1"

[[disk]]
path = "/xen/virt_server.img"
target = "xvda"
mode = "w"

[[disk]]
path = "nbd://store:10809/data"
target = "xvdb"
mode = "r"

[[vif]]
mac = "00:16:3e:4a:21:07"
bridge = "xenbr0"
"""


def write(tmp_path: Path, text: str, name: str = "vm.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_domain_file(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_native_file_loads() -> None:
    mapping = parse_toml_domain(GOOD, "vm.toml")
    assert mapping["disk"][1] == {"path": "nbd://store:10809/data", "target": "xvdb", "mode": "r"}


def test_native_file_builds_the_config(tmp_path: Path) -> None:
    config = load_toml_domain(write(tmp_path, GOOD))
    assert (config.name, config.memory, config.vcpus) == ("virt_server", 512, 2)
    assert config.disks[0].path == "/xen/virt_server.img" and config.disks[0].writable
    assert config.disks[1].is_url and not config.disks[1].writable
    assert config.vifs[0].mac == "00:16:3e:4a:21:07"
    assert (
        config.kernel_ip_param()
        == "ip=192.168.1.50::192.168.1.1:255.255.255.0:virt_server:eth0:off"
    )


def test_decode_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "a"\nmemory = = 3\n')
    message = error_of(path)
    assert message.startswith(f"{path}:2:10: invalid TOML: ")


def test_validator_error_gets_the_key_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "a"\n\nvcpus = "two"\n')
    assert error_of(path) == f"{path}:3: 'vcpus': expected an integer, got str 'two'"


def test_disk_error_gets_the_line_of_its_key(tmp_path: Path) -> None:
    text = 'name = "a"\n[[disk]]\npath = "/x.img"\n[[disk]]\npath = "/y.img"\nmode = "x"\n'
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}:6: 'disk[1].mode': 'x' is not 'w' or 'r'"


def test_single_disk_table_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "a"\n[disk]\npath = "/x.img"\n')
    assert error_of(path) == (
        f"{path}:2: 'disk': write [[disk]] (an array of tables), one per disk"
    )


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "a"\nmemroy = 3\n')
    assert error_of(path) == f"{path}:2: 'memroy': unknown key"


# -- overrides ---------------------------------------------------------------------


def test_overrides_are_typed_and_applied_before_validation(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_domain_file(path, ["vcpus=4", "memory=1024", "sdl=true", "name=007"])
    assert (config.vcpus, config.memory, config.sdl, config.name) == (4, 1024, True, "007")


def test_device_overrides_use_xm_syntax_and_replace_the_list(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_domain_file(
        path,
        ["disk=tap:aio:/xen/other.img,xvda,w!", "disk=phy:sdc,xvdb,r", "vif="],
    )
    assert [d.path for d in config.disks] == ["/xen/other.img", "/dev/sdc"]
    assert config.vifs == ()
    assert any("mode 'w!' taken as 'w'" in note for note in config.ignored)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("vcpus", "command line 'vcpus': malformed override: expected key=value"),
        ("=3", "command line '=3': malformed override: expected key=value"),
        ("vcpsu=2", "command line 'vcpsu=2': unknown key 'vcpsu' (did you mean 'vcpus'?)"),
        ("ignored=x", "command line 'ignored=x': unknown key 'ignored'"),
        ("vcpus=abc", "command line 'vcpus=abc': 'vcpus': expected an integer, got str 'abc'"),
        ("vcpus=99", "command line 'vcpus=99': 'vcpus': 99 is out of range 1..64"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, message: str) -> None:
    assert error_of(write(tmp_path, GOOD), override) == message


def test_bad_device_override_names_the_override(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, GOOD), "vif=mac=00:16:3e:00:00:01,bridge=bad bridge!")
    assert message.startswith("command line 'vif=mac=00:16:3e:00:00:01,bridge=bad bridge!': ")
    assert "'vif[0].bridge'" in message


def test_extension_picks_the_parser(tmp_path: Path) -> None:
    # TOML text without the .toml name is read as xm: '[[disk]]' is a Python expression.
    path = write(tmp_path, GOOD, name="virt_server")
    assert error_of(path).startswith(f"{path}:7: bare expression refused")


# -- finding files -------------------------------------------------------------------


def test_find_prefers_the_given_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert find_domain_file(str(path)) == path


def test_find_looks_in_the_usual_places_in_order(tmp_path: Path) -> None:
    patterns = (str(tmp_path / "ferry" / "{name}.toml"), str(tmp_path / "xen" / "{name}"))
    (tmp_path / "xen").mkdir()
    xen = write(tmp_path / "xen", "name = 'vm'\n", name="vm")
    assert find_domain_file("vm", patterns) == xen
    (tmp_path / "ferry").mkdir()
    native = write(tmp_path / "ferry", GOOD, name="vm.toml")
    assert find_domain_file("vm", patterns) == native


def test_find_reports_where_it_looked(tmp_path: Path) -> None:
    patterns = (str(tmp_path / "{name}.toml"),)
    with pytest.raises(ConfigError) as info:
        find_domain_file("ghost", patterns)
    assert str(info.value) == (
        f"ghost: domain config not found: looked at ghost, {tmp_path / 'ghost.toml'}"
    )


def test_find_does_not_search_with_path_like_names(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path, "name = 'x'\n", name="secret")
    patterns = (str(tmp_path / "etc" / "{name}"),)
    with pytest.raises(ConfigError) as info:
        find_domain_file("../secret", patterns)
    assert str(info.value) == "../secret: domain config not found: looked at ../secret"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "."),
        ("name", ".."),
        ("name", ".hidden"),
        ("name", "-x"),
        ("name", "vm\n"),
        ("name", "vm\x00"),
        ("hostname", "web\n"),
    ],
)
def test_identifiers_are_matched_whole(key: str, value: str) -> None:
    """A trailing newline or NUL, or a name that is a path component, is refused."""
    from ferry.domain.config import DomainConfig
    from ferry.errors import ConfigError

    mapping = {"name": "vm", key: value}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        DomainConfig.from_mapping(mapping, "test")


@pytest.mark.parametrize(
    ("field", "value"),
    [("mac", "00:16:3e:00:00:01\n"), ("bridge", "xenbr0\n")],
)
def test_vif_fields_are_matched_whole(field: str, value: str) -> None:
    from ferry.domain.config import DomainConfig
    from ferry.errors import ConfigError

    vif = {"mac": "00:16:3e:00:00:01", "bridge": "xenbr0", field: value}
    with pytest.raises(ConfigError):
        DomainConfig.from_mapping({"name": "vm", "vif": [vif]}, "test")


def test_disk_target_is_matched_whole() -> None:
    from ferry.domain.config import DomainConfig
    from ferry.errors import ConfigError

    disk = {"path": "/xen/vm.img", "target": "xvda\n", "mode": "w"}
    with pytest.raises(ConfigError):
        DomainConfig.from_mapping({"name": "vm", "disk": [disk]}, "test")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('name = "x"\nmemory = ' + "9" * 5000 + "\n", "invalid TOML: Exceeds the limit"),
        ('name = "x"\nvcpus = ' + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
    ids=["5000-digit-number", "5000-deep-array"],
)
def test_hostile_toml_gets_one_line(tmp_path: Path, text: str, why: str) -> None:
    from ferry.config.host import load_host_config
    from ferry.config.loader import load_domain_file
    from ferry.errors import ConfigError

    domain = tmp_path / "vm.toml"
    domain.write_text(text)
    with pytest.raises(ConfigError, match=why) as err:
        load_domain_file(domain)
    assert "\n" not in str(err.value)
    host = tmp_path / "ferryd.toml"
    host.write_text(text.replace('name = "x"', 'name = "h"').replace("memory", "dom0_min_mem"))
    with pytest.raises(ConfigError, match=why):
        load_host_config(host)
