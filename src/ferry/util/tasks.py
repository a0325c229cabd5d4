"""Background tasks that are named, kept and never fail in silence.

asyncio keeps only a weak reference to a task, and reports a task's
exception late (when the task is collected), if ever. A daemon needs more:
:class:`Background` holds every task it started until it ends, logs a failure
with its traceback at once, and cancels what is left on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("ferry.tasks")


def spawn(work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """A named task whose failure is logged with its traceback when it ends."""
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.error("task %s failed", task.get_name(), exc_info=err)


class Background:
    """The background tasks of one owner (a daemon, a service)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = spawn(work, name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    async def close(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
