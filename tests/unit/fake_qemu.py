"""A fake ``qemu-system-x86_64`` for the protocol's unit tests: a real process, no guest.

It takes the command line ferry builds, daemonizes as QEMU does (the caller
returns once the machine is ready; the middle process is left for the caller's
subreaper), writes its pidfile and serves QMP on the ``-qmp`` socket, file
descriptors passed with ``getfd`` included. Its "RAM" is a buffer that a
"guest" thread keeps writing to while the VM runs (a counter at offset 0), so
a test can tell through QMP whether, and where, the VM ran.

Migration moves real bytes: ``migrate fd:NAME`` writes a header, the RAM and
a trailer with the RAM's sha256 to the passed socket; ``migrate-incoming``
reads and checks them. A plan (JSON file named by ``$FAKE_QEMU_PLAN``, read
when a migration starts, one part per side: ``{"source": {}, "target": {}}``)
injects faults: ``rate`` (bytes/s); ``hold_at`` (bytes after which the
source waits until the file ``<plan>.release`` exists); ``hold_complete``
(the target, having read everything, waits as long before it completes);
``cancel_fails``; ``cancel_hangs`` (as on a cut link: ``cancelling`` for
good, the VM running on); ``exit_on_commit`` (the target ends when told ``cont``);
``silent_resume`` (``cont`` sends no RESUME event); ``break_after_switch``
(post-copy: the source's stream breaks once the target has its device state).

Post-copy as QEMU 7.2 does it, in outline: with ``postcopy-ram`` the source
waits after its first pass for ``migrate-start-postcopy``; with
``pause-before-switchover`` it stops the VM and holds (``pre-switchover``)
until ``migrate-continue``, and a cancel there leaves it ``postmigrate``; past
the switch it cannot be cancelled. The target is ``paused`` once the device
state is in, while the stream goes on (``postcopy-active``), and may be
``cont``-ed then; a break leaves both ends ``postcopy-paused``.

TLS is real, as QEMU's is: ``object-add`` of ``tls-creds-x509`` reads its
directory's files at once (they may be gone afterwards), ``authz-simple``
names the one client subject admitted (GnuTLS's order, as QEMU compares
it), and a migration with ``tls-creds`` set runs the stream through TLS,
checking the target's name (``tls-hostname``) on the source and the
source's certificate against ``tls-authz`` on the target.

Custom commands: ``x-fake-ram`` returns ``{"counter", "sha256"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fake_qemu_stream import RAM_BYTES, load_plan, receive_stream, send_stream
from fake_qemu_tls import load_tls_creds

PAST_SWITCH = ("pre-switchover", "postcopy-active", "postcopy-paused", "cancelling")


class Machine:
    def __init__(self, name: str, paused: bool, incoming: bool) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.ram = bytearray(os.urandom(RAM_BYTES))
        self.status = "inmigrate" if incoming else ("prelaunch" if paused else "running")
        self.incoming = incoming
        self.mig: dict[str, Any] = {"status": "none"}
        self.fds: dict[str, int] = {}
        self.clients: list[socket.socket] = []
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = {}
        self.cancel = threading.Event()
        self.start_postcopy = threading.Event()
        self.proceed = threading.Event()
        self.plan: dict[str, Any] = {}
        self.disks: dict[str, tuple[str, str]] = {}  # drive id -> (file, format)
        self.objects: dict[str, dict[str, Any]] = {}
        # --copy-storage's target: the format nodes by name, the NBD server's
        # settings and its exports (served by name only: no bytes flow here).
        self.nodes: set[str] = set()
        self.nbd: dict[str, Any] | None = None
        self.exports: dict[str, dict[str, Any]] = {}
        self.tls_peer: str | None = None  # the subject of the last TLS peer
        self.workdir = Path(tempfile.gettempdir())

    @property
    def running(self) -> bool:
        return self.status == "running"

    def counter(self) -> int:
        return int(struct.unpack_from("<Q", self.ram, 0)[0])

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        message = {
            "event": event,
            "data": data or {},
            "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)},
        }
        line = json.dumps(message).encode() + b"\r\n"
        for client in list(self.clients):
            try:
                client.sendall(line)
            except OSError:
                self.clients.remove(client)

    def set_status(self, status: str) -> None:
        event = {"running": "RESUME"}.get(status, "STOP")
        was = self.running
        self.status = status
        if self.running != was:
            self.emit(event)

    def set_mig(self, status: str) -> None:
        self.mig["status"] = status
        self.emit("MIGRATION", {"status": status})


def guest(machine: Machine) -> None:
    """The guest: while it runs it counts, and dirties a page now and then."""
    while True:
        time.sleep(0.002)
        with machine.lock:
            if machine.running:
                value = machine.counter() + 1
                struct.pack_into("<Q", machine.ram, 0, value)
                page = (value * 4096) % RAM_BYTES
                machine.ram[page : page + 8] = struct.pack("<Q", value)


def _image_info(path: str, fmt: str) -> dict[str, Any]:
    """What QEMU's query-block says of an image: qemu-img's own reading of it."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", fmt, path],
        capture_output=True, check=True, text=True,
    ).stdout  # fmt: skip
    info = json.loads(out)
    return {"virtual-size": info["virtual-size"], "format": info["format"]}


def execute(machine: Machine, command: str, args: dict[str, Any]) -> Any:
    if command == "qmp_capabilities":
        return {}
    if command == "query-status":
        return {"status": machine.status, "running": machine.running}
    if command == "stop":
        machine.set_status("paused")
        return {}
    if command == "cont":
        if machine.incoming and machine.status == "inmigrate":
            raise ValueError('Failed to get "write" lock')  # the source still holds the disk
        if not machine.incoming and machine.mig.get("status") in PAST_SWITCH:
            raise ValueError("Migration is not finalized yet")
        if machine.plan.get("exit_on_commit"):
            os._exit(3)
        if machine.plan.get("silent_resume"):
            machine.status = "running"  # and no RESUME event
        else:
            machine.set_status("running")
        return {}
    if command in ("quit", "system_powerdown"):
        threading.Timer(0.05, lambda: os._exit(0)).start()
        return {}
    if command == "query-version":
        return {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}
    if command == "query-block":
        return [
            # As QEMU 7.2 names them: the drive's id, and the device's backend path.
            {
                "device": drive,
                "qdev": f"/machine/peripheral/vd{drive.removeprefix('disk')}/virtio-backend",
                "inserted": {"image": _image_info(path, fmt)},
            }
            for drive, (path, fmt) in machine.disks.items()
        ]
    if command == "migrate-set-capabilities":
        machine.caps.update({c["capability"]: c["state"] for c in args["capabilities"]})
        return {}
    if command == "query-migrate-capabilities":
        return [{"capability": k, "state": v} for k, v in machine.caps.items()]
    if command == "migrate-set-parameters":
        for key in ("tls-creds", "tls-authz"):
            if args.get(key) and args[key] not in machine.objects:
                raise ValueError(f"No object '{args[key]}'")
        machine.params.update(args)
        return {}
    if command == "query-migrate-parameters":
        return {"tls-creds": "", "tls-authz": "", "tls-hostname": ""} | machine.params
    if command == "object-add":
        if args["id"] in machine.objects:
            raise ValueError(f"attempt to add duplicate property '{args['id']}'")
        spec = dict(args)
        if spec["qom-type"] == "tls-creds-x509":
            spec = load_tls_creds(machine, spec)
        machine.objects[spec["id"]] = spec
        return {}
    if command == "object-del":
        if machine.objects.pop(args["id"], None) is None:
            raise ValueError(f"object '{args['id']}' not found")
        return {}
    if command == "x-fake-tls":
        return {"peer": machine.tls_peer, "params": machine.params}
    if command == "getfd":
        raise ValueError("no file descriptor supplied via SCM_RIGHTS")
    if command in ("migrate", "migrate-incoming"):
        name = str(args["uri"]).removeprefix("fd:")
        fd = machine.fds.pop(name)
        machine.plan = load_plan("target" if machine.incoming else "source")
        machine.cancel.clear()
        machine.start_postcopy.clear()
        machine.proceed.clear()
        work = send_stream if command == "migrate" else receive_stream
        threading.Thread(target=work, args=(machine, fd), daemon=True).start()
        return {}
    if command == "migrate_cancel":
        if machine.plan.get("cancel_fails"):
            raise ValueError("injected: cancel failed")
        if machine.plan.get("cancel_hangs") or machine.mig.get("status", "").startswith("postcopy"):
            machine.set_mig("cancelling")  # and there it stays, as QEMU 7.2's does
            return {}
        machine.cancel.set()
        return {}
    if command == "migrate-start-postcopy":
        if not machine.caps.get("postcopy-ram"):
            raise ValueError("Enable postcopy with migrate_set_capability before the start")
        machine.start_postcopy.set()
        return {}
    if command == "migrate-continue":
        if machine.mig.get("status") != args.get("state"):
            raise ValueError(f"Migration not in expected state: {machine.mig.get('status')}")
        machine.proceed.set()
        return {}
    if command == "query-migrate":
        info = dict(machine.mig)
        start = info.pop("start", None)
        if info["status"] == "none":
            return {}
        info["total-time"] = int((time.monotonic() - start) * 1000) if start else 0
        info["ram"] = {
            "transferred": info.pop("transferred", 0),
            "remaining": info.pop("remaining", 0),
            "total": RAM_BYTES,
            "mbps": 100.0,
            "dirty-sync-count": info.pop("dirty-sync-count", 1),
        }
        return info
    if command == "announce-self":
        return {}
    if command in (
        "nbd-server-start",
        "block-export-add",
        "nbd-server-stop",
        "query-block-exports",
    ):
        return nbd_command(machine, command, args)
    if command == "x-fake-ram":
        with machine.lock:
            return {"counter": machine.counter(), "sha256": hashlib.sha256(machine.ram).hexdigest()}
    raise KeyError(command)


NBD_COMMANDS = ("nbd-server-start", "block-export-add", "nbd-server-stop", "query-block-exports")


def nbd_command(machine: Machine, command: str, args: dict[str, Any]) -> Any:
    """QEMU 7.2's checks on the NBD server's commands (what ferry's target uses)."""
    if command == "query-block-exports":
        return [{"id": k, "node-name": v["node-name"], "type": "nbd", "shutting-down": False}
                for k, v in machine.exports.items()]  # fmt: skip
    if command == "nbd-server-stop":
        if machine.nbd is None:
            raise ValueError("NBD server not running")
        machine.nbd = None
        machine.exports.clear()
        return {}
    if command == "nbd-server-start":
        if machine.nbd is not None:
            raise ValueError("NBD server already running")
        creds = args.get("tls-creds")
        if creds is not None and machine.objects.get(creds, {}).get("endpoint") != "server":
            raise ValueError("Expecting TLS credentials with a server endpoint")
        if creds is not None and args["addr"]["type"] != "inet":
            raise ValueError("TLS is only supported with IPv4/IPv6")
        machine.nbd = dict(args)
        return {}
    if machine.nbd is None:
        raise ValueError("NBD server not running")
    if args["node-name"] not in machine.nodes:
        raise ValueError(
            f"Cannot find device={args['node-name']} nor node-name={args['node-name']}"
        )
    if args["id"] in machine.exports:
        raise ValueError(f"Block export id '{args['id']}' is already in use")
    machine.exports[args["id"]] = dict(args)
    return {}


def serve_client(machine: Machine, client: socket.socket) -> None:
    greeting = {
        "QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}
    }
    client.sendall(json.dumps(greeting).encode() + b"\r\n")
    machine.clients.append(client)
    decoder = json.JSONDecoder()
    buffer = ""
    pending_fds: list[int] = []
    while True:
        data, ancdata, _flags, _addr = client.recvmsg(65536, socket.CMSG_LEN(16 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                pending_fds += list(struct.unpack(f"{len(payload) // 4}i", payload))
        if not data:
            break
        buffer += data.decode()
        while True:
            stripped = buffer.lstrip()
            if not stripped:
                buffer = ""
                break
            try:
                request, end = decoder.raw_decode(stripped)
            except ValueError:
                break
            buffer = stripped[end:]
            command = request.get("execute", "")
            args = request.get("arguments") or {}
            with machine.lock:
                try:
                    if command == "getfd" and pending_fds:
                        machine.fds[args["fdname"]] = pending_fds.pop(0)
                        reply: dict[str, Any] = {"return": {}}
                    else:
                        reply = {"return": execute(machine, command, args)}
                except KeyError:
                    reply = {"error": {"class": "CommandNotFound", "desc": f"{command} unknown"}}
                except ValueError as err:
                    reply = {"error": {"class": "GenericError", "desc": str(err)}}
            if "id" in request:
                reply["id"] = request["id"]
            client.sendall(json.dumps(reply).encode() + b"\r\n")
    if client in machine.clients:
        machine.clients.remove(client)
    client.close()


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def main(argv: list[str]) -> None:
    name = (option(argv, "-name") or "guest=vm").split(",")[0].removeprefix("guest=")
    qmp = (option(argv, "-qmp") or "").removeprefix("unix:").split(",")[0]
    pidfile = option(argv, "-pidfile")
    machine = Machine(name, paused="-S" in argv, incoming=option(argv, "-incoming") == "defer")
    machine.workdir = Path(qmp).parent
    for i, arg in enumerate(argv[:-1]):
        if arg == "-drive":
            opts = dict(o.split("=", 1) for o in argv[i + 1].split(",") if "=" in o)
            if "id" in opts:
                machine.disks[opts["id"]] = (opts["file"], opts.get("format", "raw"))
            if "node-name" in opts:
                machine.nodes.add(opts["node-name"])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if "-daemonize" in argv:
        ready_r, ready_w = os.pipe()
        if os.fork() > 0:
            os.close(ready_w)
            ok = os.read(ready_r, 1)
            os._exit(0 if ok == b"1" else 1)
        os.close(ready_r)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)  # the middle process: the caller's subreaper adopts it
    with __import__("contextlib").suppress(FileNotFoundError):
        os.unlink(qmp)
    server.bind(qmp)
    server.listen(4)
    if pidfile:
        Path(pidfile).write_text(f"{os.getpid()}\n")
    threading.Thread(target=guest, args=(machine,), daemon=True).start()
    if "-daemonize" in argv:
        os.write(ready_w, b"1")
        os.close(ready_w)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
    while True:
        client, _ = server.accept()
        threading.Thread(target=serve_client, args=(machine, client), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
