"""QMP over the ``qemu.qmp`` library, with ferry's errors and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from ferry.errors import QmpError

# qemu.qmp logs every disconnect at warning level; ferry reports what matters.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Monitor:
    """One QMP connection to one QEMU."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self._client = QMPClient(domain)
        self.events = EventListener()
        self._client.register_listener(self.events)

    async def connect(self, socket: Path, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._client.connect(str(socket)), timeout)
        except (ConnectError, OSError, TimeoutError) as err:
            raise QmpError(
                f"cannot connect to QMP of domain '{self.domain}' at {socket}: {err}"
            ) from err

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 30.0
    ) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as err:
            raise QmpError(
                f"QMP {command} on domain '{self.domain}' failed: {err.error.error.desc}"
            ) from err
        except TimeoutError as err:
            raise QmpError(
                f"QMP {command} on domain '{self.domain}' got no answer within {timeout:.0f} s"
            ) from err
        except (QMPError, OSError, EOFError) as err:
            raise QmpError(
                f"QMP {command} on domain '{self.domain}' failed: monitor connection lost ({err})"
            ) from err

    @contextlib.contextmanager
    def listener(self, names: Iterable[str]) -> Iterator[EventListener]:
        """A private queue of the named events for as long as the block runs."""
        with self._client.listener(names) as events:
            yield events

    def watch_events(self, names: Iterable[str]) -> EventListener:
        """Like :meth:`listener`, for a queue that outlives one block; pair with unwatch."""
        events = EventListener(names)
        self._client.register_listener(events)
        return events

    def unwatch(self, events: EventListener) -> None:
        with contextlib.suppress(ValueError, KeyError):
            self._client.remove_listener(events)

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a file descriptor (SCM_RIGHTS), known to it as ``name``."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as err:
            raise QmpError(
                f"cannot pass a file descriptor to domain '{self.domain}': {err}"
            ) from err
        await self.execute("getfd", {"fdname": name})

    async def close(self) -> None:
        # The peer may be gone already, which is what closing wants anyway.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        # Closing twice (a watcher, then ferryd leaving) is harmless.
        with contextlib.suppress(ValueError):
            self._client.remove_listener(self.events)
