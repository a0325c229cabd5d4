"""A synchronous client of ferryd's control API (for the CLI, the lab and tests).

Local: the root-only unix socket. Remote (the management station): TCP with
mutual TLS, our certificate of the cluster CA against the host's; the host
must prove it is the one we asked for.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.errors import DaemonUnreachable, PkiError, ProtocolError, error_from_wire

if TYPE_CHECKING:
    from ferry.pki.credentials import Credentials

DEFAULT_SOCKET = Path("/run/ferry/ferryd.sock")
CONTROL_PORT = 8003


def default_socket() -> Path:
    return Path(os.environ.get("FERRY_SOCKET", str(DEFAULT_SOCKET)))


def split_host(text: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; the port defaults to 8003."""
    host, sep, port = text.rpartition(":")
    if not sep or (host.count(":") and not host.endswith("]")):
        return text.strip("[]"), CONTROL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DaemonUnreachable(f"{text!r}: the port must be a number from 1 to 65535")
    return host.strip("[]"), int(port)


class DaemonClient:
    def __init__(
        self,
        path: Path | None = None,
        timeout: float = 600.0,
        remote: tuple[str, int] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.path = path
        self.remote = remote
        self.credentials = credentials
        self.timeout = timeout

    @property
    def where(self) -> str:
        return f"{self.remote[0]}:{self.remote[1]}" if self.remote else str(self.path)

    def _connect(self) -> socket.socket:
        if self.remote is None:
            return self._connect_local()
        # Only a remote ferryd needs certificates: the local commands do not pay
        # for importing cryptography (80 ms of every `ferry` command's start).
        from ferry.pki.credentials import HANDSHAKE_TIMEOUT, tls_failure
        from ferry.pki.identity import Role

        host, port = self.remote
        if self.credentials is None:
            raise DaemonUnreachable("a remote ferryd needs our credentials (--pki)")
        try:
            context = self.credentials.client_context()
            raw = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        except PkiError as err:
            raise DaemonUnreachable(f"cannot reach ferryd on {self.where}: {err}") from None
        except OSError as err:
            reason = err.strerror or str(err)
            raise DaemonUnreachable(f"no ferryd answers on {self.where}: {reason}") from None
        try:
            sock = context.wrap_socket(raw)
            identity = self.credentials.peer(sock.getpeercert(binary_form=True))
        except ssl.SSLError as err:
            raw.close()
            raise DaemonUnreachable(
                f"TLS with ferryd on {self.where} failed: {tls_failure(err)}"
            ) from None
        except (PkiError, OSError) as err:
            raw.close()
            raise DaemonUnreachable(f"ferryd on {self.where}: {err}") from None
        if identity.role is not Role.HOST or not identity.answers_to(host):
            sock.close()
            raise DaemonUnreachable(
                f"{self.where} presented the certificate of {identity}, not of host {host}"
            )
        sock.settimeout(self.timeout)
        return sock

    def _connect_local(self) -> socket.socket:
        assert self.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            raise DaemonUnreachable(
                f"no ferryd answers on {self.path} ({err.strerror}); is ferryd running?"
            ) from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(
                f"permission denied on {self.path}: ferry must run as root"
            ) from None
        return sock

    def open_console(self, name: str) -> socket.socket:
        """A connection that carries the domain's serial console, both ways."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": "console_attach", "args": {"name": name}}).encode())
            sock.sendall(b"\n")
            line = b""
            while not line.endswith(b"\n"):
                # One byte at a time: what follows the reply is the console's.
                chunk = sock.recv(1)
                if not chunk:
                    raise ProtocolError(f"ferryd on {self.where} closed the console")
                line += chunk
            _result(json.loads(line), "console_attach", self.where)
        except BaseException:
            sock.close()
            raise
        return sock

    def call(self, op: str, **args: Any) -> Any:
        return self.call_stream(op, None, **args)

    def call_stream(
        self, op: str, on_progress: Callable[[dict[str, Any]], None] | None, **args: Any
    ) -> Any:
        """A request whose answer may be preceded by ``{"progress": ...}`` lines."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            replies = sock.makefile("rb")
            while True:
                reply = replies.readline()
                progress = _progress(reply)
                if progress is None:
                    break
                if on_progress is not None:
                    on_progress(progress)
        except TimeoutError:
            raise DaemonUnreachable(
                f"ferryd on {self.where} did not answer '{op}' within {self.timeout:.0f} s"
            ) from None
        except (ConnectionError, ssl.SSLError) as err:
            raise DaemonUnreachable(
                f"ferryd on {self.where} dropped the connection during '{op}': {err}"
            ) from None
        finally:
            sock.close()
        if not reply:
            raise ProtocolError(f"ferryd on {self.where} closed the connection during '{op}'")
        try:
            message = json.loads(reply)
        except ValueError as err:
            raise ProtocolError(f"ferryd sent a malformed reply to '{op}': {err}") from err
        return _result(message, op, self.where)


def _result(message: Any, op: str, where: str) -> Any:
    if not isinstance(message, dict):
        raise ProtocolError(f"ferryd on {where} sent a malformed reply to '{op}'")
    if not message.get("ok"):
        raise error_from_wire(message.get("error"))
    return message.get("result")


def _progress(line: bytes) -> dict[str, Any] | None:
    if not line.startswith(b'{"progress"'):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    progress = message.get("progress") if isinstance(message, dict) else None
    return progress if isinstance(progress, dict) else None
