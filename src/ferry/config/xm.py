"""Import of xm-style domain files (``/etc/xen/<name>``), never executing them.

xm ran these files as Python with root's rights, so a careless or hostile file
could do anything. ferry parses them with :mod:`ast` and walks the nodes itself:
only module-level ``key = literal`` statements are accepted (string, number,
boolean, None, lists/tuples of those); anything else is refused with the file
and line. Keys become the canonical mapping of :mod:`ferry.domain.config`;
real xm keys that ferry cannot honour are accepted and reported in
``ignored``, so the user sees exactly what the import changed.

Decisions:

- a key assigned twice is an error: Python would let the last one win
  silently, and in a hand-edited file that is nearly always a mistake;
- ``key = None`` means "not set", as it did for xm;
- disk mode ``w!`` becomes ``w`` with a note: ferry never gives a disk two
  writers, so the "force sharing" meaning is refused, not honoured;
- a vif's ``ip=`` is ignored with a note: xm handed it to the host's vif
  scripts (routing, antispoofing), never to the guest; the guest's address is
  the top-level ``ip``;
- ``root`` names Xen devices (``/dev/xvda1``, ``/dev/sda1``); ferry's disks
  are virtio, so the device is renamed to ``/dev/vdX`` and words after it
  (``ro``) move to the front of ``extra``, both with a note.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.config._common import MAX_CONFIG_BYTES, build_domain, line_of, read_config_text
from ferry.config.xm_devices import parse_disk_entry, parse_vif_entry
from ferry.domain.config import DomainConfig
from ferry.errors import ConfigError

# Real xm values are flat lists of strings; deeper nesting only serves abuse.
MAX_DEPTH = 3

DIRECT_KEYS = frozenset(
    {
        "name", "uuid", "memory", "vcpus", "kernel", "ramdisk", "extra", "ip",
        "netmask", "gateway", "hostname", "on_poweroff", "on_reboot", "on_crash", "firmware",
        "on_host_failure",
    }
)  # fmt: skip

_HEADLESS = "ferry runs QEMU headless; use `ferry console`"
_MACHINE = "ferry chooses QEMU's machine and devices itself"
_XEN_ONLY = "Xen-specific, no meaning under QEMU"
_PINNING = "ferry does not pin or weight vCPUs"
_NFS_ROOT = "NFS root is not supported; give a disk"


def _each(words: str, reason: str) -> dict[str, str]:
    return dict.fromkeys(words.split(), reason)


IGNORED_KEYS: dict[str, str] = {
    "maxmem": "no ballooning; the domain gets exactly 'memory'",
    "bootloader_args": "only the bootloader used it",
    "bootargs": "only the bootloader used it",
    **_each(
        "vncunused vncdisplay vnclisten vncconsole vncpasswd vfb display xauthority "
        "opengl nographic stdvga keymap serial monitor",
        _HEADLESS,
    ),
    **dict.fromkeys(("cpus", "cpu", "cpu_cap", "cpu_weight"), _PINNING),
    "vcpu_avail": "all vcpus are online from boot",
    **_each(
        "builder device_model loader boot acpi apic pae hap viridian hpet timer_mode "
        "vpt_align usb usbdevice soundhw isa fda fdb xen_platform_pci cpuid cpuid_check "
        "tsc_mode",
        _MACHINE,
    ),
    "localtime": "the guest clock is UTC",
    "rtc_timeoffset": "the guest clock is UTC",
    **_each(
        "shadow_memory features blkif netif tpmif vtpm ioports irq access_control vscsi "
        "superpages machine_address_size security suppress_spurious_page_faults "
        "s3_integrity",
        _XEN_ONLY,
    ),
    "pci": "PCI passthrough would tie the domain to this host (no live migration)",
    "dhcp": "the guest uses DHCP unless 'ip' is set",
    "interface": "ferry's guest kernel configures eth0",
    "nics": "deprecated in xm; the vif list defines the interfaces",
    "nfs_server": _NFS_ROOT,
    "nfs_root": _NFS_ROOT,
}

ALL_KEYS = DIRECT_KEYS | set(IGNORED_KEYS) | {"vnc", "sdl", "root", "disk", "vif", "bootloader"}

_XEN_ROOT = re.compile(r"^/dev/(?:xvd|sd|hd)([a-z])(\d*)$")


@dataclass(frozen=True)
class _Assignment:
    line: int
    value: Any
    item_lines: tuple[int, ...]  # for list values: the line of each item


def parse_xm(text: str, source: str) -> dict[str, Any]:
    """The canonical mapping of an xm file's text (not yet validated)."""
    return parse_xm_located(text, source)[0]


def parse_xm_located(text: str, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The canonical mapping and, per key and list item, the ``file:line`` it came from."""
    return _Translator(source, _assignments(text, source)).translate()


def load_xm(path: Path) -> DomainConfig:
    source = str(path)
    mapping, where = parse_xm_located(read_config_text(path), source)
    return build_domain(mapping, source, where)


# -- the safe reader ---------------------------------------------------------


def _assignments(text: str, source: str) -> dict[str, _Assignment]:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: refused: larger than {MAX_CONFIG_BYTES} bytes")
    if "\x00" in text:
        raise ConfigError(
            f"{source}:{line_of(text, text.index(chr(0)))}: NUL byte: not a text file"
        )
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as err:
        raise ConfigError(f"{source}:{err.lineno or 1}: syntax error: {err.msg}") from err
    except (RecursionError, MemoryError) as err:
        raise ConfigError(f"{source}: refused: nested too deeply to parse") from err
    found: dict[str, _Assignment] = {}
    for stmt in tree.body:
        at = f"{source}:{stmt.lineno}"
        if not isinstance(stmt, ast.Assign):
            raise ConfigError(f"{at}: {_describe_statement(stmt)} refused: {_ONLY}")
        if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise ConfigError(f"{at}: {_describe_target(stmt)} refused: {_ONLY}")
        key = stmt.targets[0].id
        if key in found:
            first = found[key].line
            raise ConfigError(f"{at}: '{key}' assigned twice: lines {first} and {stmt.lineno}")
        value = _literal(stmt.value, source, key, 0)
        items = stmt.value.elts if isinstance(stmt.value, ast.List | ast.Tuple) else []
        found[key] = _Assignment(stmt.lineno, value, tuple(e.lineno for e in items))
    return found


_ONLY = "an xm file may hold only 'key = literal' assignments"


def _literal(node: ast.expr, source: str, key: str, depth: int) -> Any:
    if isinstance(node, ast.Constant) and _plain(node.value):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = node.operand
        if isinstance(operand, ast.Constant):
            number = operand.value
            if isinstance(number, int | float) and not isinstance(number, bool):
                return -number if isinstance(node.op, ast.USub) else number
    if isinstance(node, ast.List | ast.Tuple):
        if depth >= MAX_DEPTH:
            raise ConfigError(f"{source}:{node.lineno}: '{key}': lists nested too deeply")
        return [_literal(item, source, key, depth + 1) for item in node.elts]
    raise ConfigError(
        f"{source}:{node.lineno}: '{key}': {_describe_value(node)} refused: "
        "values must be strings, numbers, True/False/None or lists of them"
    )


def _plain(value: object) -> bool:
    return value is None or type(value) in (str, int, float, bool)


_STATEMENTS: dict[type[ast.stmt], str] = {
    ast.Import: "import",
    ast.ImportFrom: "import",
    ast.AugAssign: "augmented assignment",
    ast.AnnAssign: "annotated assignment",
    ast.Delete: "'del' statement",
    ast.FunctionDef: "function definition",
    ast.AsyncFunctionDef: "function definition",
    ast.ClassDef: "class definition",
}

_VALUES: dict[type[ast.expr], str] = {
    ast.Call: "function call",
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.BinOp: "expression",
    ast.BoolOp: "expression",
    ast.Compare: "expression",
    ast.IfExp: "expression",
    ast.UnaryOp: "expression",
    ast.JoinedStr: "f-string",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.Starred: "starred expression",
    ast.NamedExpr: "assignment expression",
}


def _describe_statement(stmt: ast.stmt) -> str:
    if isinstance(stmt, ast.Expr):
        value = stmt.value
        return (
            _VALUES.get(type(value), "bare expression")
            if not isinstance(value, ast.Name)
            else "bare name"
        )
    known = _STATEMENTS.get(type(stmt))
    return known or f"'{type(stmt).__name__.lower()}' statement"


def _describe_target(stmt: ast.Assign) -> str:
    if len(stmt.targets) != 1:
        return "chained assignment"
    target = stmt.targets[0]
    if isinstance(target, ast.Tuple | ast.List):
        return "multiple-target assignment"
    return f"assignment to {_describe_value(target)}"


def _describe_value(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return f"name '{node.id}' (quote it if it is a string)"
    if isinstance(node, ast.Constant):
        return f"{type(node.value).__name__} literal"
    return _VALUES.get(type(node), type(node).__name__.lower())


# -- translation to the canonical mapping -------------------------------------


class _Translator:
    def __init__(self, source: str, assignments: dict[str, _Assignment]) -> None:
        self.source = source
        self.assignments = assignments
        self.mapping: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        self.ignored: list[str] = []
        self.root_flags: list[str] = []

    def translate(self) -> tuple[dict[str, Any], dict[str, str]]:
        for key, assignment in self.assignments.items():
            at = f"{self.source}:{assignment.line}"
            self.where[key] = at
            if key not in ALL_KEYS:
                raise ConfigError(f"{at}: unknown key '{key}'{_did_you_mean(key)}")
            value = assignment.value
            if value is None:
                continue
            if key in DIRECT_KEYS:
                self.mapping[key] = value
            elif key in ("vnc", "sdl"):
                self.mapping[key] = value
                if value:
                    self.ignored.append(f"{_shown(key, value)} ignored: {_HEADLESS}")
            elif key == "root":
                self.root(value)
            elif key in ("disk", "vif"):
                self.devices(key, assignment, at)
            elif key in IGNORED_KEYS:
                self.ignored.append(f"{_shown(key, value)} ignored: {IGNORED_KEYS[key]}")
        self.bootloader()
        if self.root_flags and isinstance(self.mapping.get("extra", ""), str):
            words = [*self.root_flags, self.mapping.get("extra", "")]
            self.mapping["extra"] = " ".join(w for w in words if w)
        self.mapping["ignored"] = self.ignored
        return self.mapping, self.where

    def bootloader(self) -> None:
        """pygrub read the kernel from the guest's own /boot; the disk's bootloader
        does that here. hvmloader was Xen's firmware for HVM guests: the BIOS."""
        kernel = self.mapping.get("kernel")
        if isinstance(kernel, str) and kernel.rsplit("/", 1)[-1] == "hvmloader":
            del self.mapping["kernel"]
            self.ignored.append(
                f"kernel={kernel!r} mapped: Xen's HVM firmware; the BIOS boots the disk"
            )
            kernel = None
        assignment = self.assignments.get("bootloader")
        if assignment is None or assignment.value is None:
            return
        shown = _shown("bootloader", assignment.value)
        if kernel is None:
            self.ignored.append(
                f"{shown} mapped: the disk's own bootloader boots the guest's kernel "
                f"(firmware {self.mapping.get('firmware', 'bios')})"
            )
        else:
            self.ignored.append(f"{shown} ignored: kernel {kernel!r} is booted directly")

    def root(self, value: Any) -> None:
        if not isinstance(value, str) or not value.split():
            self.mapping["root"] = value
            return
        device, *flags = value.split()
        match = _XEN_ROOT.match(device)
        if match:
            device = f"/dev/vd{match[1]}{match[2]}"
        self.mapping["root"] = device
        self.root_flags = flags
        if device != value:
            self.ignored.append(
                f"root={value!r} taken as {device!r}"
                + (f" with {' '.join(flags)!r} added to extra" if flags else "")
                + ": ferry's disks are virtio (/dev/vdX)"
            )

    def devices(self, key: str, assignment: _Assignment, at: str) -> None:
        value = assignment.value
        if isinstance(value, str):
            value = [value]  # xm accepted a single device given without a list
        if not isinstance(value, list):
            raise ConfigError(f"{at}: '{key}': expected a list of strings, got {value!r}")
        items: list[dict[str, str]] = []
        for index, entry in enumerate(value):
            line = assignment.item_lines[index] if index < len(assignment.item_lines) else None
            item_at = f"{self.source}:{line}" if line else at
            if key == "disk":
                disk, notes = parse_disk_entry(entry, item_at)
                if disk is not None:
                    self.where[f"disk[{len(items)}]"] = item_at
                    items.append(disk)
            else:
                self.where[f"vif[{index}]"] = item_at
                vif, notes = parse_vif_entry(entry, index, item_at)
                items.append(vif)
            self.ignored.extend(notes)
        self.mapping[key] = items


def _shown(key: str, value: Any) -> str:
    text = repr(value)
    return f"{key}={text if len(text) <= 60 else text[:57] + '...'}"


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(ALL_KEYS), n=1, cutoff=0.75)
    return f": not an xm key (did you mean '{close[0]}'?)" if close else ": not an xm key"
