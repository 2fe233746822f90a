"""Waiting in tests for state that has no event to wait on."""

from __future__ import annotations

from collections.abc import Callable

import trio

WAIT = 20


async def until(predicate: Callable[[], bool], *, interval: float = 0.02) -> None:
    """Return once ``predicate()`` holds, checked every ``interval`` seconds.

    Raises :class:`trio.TooSlowError` if it does not hold within ``WAIT`` seconds (callers may
    bound the wait more tightly)."""
    with trio.fail_after(WAIT):
        while not predicate():  # noqa: ASYNC110 (polls state that has no event to wait on)
            await trio.sleep(interval)
