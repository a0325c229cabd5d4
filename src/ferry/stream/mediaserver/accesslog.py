"""The access log, one line per request in the common log format."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def common_log_line(client: str, request_line: str, status: int, sent: int) -> str:
    """``host - - [date] "request" status bytes``; 0 as status is written as ``-``."""
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime())
    request = (request_line or "-").replace("\\", "\\\\").replace('"', '\\"')
    return f'{client} - - [{stamp}] "{request}" {status or "-"} {sent}'


class AccessLog:
    """Lines from all connection threads, whole and in the order they were written.

    ``target`` is a path, ``-`` for stdout, or None for no log at all.
    """

    def __init__(self, target: str | None) -> None:
        self._lock = threading.Lock()
        self._out: TextIO | None = None
        if target == "-":
            self._out = sys.stdout
        elif target:
            self._out = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, line: str) -> None:
        if self._out is None:
            return
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def close(self) -> None:
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
