"""``ferry lab up|down|status|exec``: the command-line face of :mod:`ferry.lab.lab`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ferry.lab import topology


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> int:
    from ferry.lab import lab as lab_mod

    start = time.monotonic()
    lab = lab_mod.up(
        storage_kind=args.storage, rate=args.rate, workdir=args.workdir, memory=args.memory,
        log=_note, boot=args.boot,
    )  # fmt: skip
    print(f"lab up in {time.monotonic() - start:.1f} s (state {lab.state_file})")
    print(f"  storage {lab.storage}: virt_server's disk {lab.disk}")
    print(f"  try: ferry lab exec xen_host_1 ferry create {lab.domain_config}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from ferry.lab import lab as lab_mod

    removed = lab_mod.down(args.workdir, log=lambda _line: None)
    for line in removed:
        print(line)
    print("lab down" if removed else "no lab to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ferry.lab import lab as lab_mod

    status = lab_mod.load(args.workdir).status()
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(format_status(status))
    return 0 if status["healthy"] else 1


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"lab in {status['workdir']} ({'ready' if status['ready'] else 'NOT READY'}), "
        f"links at {status['rate'] or 'full speed'}",
        f"storage {status['storage']}: {status['disk']}",
        f"{'Node':<12} {'Namespace':<22} {'Address':<12} {'Up':<4} ferryd",
    ]
    for name, node in status["nodes"].items():
        ferryd = {True: "running", False: "NOT RUNNING"}.get(node.get("ferryd"), "-")
        up = "yes" if node["present"] else "NO"
        lines.append(f"{name:<12} {node['ns']:<22} {node['address']:<12} {up:<4} {ferryd}")
    for server in status["servers"]:
        state = "running" if server["running"] else "NOT RUNNING"
        lines.append(f"server {server['name']} (pid {server['pid']}): {state}")
    return "\n".join(lines)


def cmd_exec(args: argparse.Namespace) -> int:
    from ferry.lab import lab as lab_mod

    argv = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return lab_mod.load(args.workdir).exec(args.node, argv)


def add_lab_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``lab`` and its actions on the ``ferry`` command's subparsers."""
    lab = sub.add_parser(
        "lab",
        help="the classic two-host set-up on this machine (network namespaces)",
        description="hosts xen_host_1/2, clients client_1/2 and shared storage as network "
        "namespaces on one LAN, with a ferryd per host",
    )
    actions = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def add(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        p.add_argument(
            "--workdir", type=Path, default=topology.DEFAULT_WORKDIR,
            help=f"the lab's files and state (default {topology.DEFAULT_WORKDIR})",
        )  # fmt: skip
        return p

    p = add("up", cmd_up, "build the lab (after removing any previous one)")
    p.add_argument("--storage", choices=topology.STORAGE_KINDS, default="nfs",
                   help="shared storage of the VM disk (default nfs)")  # fmt: skip
    p.add_argument("--rate", default=topology.DEFAULT_RATE,
                   help="tc rate of every link, or none (default 100mbit)")  # fmt: skip
    p.add_argument("--memory", type=int, default=topology.DEFAULT_MEMORY,
                   help="MiB of the lab VM in its config (default %(default)s)")  # fmt: skip
    p.add_argument("--boot", choices=topology.BOOTS, default="kernel",
                   help="kernel: ferry boots its own kernel (default); disk: the VM's disk "
                   "boots its own kernel through its bootloader, as pygrub did")  # fmt: skip

    add("down", cmd_down, "remove every namespace, process and file of the lab")

    p = add("status", cmd_status, "show the lab's nodes, daemons and servers")
    p.add_argument("--json", action="store_true")

    p = add("exec", cmd_exec, "run a command inside a lab node (FERRY_SOCKET set on hosts)")
    p.add_argument("node", choices=[n.name for n in topology.NODES], metavar="NODE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
