"""Lean streams (serving.grpclib_ext.lean): what an idle open stream holds on the server,
and that grpclib's behaviour is kept (the buffer reads as grpclib's does)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import pytest
from grpclib.protocol import Buffer

from number_service import NumberClient
from number_service.pytest_plugin import RunningServer

TIMEOUT = 10.0


def server_streams(server: RunningServer) -> list[Any]:
    """The h2 streams open on the server now, over all its connections."""
    connections = server.server.connections.live  # type: ignore[attr-defined]
    return [s for c in connections for s in c.processor.streams.values()]


def asyncio_parts(obj: object, kinds: Any = (asyncio.Event, asyncio.Queue)) -> list[str]:
    """The asyncio Events and Queues (or other ``kinds``) among ``obj``'s attributes."""
    return [type(v).__name__ for v in vars(obj).values() if isinstance(v, kinds)]


async def test_an_idle_open_stream_holds_no_asyncio_event_or_queue(
    number_server: RunningServer,
) -> None:
    client = NumberClient(number_server.host, number_server.port, timeout=TIMEOUT)
    async with client, contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(client.session()) for _ in range(20)]
        for k, session in enumerate(sessions, 1):
            assert await session.add(k) == k
        streams = server_streams(number_server)
        assert len(streams) == 20
        for stream in streams:
            assert asyncio_parts(stream) == []
            assert asyncio_parts(stream.buffer) == []
            # but the one future its handler waits on for the next request
            assert asyncio_parts(stream.buffer, asyncio.Future) == ["Future"]
        for k, session in enumerate(sessions, 1):  # and they still work
            assert await session.add(1) == k + 1


async def feed_and_read(buffer: Buffer, chunks: list[bytes], sizes: list[int]) -> Any:
    """Feed ``chunks`` (then the end) while reading ``sizes``; what was read, and the
    credit given back, in order."""
    acked: list[int] = []
    buffer._ack_callback = acked.append

    async def feed() -> None:
        for chunk in chunks:
            await asyncio.sleep(0)
            buffer.add(chunk, len(chunk) + 1)  # one byte of padding each
        buffer.eof()

    feeding = asyncio.create_task(feed())
    read = [await buffer.read(size) for size in sizes]
    await feeding
    return read, acked, buffer.unacked_size()


@pytest.mark.parametrize("seed", range(20))
async def test_the_lean_buffer_reads_as_grpclibs(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 400))
    cuts = sorted(rng.sample(range(1, max(2, len(data))), min(len(data) // 3, 8)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    total = sum(map(len, chunks))
    sizes: list[int] = []
    while sum(sizes) < total - 1:
        sizes.append(rng.randrange(1, max(2, total - sum(sizes))))
    if total - sum(sizes):
        sizes.append(total - sum(sizes))
    sizes += [0, 5]  # and reads at the end: b''
    from number_service.serving.grpclib_ext.lean import LeanBuffer

    expected = await feed_and_read(Buffer(lambda n: None), chunks, sizes)
    assert await feed_and_read(LeanBuffer(lambda n: None), chunks, sizes) == expected
