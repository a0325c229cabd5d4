"""Waiting on a state, once for the whole code base.

Every "poll until X holds" in ferry goes through :func:`wait_until` (asyncio)
or :func:`wait_until_sync` (threads, tests, CLI): the deadline is on the
monotonic clock and owned by the caller, and a timeout names what was awaited
and the last value seen, so a failure says where things stood.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ferry.errors import WaitTimeout

T = TypeVar("T")


@overload
async def wait_until(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    wake: asyncio.Event | None = None,
) -> T: ...


@overload
async def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    wake: asyncio.Event | None = None,
) -> T: ...


async def wait_until(
    check: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    wake: asyncio.Event | None = None,
) -> Any:
    """Call ``check`` until it returns something truthy; return that.

    ``wake`` (optional) cuts the pause between two checks short, for callers
    that learn of a change by an event (a QMP event, a child's exit).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        result = check()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        last = value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        pause = min(interval, remaining)
        if wake is None:
            await asyncio.sleep(pause)
        else:
            # asyncio.timeout: wait_for can lose a cancellation in 3.11.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await wake.wait()
            wake.clear()


def wait_until_sync(
    check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """The same for synchronous callers (tests, the lab, the CLI)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(min(interval, remaining))
