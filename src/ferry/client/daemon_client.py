"""A synchronous client of ferryd's control API (for the CLI, the lab and tests)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.errors import DaemonUnreachable, ProtocolError, error_from_wire

DEFAULT_SOCKET = Path("/run/ferry/ferryd.sock")


def default_socket() -> Path:
    return Path(os.environ.get("FERRY_SOCKET", str(DEFAULT_SOCKET)))


class DaemonClient:
    def __init__(self, path: Path, timeout: float = 600.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        return self.call_stream(op, None, **args)

    def call_stream(
        self, op: str, on_progress: Callable[[dict[str, Any]], None] | None, **args: Any
    ) -> Any:
        """A request whose answer may be preceded by ``{"progress": ...}`` lines."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as err:
                raise DaemonUnreachable(
                    f"no ferryd answers on {self.path} ({err.strerror}); is ferryd running?"
                ) from None
            except PermissionError:
                raise DaemonUnreachable(
                    f"permission denied on {self.path}: ferry must run as root"
                ) from None
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
                f"ferryd on {self.path} did not answer '{op}' within {self.timeout:.0f} s"
            ) from None
        except ConnectionError as err:
            raise DaemonUnreachable(
                f"ferryd on {self.path} dropped the connection during '{op}': {err}"
            ) from None
        finally:
            sock.close()
        if not reply:
            raise ProtocolError(f"ferryd on {self.path} closed the connection during '{op}'")
        try:
            message = json.loads(reply)
        except ValueError as err:
            raise ProtocolError(f"ferryd sent a malformed reply to '{op}': {err}") from err
        if not isinstance(message, dict):
            raise ProtocolError(f"ferryd sent a malformed reply to '{op}'")
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
