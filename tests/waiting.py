"""Waiting on a condition instead of sleeping a fixed time: a test that sleeps "long enough" is slow
on a quiet machine and flaky on a busy one; one that polls the condition is neither."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(
    predicate: Callable[[], object],
    timeout: float = 5.0,  # noqa: ASYNC109 - it bounds the condition, not one awaited call
    interval: float = 0.005,
) -> None:
    """Return as soon as `predicate()` is true; fail the test if it is still false after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
