"""The lab's shared storage, three kinds, all served from the ``storage`` namespace.

- ``nfs``: nfs-ganesha exporting the export directory as ``/xen`` (NFSv3 and
  v4), with an rpcbind of its own, because QEMU's ``nfs://`` driver (libnfs)
  mounts over NFSv3 and asks the portmapper for the MOUNT and NFS ports.
  Both run in a mount namespace of their own with a private tmpfs on ``/run``:
  rpcbind's socket, lock and state files (``/run/rpcbind.sock``, ...) are
  fixed paths, and ganesha registers through that socket and looks for the
  system D-Bus under ``/run``; the private ``/run`` keeps both away from any
  rpcbind or D-Bus of the machine.
- ``nbd``: qemu-storage-daemon exporting each image by name.
- ``dir``: no server; both hosts open the same path (a file system shared by
  the OS, as an NFS mount would be on real hosts).
- ``local``: no server, nothing shared: each host sees a directory of its own
  at the same path (:mod:`ferry.lab.private_dir`); the disk starts on
  xen_host_1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ferry.errors import FerryError, StorageError, WaitTimeout
from ferry.hypervisor import process
from ferry.lab import netns
from ferry.lab.topology import STORAGE, STORAGE_KINDS
from ferry.util.wait import wait_until_sync

NFS_EXPORT = "/xen"
NFS_PORT = 2049
MOUNT_PORT = 20048
NBD_PORT = 10809
START_TIMEOUT = 30.0


@dataclass
class LabProcess:
    """A daemon the lab started, recorded so that a later ``lab down`` can end it safely."""

    name: str
    pid: int
    marker: str  # a string its command line must contain
    starttime: int  # from /proc/<pid>/stat: a recycled pid has another one
    log: str = ""

    @classmethod
    def started(
        cls, name: str, proc: subprocess.Popen[bytes], marker: str, log: Path
    ) -> LabProcess:
        return cls(name, proc.pid, marker, _starttime(proc.pid) or 0, str(log))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabProcess:
        return cls(
            name=str(data["name"]), pid=int(data["pid"]), marker=str(data["marker"]),
            starttime=int(data["starttime"]), log=str(data.get("log", "")),
        )  # fmt: skip

    def is_running(self) -> bool:
        """Alive and still the very process the lab started (not a recycled pid)."""
        if not process.is_alive(self.pid) or _starttime(self.pid) != self.starttime:
            return False
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.marker.encode() in cmdline

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``; False if it was not running."""
        if not self.is_running():
            process.reap(self.pid)
            return False
        os.kill(self.pid, signal.SIGTERM)
        if not wait_gone(self.pid, timeout):
            os.kill(self.pid, signal.SIGKILL)
            wait_gone(self.pid, 5.0)
        return True


def _starttime(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])  # field 22 of stat, 20 after pid and name


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has ended (reaping it if it is our child); False on timeout."""

    def ended() -> bool:
        process.reap(pid)  # a child of ours stays a zombie until reaped
        return not process.is_alive(pid)

    try:
        wait_until_sync(ended, timeout=max(timeout, 0.0), what=f"process {pid} to end")
    except WaitTimeout:
        return False
    return True


@dataclass(frozen=True)
class StorageSpec:
    kind: str
    export_dir: Path  # where the images live, on this machine's file system

    def disk(self, image: str) -> str:
        """What QEMU opens for ``<image>.img``: a URL, or the shared path for ``dir``."""
        if self.kind == "nfs":
            return f"nfs://{STORAGE.address}{NFS_EXPORT}/{image}.img"
        if self.kind == "nbd":
            return f"nbd://{STORAGE.address}:{NBD_PORT}/{image}"
        return str(self.export_dir / f"{image}.img")


def check_kind(kind: str) -> str:
    if kind not in STORAGE_KINDS:
        raise StorageError(f"lab storage {kind!r} is not one of {', '.join(STORAGE_KINDS)}")
    return kind


def start(spec: StorageSpec, images: list[str], logdir: Path) -> list[LabProcess]:
    """Start the servers of ``spec`` for ``images`` (names, files ``<name>.img``)."""
    logdir.mkdir(parents=True, exist_ok=True)
    if spec.kind == "nfs":
        return _start_nfs(spec, logdir)
    if spec.kind == "nbd":
        return [_start_nbd(spec, images, logdir)]
    return []


def stop(procs: list[LabProcess]) -> list[str]:
    """End the servers, last started first; the names of those that were running."""
    return [p.name for p in reversed(procs) if p.stop()]


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # A session of its own: a Ctrl-C at `ferry lab up` must not reach the servers.
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


# -- nfs -------------------------------------------------------------------------


def ganesha_config(export_dir: Path, recovery_dir: Path) -> str:
    # Mount_Path_Pseudo: libnfs mounts "/xen" over NFSv3, which ganesha otherwise
    # matches against the export's real path. Graceless: a fresh lab has no
    # clients to reclaim state, and the 90 s grace period would stall opens.
    return f"""\
NFS_CORE_PARAM {{
    Bind_Addr = {STORAGE.address};
    Protocols = 3, 4;
    NFS_Port = {NFS_PORT};
    MNT_Port = {MOUNT_PORT};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "{recovery_dir}";
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export_dir}";
    Pseudo = "{NFS_EXPORT}";
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3, 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


def _start_nfs(spec: StorageSpec, logdir: Path) -> list[LabProcess]:
    recovery = logdir / "ganesha-recovery"
    recovery.mkdir(exist_ok=True)
    config = logdir / "ganesha.conf"
    config.write_text(ganesha_config(spec.export_dir, recovery))
    procs: list[LabProcess] = []
    try:
        # rpcbind anchors the private mount namespace; ganesha joins it below.
        rpcbind_log = logdir / "rpcbind.log"
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable,
                "-m", "ferry.lab.storage", "private-run", "rpcbind", "-f"]  # fmt: skip
        rpcbind = spawn(netns.popen_argv(STORAGE.ns, argv), rpcbind_log)
        _wait_for(lambda: _is_exec_of(rpcbind.pid, "rpcbind"), rpcbind, "rpcbind", rpcbind_log)
        procs.append(LabProcess.started("rpcbind", rpcbind, "rpcbind", rpcbind_log))
        _wait_for(lambda: _listening(STORAGE.ns, 111), rpcbind, "rpcbind", rpcbind_log)

        ganesha_log = logdir / "ganesha.log"
        argv = ["nsenter", "-t", str(rpcbind.pid), "-m", "-n",
                "ganesha.nfsd", "-F", "-f", str(config), "-L", str(ganesha_log),
                "-p", str(logdir / "ganesha.pid"), "-N", "NIV_EVENT"]  # fmt: skip
        ganesha = spawn(argv, logdir / "ganesha.out")
        procs.append(LabProcess.started("ganesha", ganesha, str(config), ganesha_log))
        _wait_for(lambda: _nfs_registered(), ganesha, "nfs-ganesha", ganesha_log)
    except BaseException:
        stop(procs)
        raise
    return procs


def _is_exec_of(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _nfs_registered() -> bool:
    result = netns.run(STORAGE.ns, ["rpcinfo", "-p", STORAGE.address], timeout=10)
    return (
        " nfs" in result.stdout and " mountd" in result.stdout and _listening(STORAGE.ns, NFS_PORT)
    )


# -- nbd -------------------------------------------------------------------------


def _start_nbd(spec: StorageSpec, images: list[str], logdir: Path) -> LabProcess:
    argv = ["qemu-storage-daemon"]
    for i, image in enumerate(images):
        path = spec.export_dir / f"{image}.img"
        # A qcow2 image is opened by the server, which exports its content: an
        # NBD export has a fixed size, and a qcow2 file grows as it is written.
        fmt = _image_format(path)
        argv += [
            "--blockdev", f"driver=file,node-name=file{i},filename={path},cache.direct=off",
            "--blockdev", f"driver={fmt},node-name=disk{i},file=file{i}",
        ]  # fmt: skip
    argv += ["--nbd-server", f"addr.type=inet,addr.host={STORAGE.address},addr.port={NBD_PORT}"]
    for i, image in enumerate(images):
        argv += ["--export", f"type=nbd,id=export{i},node-name=disk{i},name={image},writable=on"]
    log = logdir / "qemu-storage-daemon.log"
    proc = spawn(netns.popen_argv(STORAGE.ns, argv), log)
    _wait_for(lambda: _listening(STORAGE.ns, NBD_PORT), proc, "qemu-storage-daemon", log)
    return LabProcess.started("qemu-storage-daemon", proc, "qemu-storage-daemon", log)


# -- helpers ---------------------------------------------------------------------


def _image_format(path: Path) -> str:
    """The lab's own images, made by the lab: raw or qcow2, read from the file."""
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise FerryError(f"lab storage: {path}: {result.stderr.strip()}")
    fmt = str(json.loads(result.stdout).get("format"))
    if fmt not in ("raw", "qcow2"):
        raise FerryError(f"lab storage: {path} is a {fmt} image, not raw or qcow2")
    return fmt


def _listening(ns_name: str, port: int) -> bool:
    result = netns.run(ns_name, ["ss", "-Hltn", f"sport = :{port}"], timeout=10)
    return result.returncode == 0 and bool(result.stdout.strip())


def _wait_for(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    def ready() -> bool:
        if check():
            return True
        if proc.poll() is not None:
            raise StorageError(
                f"{what} in {STORAGE.ns} exited with status {proc.returncode}: {_tail(log)}"
            )
        return False

    try:
        # Some checks run a command in the namespace (ss, rpcinfo): not every 50 ms.
        wait_until_sync(ready, timeout=START_TIMEOUT, what=f"{what} to be ready", interval=0.2)
    except WaitTimeout as err:
        proc.kill()
        proc.wait()
        raise StorageError(
            f"{what} in {STORAGE.ns} not ready within {START_TIMEOUT:.0f} s (log {log})"
        ) from err


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else f"(empty log {log})"


def _private_run(argv: list[str]) -> None:
    """Mount a private tmpfs on /run, then become ``argv`` (in a fresh mount namespace)."""
    if os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt"):
        sys.exit("private-run: refusing to hide the machine's /run (not in a mount namespace)")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "ferrylab-run", "/run"], check=True
    )
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    if sys.argv[1:2] != ["private-run"] or len(sys.argv) < 3:
        sys.exit("usage: python -m ferry.lab.storage private-run CMD [ARG...]")
    _private_run(sys.argv[2:])
