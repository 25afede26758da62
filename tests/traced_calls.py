"""NumberClient calls ending in each status, run as a process by tests/test_tracing.py.

    python tests/traced_calls.py PORT

Tracing comes from the OTEL_* variables the test sets, as any application's would.
Prints one line per call: its name and the status the caller saw (``closed`` for a
call the caller left early).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from number_service import NumberClient
from number_service.codec import NumberCodec

HOST = "127.0.0.1"
TIMEOUT = 20.0  # seconds: the deadline of every call but the one meant to pass it
DEADLINE = 0.5  # seconds: the deadline of the call that passes it
BLOCKED = 2.5  # seconds that call's client blocks its loop, past the server's deadline


class Unparsable(NumberCodec):
    """Sends every request as a varint field with its value cut off: INTERNAL."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return b"\x08"


async def accumulate(client: NumberClient, numbers: Any) -> None:
    async for _ in client.accumulate(numbers):
        pass


async def leave_early(client: NumberClient) -> None:
    """Take the first sum, then close the call: the client cancels the stream."""

    async def one_then_wait() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(TIMEOUT)

    sums = client.accumulate(one_then_wait())
    assert await anext(sums) == 1
    await sums.aclose()


async def past_the_deadline(port: int) -> None:
    """A call whose client is busy (its loop blocked) when the deadline passes, so
    that the server, not the client's cancel, ends it: DEADLINE_EXCEEDED on both."""

    async def one_then_block() -> AsyncIterator[int]:
        yield 1
        time.sleep(BLOCKED)  # noqa: ASYNC251 - blocking the loop is the point
        yield 2

    async with NumberClient(HOST, port, timeout=DEADLINE) as client:
        await accumulate(client, one_then_block())


async def main(port: int) -> None:
    results: list[tuple[str, str]] = []

    async def call(name: str, done: Any) -> None:
        try:
            await done
            results.append((name, "closed" if name == "cancelled" else "OK"))
        except GRPCError as err:
            results.append((name, err.status.name))

    async with NumberClient(HOST, port, timeout=TIMEOUT) as client:
        await call("ok", accumulate(client, [1, 2, 3]))
        await call("out_of_range", accumulate(client, [2**31 - 1, 1]))
        await call("cancelled", leave_early(client))
    await call("deadline_exceeded", past_the_deadline(port))
    channel = Channel(HOST, port, codec=Unparsable())
    try:
        await call("internal", accumulate(NumberClient.over(channel, timeout=TIMEOUT), [1]))
    finally:
        channel.close()
    for name, status in results:
        print(name, status, flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
