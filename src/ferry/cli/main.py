"""``ferry``: the xm-like command line. It talks to ferryd; it never drives QEMU itself."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ferry.cli.dashboard_cli import add_dashboard_parser
from ferry.cli.migrate_cli import add_migrate_parser
from ferry.cli.parsers import note
from ferry.cli.save_cli import add_save_parsers
from ferry.client.daemon_client import DaemonClient, default_socket
from ferry.errors import FerryError

Command = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> DaemonClient:
    """The local ferryd, or with --host (or $FERRY_HOST) a remote one over mutual TLS."""
    remote = args.remote_host or os.environ.get("FERRY_HOST")
    if not remote or args.connect:
        return DaemonClient(args.connect or default_socket())
    from ferry.client.daemon_client import split_host
    from ferry.pki.credentials import Credentials

    return DaemonClient(remote=split_host(remote), credentials=Credentials(_pki_dir(args)))


def _pki_dir(args: argparse.Namespace) -> Path:
    """--pki, $FERRY_PKI, ~/.config/ferry/pki if it exists, else /etc/ferry/pki."""
    if args.pki:
        return Path(args.pki)
    if os.environ.get("FERRY_PKI"):
        return Path(os.environ["FERRY_PKI"])
    personal = Path.home() / ".config" / "ferry" / "pki"
    return personal if personal.is_dir() else Path("/etc/ferry/pki")


# -- domain commands ---------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    from ferry.config.loader import find_domain_file, load_domain_file

    cfg = load_domain_file(find_domain_file(args.config), args.overrides)
    for ignored in cfg.ignored:
        note(f"note: {ignored}")
    client = _client(args)
    result = client.call("create", config=cfg.to_mapping())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Started domain {result['name']} (id={result['id']}, accel={result['accel']})")
    if args.console:
        return _attach_console(client, result["name"])
    return 0


def format_list(rows: Sequence[dict[str, Any]], long: bool = False) -> str:
    head = f"{'Name':<32} {'ID':>5} {'Mem':>6} {'VCPUs':>5} {'State':>14} {'Time(s)':>9}"
    lines = [head + ("  Addresses" if long else "")]
    for row in rows:
        line = (
            f"{row['name']:<32} {row['id']:>5} {row['mem']:>6} {row['vcpus']:>5} "
            f"{row['state']:>14} {row['time']:>9.1f}"
        )
        if long:
            line += "  " + _addresses(row.get("addresses"))
        lines.append(line)
    return "\n".join(lines)


def _addresses(found: Any) -> str:
    """What the guest agent reported; '-' where the guest runs none."""
    return ", ".join(found) if found else ("-" if found is None else "(none)")


def format_cluster_list(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'Host':<16} {'Name':<32} {'ID':>5} {'Mem':>6} {'VCPUs':>5} {'State':>14}"]
    for row in rows:
        cells = [("-" if row.get(k) is None else row[k]) for k in ("id", "mem", "vcpus")]
        lines.append(
            f"{row['host']:<16} {row['name']:<32} {cells[0]:>5} {cells[1]:>6} {cells[2]:>5} "
            f"{row['state']:>14}"
        )
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    if args.all:
        rows = _client(args).call("list_all")
        if args.names:
            rows = [r for r in rows if r["name"] in args.names]
        print(json.dumps(rows, indent=1) if args.json else format_cluster_list(rows))
        return 0
    rows = _client(args).call("list", long=args.long)
    if args.names:
        missing = sorted(set(args.names) - {r["name"] for r in rows})
        if missing:
            raise FerryError(f"domain '{missing[0]}' does not exist")
        rows = [r for r in rows if r["name"] in args.names]
    print(json.dumps(rows, indent=1) if args.json else format_list(rows, args.long))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = _client(args).call("info", name=args.domain)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def format_info(info: dict[str, Any]) -> str:
    cfg = info.get("config", {})
    lines = [
        f"{'name':<10} {info.get('name')}",
        f"{'state':<10} {info.get('state')} (id {info.get('id')}, pid {info.get('pid')}, "
        f"{info.get('accel')})",
        f"{'memory':<10} {cfg.get('memory')} MiB, {cfg.get('vcpus')} vCPU",
        f"{'boot':<10} "
        + (
            f"kernel {cfg['kernel']}"
            if cfg.get("kernel")
            else f"from its disk ({cfg.get('firmware', 'bios')} firmware)"
        ),
    ]
    for disk in cfg.get("disk", []):
        lines.append(
            f"{'disk':<10} {disk['target']} {disk['path']} ({disk.get('format', '?')}, "
            f"cache={disk.get('cache') or 'none'}, {'rw' if disk.get('mode') == 'w' else 'ro'})"
        )
    for vif in cfg.get("vif", []):
        lines.append(f"{'nic':<10} {vif['mac']} on {vif['bridge']}")
    lines.append(f"{'addresses':<10} {_addresses(info.get('addresses'))} (from the guest agent)")
    return "\n".join(lines)


def cmd_pause(args: argparse.Namespace) -> int:
    _client(args).call("pause", name=args.domain)
    return 0


def cmd_unpause(args: argparse.Namespace) -> int:
    _client(args).call("unpause", name=args.domain)
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    done = _client(args).call("shutdown", name=args.domain, wait=args.wait, timeout=args.timeout)
    how = done.get("method", "the ACPI power button") if isinstance(done, dict) else "?"
    if args.wait:
        print(f"Domain {args.domain} has powered off (asked through {how})")
    else:
        print(f"Domain {args.domain} asked to power off through {how}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    _client(args).call("destroy", name=args.domain)
    return 0


def _attach_console(client: DaemonClient, name: str) -> int:
    from ferry.cli.console import attach

    attach(client.open_console(name), name)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    return _attach_console(_client(args), args.domain)


# -- guest image -------------------------------------------------------------


def cmd_image_build(args: argparse.Namespace) -> int:
    import time

    from ferry.guest.image import build_image

    start = time.monotonic()
    image = build_image(args.cache_dir, force=args.force, log=note)
    took = time.monotonic() - start
    if args.json:
        print(json.dumps({k: str(v) for k, v in vars(image).items()} | {"seconds": took}))
    else:
        print(f"guest image {image.digest[:12]} ready in {took:.1f} s: {image.rootfs.parent}")
    return 0


def cmd_image_disk(args: argparse.Namespace) -> int:
    from ferry.guest.image import load_image, make_domain_disk

    image = load_image(args.cache_dir)
    if args.boot == "kernel":
        make_domain_disk(image, args.path)
    else:
        from ferry.guest.boot_disk import make_bootable_disk

        make_bootable_disk(image, args.path, args.boot, args.append)
    print(f"wrote {args.path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ferry.lab.demo import DemoOptions, run_demo

    if args.round_trips < 1:
        raise FerryError("ferry demo: --round-trips must be at least 1")
    opts = DemoOptions(
        rate=args.rate,
        memory=args.memory,
        storage=args.storage,
        round_trips=args.round_trips,
        report_dir=args.report,
        workdir=args.workdir,
        keep=args.keep,
        boot=args.boot,
        dashboard=args.dashboard_port if args.dashboard else None,
    )
    return run_demo(opts)


# -- argument parsing --------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="ferry: live-migrating VMs")
    parser.add_argument("--connect", type=Path, metavar="SOCKET", help="ferryd control socket")
    parser.add_argument(
        "--host",
        dest="remote_host",  # not "host": `migrate DOMAIN HOST` has its own
        metavar="HOST[:PORT]",
        help="a remote ferryd (mutual TLS, port 8003), as from a management station; "
        "also $FERRY_HOST",
    )
    parser.add_argument(
        "--pki",
        metavar="DIR",
        help="our credentials for --host ($FERRY_PKI, ~/.config/ferry/pki, /etc/ferry/pki)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("create", cmd_create, "create and start a domain from a config file")
    p.add_argument("-c", dest="console", action="store_true", help="attach the console")
    p.add_argument("--json", action="store_true")
    p.add_argument("config", help="config file (xm or .toml) or a domain name")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = add("list", cmd_list, "list domains: Name ID Mem VCPUs State Time(s)")
    p.add_argument("-a", "--all", action="store_true", help="every host's domains (from etcd)")
    p.add_argument(
        "-l", "--long", action="store_true", help="also the guests' addresses (from qemu-ga)"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("names", nargs="*", metavar="DOMAIN")

    p = add("info", cmd_info, "a domain's state, boot, disks (format, cache) and NICs")
    p.add_argument("--json", action="store_true")
    p.add_argument("domain")

    for name, func, text in (
        ("pause", cmd_pause, "pause a domain"),
        ("unpause", cmd_unpause, "unpause a paused domain"),
        ("destroy", cmd_destroy, "terminate a domain at once"),
        ("console", cmd_console, "attach to a domain's console (Ctrl-] detaches)"),
    ):
        add(name, func, text).add_argument("domain")

    add_migrate_parser(sub, _client)

    add_save_parsers(sub, _client)
    add_dashboard_parser(sub, _client, _pki_dir)

    p = add("shutdown", cmd_shutdown, "shut a domain down: guest agent, else ACPI")
    p.add_argument("-w", "--wait", action="store_true", help="wait until it has powered off")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (with -w)")
    p.add_argument("domain")

    p = add("demo", cmd_demo, "the classic live-migration demonstration, measured")
    p.add_argument("--rate", default="100mbit", help="LAN link rate (default 100mbit; none)")
    p.add_argument("--memory", type=int, default=256, help="guest memory in MiB (default 256)")
    p.add_argument(
        "--storage",
        choices=["nfs", "nbd", "dir", "local"],
        default="nfs",
        help="the VM's disk: on shared storage (nfs, nbd, dir), or on xen_host_1's own "
        "(local: each migration copies it, --copy-storage)",
    )
    p.add_argument("--round-trips", type=int, default=1, help="migrations there and back")
    p.add_argument("--report", type=Path, default=Path("ferry-demo-report"), help="report dir")
    p.add_argument("--workdir", type=Path, default=Path("/var/lib/ferry-lab"), help="lab dir")
    p.add_argument("--keep", action="store_true", help="leave the lab up for exploring")
    p.add_argument(
        "--dashboard", action="store_true", help="serve the live web page beside the narration"
    )
    p.add_argument("--dashboard-port", type=int, default=8780, help="its port on 127.0.0.1")
    p.add_argument(
        "--boot",
        choices=["kernel", "disk"],
        default="kernel",
        help="disk: virt_server boots its own kernel from its disk, as pygrub did",
    )

    from ferry.lab.lab_cli import add_lab_parser
    from ferry.stream.watch_cli import add_watch_arguments, run_watch

    p = add("watch", run_watch, "play a stream as a player would and report every stall")
    add_watch_arguments(p)

    add_lab_parser(sub)

    from ferry.cli.ca_cli import add_ca_parser
    from ferry.cli.disk_cli import add_disk_parser
    from ferry.cli.host_cli import add_host_parser

    add_ca_parser(sub)
    add_host_parser(sub, _client)
    add_disk_parser(sub, _client)

    image = sub.add_parser("image", help="the guest image").add_subparsers(
        dest="image_command", required=True, metavar="ACTION"
    )
    p = image.add_parser("build", help="build (or verify the cache of) the guest image")
    p.set_defaults(func=cmd_image_build)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--json", action="store_true")
    p = image.add_parser("disk", help="write a new root disk for a domain from the guest image")
    p.set_defaults(func=cmd_image_disk)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument(
        "--boot",
        choices=["kernel", "bios", "uefi"],
        default="kernel",
        help='kernel: a bare file system for kernel = "ferry" (default); bios/uefi: a '
        "partitioned disk with its own bootloader and the kernel in its /boot",
    )
    p.add_argument(
        "--append", default="", metavar="ARGS", help="kernel arguments the disk's bootloader gives"
    )
    p.add_argument("path", type=Path)

    from ferry.cli.docs_cli import add_docs_parser

    add_docs_parser(sub, parser, _client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except FerryError as err:
        print(f"ferry {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
