"""A real etcd (Debian's etcd-server) for tests: one member, loopback ports, its own data dir.

``freeze()`` stops the process (SIGSTOP) so that every call times out as with
a lost quorum; ``thaw()`` lets it go on. The member is ended by PID and its
log kept in the test's directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.lab.etcd_cluster import auth_commands, etcdctl_argv

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdMember:
    def __init__(self, workdir: Path, tls: Path | None = None) -> None:
        self.workdir = workdir
        self.client_port = free_port()
        self.peer_port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.log = workdir / "etcd.log"
        args = [
            ETCD, "--name", "t", "--data-dir", str(workdir / "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"t=http://127.0.0.1:{self.peer_port}",
        ]  # fmt: skip
        if tls is not None:
            args += [
                "--cert-file", str(tls / "cert.pem"), "--key-file", str(tls / "key.pem"),
                "--trusted-ca-file", str(tls / "ca.pem"), "--client-cert-auth",
            ]  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-2000:]}")
            if "ready to serve client requests" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def enable_auth(self, root: Path, hosts: list[str]) -> None:
        """etcd's authorization as the lab sets it: the hosts' CNs, one role on /ferry/."""
        for command in auth_commands(hosts):
            subprocess.run(etcdctl_argv(self.url, root, command), check=True, capture_output=True)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdMember]:
    member = EtcdMember(tmp_path / "etcd")
    try:
        yield member
    finally:
        member.stop()
