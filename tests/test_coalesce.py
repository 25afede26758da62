"""Write coalescing: one socket write per loop turn, same bytes, same order."""

from __future__ import annotations

import asyncio

from number_service import NumberClient, build_server
from number_service.serving.grpclib_ext.coalesce import CoalescingTransport
from number_service.serving.run import address_of, bind


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


async def test_writes_of_one_turn_go_out_together_in_order() -> None:
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"ab")
    transport.write(b"")
    transport.write(bytearray(b"cd"))
    assert real.writes == []
    assert transport.get_write_buffer_size() == 4
    await asyncio.sleep(0)
    assert real.writes == [b"abcd"]
    transport.write(b"ef")
    await asyncio.sleep(0)
    assert real.writes == [b"abcd", b"ef"]


async def test_close_sends_what_is_pending_first() -> None:
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"goaway")
    transport.close()
    assert real.writes == [b"goaway"]
    assert real.closed
    await asyncio.sleep(0)
    assert real.writes == [b"goaway"]


async def test_a_pipelined_stream_is_answered_with_fewer_sends_than_answers() -> None:
    """Through the real server: 2,000 answers, far fewer writes to the socket."""
    built = build_server()
    sock = bind("127.0.0.1", 0)
    await built.start(sock)
    writes = 0
    plain_write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

    def counting(self: asyncio.Transport, data: bytes) -> None:
        nonlocal writes
        if self.get_extra_info("sockname")[1] == address_of(sock)[1]:  # the server's side
            writes += 1
        plain_write(self, data)

    asyncio.selector_events._SelectorSocketTransport.write = counting  # type: ignore[attr-defined]
    try:
        async with NumberClient(*address_of(sock), timeout=30) as client:
            sums = [s async for s in client.accumulate(range(2000))]
        assert sums[-1] == sum(range(2000))
        assert len(sums) == 2000
    finally:
        asyncio.selector_events._SelectorSocketTransport.write = plain_write  # type: ignore[attr-defined]
        await built.shutdown(1)
    assert 0 < writes < 1000
