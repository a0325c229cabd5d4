"""The domain model: what a virtual machine is, independent of file formats.

Every source of a domain config (native TOML, an imported xm file, the JSON
that crosses the control API, the copy in the state directory) ends as a plain
mapping with the canonical keys below and goes through
:meth:`DomainConfig.from_mapping`, the single place where values are checked.

Canonical keys::

    name        str, [A-Za-z0-9_.-], 1..64 chars, not starting with '-'
    uuid        str (RFC 4122) or absent
    memory      int MiB, 16..1048576
    vcpus       int, 1..64
    kernel      str absolute path, "ferry" (ferry's own guest kernel and initramfs),
                or absent: the firmware boots the disk's own bootloader
    ramdisk     str path or absent (with a kernel path only)
    firmware    "bios" (SeaBIOS, default) | "uefi" (OVMF, variables kept per domain);
                what boots the disk when there is no kernel
    root        str, kernel root device (default /dev/vda)
    extra       str, appended to the kernel command line
    hostname    str, the guest's host name (default: name)
    ip          str IPv4 address or absent (no static address)
    netmask     str dotted netmask or prefix length (default 255.255.255.0)
    gateway     str IPv4 address or absent
    on_poweroff, on_reboot, on_crash   "destroy" | "restart" | "preserve"
    on_host_failure   "ignore" (default) | "restart": restarted on another healthy
                host from its shared disk once its host has lost its lease (HA)
    vnc, sdl    bool (accepted; ferry runs QEMU headless)
    disk        list of {path, target, mode, format, cache} (see ferry.domain.disks)
    cloud_init  table or absent: a NoCloud seed drive (see ferry.domain.cloud_init)
    vif         list of {mac, bridge}
    ignored     list of str: what an import could not honour, said to the user
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ferry.domain.cloud_init import CloudInit, SeedNetwork, parse_cloud_init, seed_files
from ferry.domain.disks import DiskSpec, parse_disks
from ferry.errors import ConfigError

# Matched whole (fullmatch): "$" alone would let a trailing newline through.
# A name becomes a directory name: it may not start with a dot ("." and "..").
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
BRIDGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
LIFECYCLE_ACTIONS = ("destroy", "restart", "preserve")
FIRMWARES = ("bios", "uefi")
# The kernel value that names ferry's own guest kernel and initramfs.
FERRY_KERNEL = "ferry"

KNOWN_KEYS = frozenset(
    {
        "name",
        "uuid",
        "memory",
        "vcpus",
        "kernel",
        "ramdisk",
        "firmware",
        "root",
        "extra",
        "hostname",
        "ip",
        "netmask",
        "gateway",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "on_host_failure",
        "vnc",
        "sdl",
        "disk",
        "vif",
        "ignored",
        "cloud_init",
    }
)


@dataclass(frozen=True)
class VifSpec:
    """One network interface, a tap device on the named bridge."""

    mac: str
    bridge: str

    def to_mapping(self) -> dict[str, Any]:
        return {"mac": self.mac, "bridge": self.bridge}


@dataclass(frozen=True)
class DomainConfig:
    name: str
    memory: int = 512
    vcpus: int = 1
    uuid: str | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    firmware: str = "bios"
    root: str = "/dev/vda"
    extra: str = ""
    hostname: str | None = None
    ip: str | None = None
    netmask: str = "255.255.255.0"
    gateway: str | None = None
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "restart"
    on_host_failure: str = "ignore"
    vnc: bool = False
    sdl: bool = False
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    cloud_init: CloudInit | None = None
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<config>") -> DomainConfig:
        """Check every value and build the config; one-line ConfigError otherwise."""
        return _Validator(source).build(data)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "memory": self.memory,
            "vcpus": self.vcpus,
            "root": self.root,
            "firmware": self.firmware,
            "extra": self.extra,
            "netmask": self.netmask,
            "on_poweroff": self.on_poweroff,
            "on_reboot": self.on_reboot,
            "on_crash": self.on_crash,
            "on_host_failure": self.on_host_failure,
            "vnc": self.vnc,
            "sdl": self.sdl,
            "disk": [d.to_mapping() for d in self.disks],
            "vif": [v.to_mapping() for v in self.vifs],
            "ignored": list(self.ignored),
        }
        for key in ("uuid", "kernel", "ramdisk", "hostname", "ip", "gateway"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.cloud_init is not None:
            out["cloud_init"] = self.cloud_init.to_mapping()
        return out

    def seed_files(self) -> dict[str, bytes] | None:
        """The NoCloud seed's files, when the domain has a [cloud_init] table."""
        if self.cloud_init is None:
            return None
        net = SeedNetwork(
            mac=self.vifs[0].mac if self.vifs else None,
            ip=self.ip,
            netmask=self.netmask,
            gateway=self.gateway,
        )
        return seed_files(self.cloud_init, self.name, self.guest_hostname, self.uuid, net)

    def with_disks(self, disks: tuple[DiskSpec, ...]) -> DomainConfig:
        return replace(self, disks=disks)

    @property
    def boots_from_disk(self) -> bool:
        """No kernel given: the firmware boots the disk's own bootloader."""
        return self.kernel is None

    @property
    def boots_ferry_kernel(self) -> bool:
        return self.kernel == FERRY_KERNEL

    @property
    def guest_hostname(self) -> str:
        return self.hostname or self.name

    def kernel_ip_param(self) -> str | None:
        """The kernel's ``ip=`` parameter (as xm built it) for a static address."""
        if self.ip is None:
            return None
        return f"ip={self.ip}::{self.gateway or ''}:{self.netmask}:{self.guest_hostname}:eth0:off"


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: '{key}': {why}")

    def build(self, data: Mapping[str, Any]) -> DomainConfig:
        unknown = sorted(set(data) - KNOWN_KEYS)
        if unknown:
            raise self.fail(unknown[0], "unknown key")
        if "name" not in data:
            raise ConfigError(f"{self.source}: 'name' is required")
        name = self.string(data, "name")
        if not NAME_RE.fullmatch(name):
            raise self.fail(
                "name",
                f"{name!r} is not a valid domain name "
                "(1-64 letters, digits and '_.-', not starting with '.' or '-')",
            )
        disks = parse_disks(data.get("disk", []), self.fail)
        return DomainConfig(
            name=name,
            memory=self.integer(data, "memory", 512, 16, 1 << 20),
            vcpus=self.integer(data, "vcpus", 1, 1, 64),
            uuid=self.uuid(data),
            kernel=self.kernel(data),
            ramdisk=self.optional_string(data, "ramdisk"),
            firmware=self.choice(data, "firmware", FIRMWARES),
            root=self.optional_string(data, "root")
            or (disks[0].guest_device if disks else "/dev/vda"),
            extra=self.optional_string(data, "extra") or "",
            hostname=self.hostname(data),
            ip=self.address(data, "ip"),
            netmask=self.netmask(data),
            gateway=self.address(data, "gateway"),
            on_poweroff=self.action(data, "on_poweroff", "destroy"),
            on_reboot=self.action(data, "on_reboot", "restart"),
            on_crash=self.action(data, "on_crash", "restart"),
            on_host_failure=self.choice(data, "on_host_failure", ("ignore", "restart")),
            vnc=self.boolean(data, "vnc"),
            sdl=self.boolean(data, "sdl"),
            disks=disks,
            vifs=self.vifs(data.get("vif", [])),
            cloud_init=parse_cloud_init(data.get("cloud_init"), self.fail, HOSTNAME_RE),
            ignored=self.notes(data),
        )

    def notes(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        notes = [str(x) for x in self.sequence(data, "ignored")]
        if data.get("kernel") is None:
            # With a [cloud_init] table the address reaches the guest in its seed.
            seeded = ("ip",) if data.get("cloud_init") is not None else ()
            unused = [k for k in ("ip", "extra") if data.get(k) and k not in seeded]
            note = (
                f"{' and '.join(unused)} not given to the guest: it boots its own kernel "
                "from its disk, with the command line its bootloader holds"
            )
            if unused and note not in notes:
                notes.append(note)
        return tuple(notes)

    # -- scalar checks -------------------------------------------------------

    def string(self, data: Mapping[str, Any], key: str) -> str:
        value = data[key]
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__} {value!r}")
        if "\n" in value or "\x00" in value:
            raise self.fail(key, "must be a single line")
        return value

    def optional_string(self, data: Mapping[str, Any], key: str) -> str | None:
        if data.get(key) is None:
            return None
        return self.string(data, key)

    def integer(self, data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {type(value).__name__} {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is out of range {low}..{high}")
        return value

    def boolean(self, data: Mapping[str, Any], key: str) -> bool:
        value = data.get(key, False)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise self.fail(key, f"expected true/false or 0/1, got {value!r}")

    def sequence(self, data: Mapping[str, Any], key: str) -> list[Any]:
        value = data.get(key, [])
        if not isinstance(value, list | tuple):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        return list(value)

    def kernel(self, data: Mapping[str, Any]) -> str | None:
        text = self.optional_string(data, "kernel")
        if text is not None and text != FERRY_KERNEL and not text.startswith("/"):
            raise self.fail(
                "kernel", f"{text!r} must be an absolute path, or {FERRY_KERNEL!r} for ferry's own"
            )
        if data.get("ramdisk") is not None and text in (None, FERRY_KERNEL):
            raise self.fail("ramdisk", "a ramdisk goes with a kernel path")
        return text

    def uuid(self, data: Mapping[str, Any]) -> str | None:
        text = self.optional_string(data, "uuid")
        if text is None:
            return None
        try:
            return str(uuidlib.UUID(text))
        except ValueError:
            raise self.fail("uuid", f"{text!r} is not a UUID") from None

    def hostname(self, data: Mapping[str, Any]) -> str | None:
        text = self.optional_string(data, "hostname")
        if text is not None and not HOSTNAME_RE.fullmatch(text):
            raise self.fail("hostname", f"{text!r} is not a valid host name")
        return text

    def address(self, data: Mapping[str, Any], key: str) -> str | None:
        text = self.optional_string(data, key)
        if text is None or text == "":
            return None
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise self.fail(key, f"{text!r} is not an IPv4 address") from None

    def netmask(self, data: Mapping[str, Any]) -> str:
        value = data.get("netmask", "255.255.255.0")
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        else:
            text = self.string({"netmask": value}, "netmask")
        try:
            return str(ipaddress.IPv4Network(f"0.0.0.0/{text}").netmask)
        except ValueError:
            raise self.fail("netmask", f"{text!r} is not a netmask or prefix length") from None

    def choice(self, data: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
        value = data.get(key, allowed[0])
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not one of {', '.join(allowed)}")
        return str(value)

    def action(self, data: Mapping[str, Any], key: str, default: str) -> str:
        value = data.get(key, default)
        if value == "coredump-destroy":
            value = "destroy"
        elif value in ("rename-restart", "coredump-restart"):
            value = "restart"
        if value not in LIFECYCLE_ACTIONS:
            raise self.fail(key, f"{value!r} is not one of {', '.join(LIFECYCLE_ACTIONS)}")
        return str(value)

    # -- devices -------------------------------------------------------------

    def vifs(self, value: Any) -> tuple[VifSpec, ...]:
        if not isinstance(value, list | tuple):
            raise self.fail("vif", f"expected a list, got {type(value).__name__}")
        vifs: list[VifSpec] = []
        for index, item in enumerate(value):
            where = f"vif[{index}]"
            if not isinstance(item, Mapping):
                raise self.fail(where, "expected a table with mac, bridge")
            extra = sorted(set(item) - {"mac", "bridge"})
            if extra:
                raise self.fail(f"{where}.{extra[0]}", "unknown key")
            mac = item.get("mac")
            if mac is None:
                mac = random_mac()
            if not isinstance(mac, str) or not MAC_RE.fullmatch(mac.lower()):
                raise self.fail(
                    f"{where}.mac", f"{mac!r} is not a MAC address like 00:16:3e:12:34:56"
                )
            if int(mac[:2], 16) & 1:
                raise self.fail(f"{where}.mac", f"{mac} is a multicast address")
            bridge = item.get("bridge", "xenbr0")
            if not isinstance(bridge, str) or not BRIDGE_RE.fullmatch(bridge):
                raise self.fail(f"{where}.bridge", f"{bridge!r} is not a bridge name")
            vifs.append(VifSpec(mac=mac.lower(), bridge=bridge))
        if len({v.mac for v in vifs}) != len(vifs):
            raise self.fail("vif", "two interfaces share one MAC address")
        return tuple(vifs)


def random_mac() -> str:
    """A MAC in Xen's OUI 00:16:3e, as xend allocated them."""
    import secrets

    tail = secrets.token_bytes(3)
    return "00:16:3e:" + ":".join(f"{b & 0x7F if i == 0 else b:02x}" for i, b in enumerate(tail))
