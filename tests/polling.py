"""Waiting, in tests, for state that a server updates in its own time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``done()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not done after {timeout} s")
        await asyncio.sleep(0.01)
