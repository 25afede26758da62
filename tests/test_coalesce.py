"""Write coalescing: one socket write per loop turn, same bytes, same order."""

from __future__ import annotations

import asyncio

from rawh2 import H2Client, grpc_message

from number_service import NumberClient, build_server
from number_service.codec import encode_int32_field as num  # a NumberRequest's bytes
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


async def test_a_reads_writes_wait_for_the_handlers_it_woke() -> None:
    """Written while a read is handled (hold .. release): sent once the callbacks
    the read scheduled have run, together with what they wrote, in order."""
    real = Recording()
    transport = CoalescingTransport(real)
    loop = asyncio.get_running_loop()
    transport.hold()
    transport.write(b"ping-ack")
    loop.call_soon(transport.write, b"answer")  # a handler the read woke
    transport.release()
    await asyncio.sleep(0)
    assert real.writes == [b"ping-ack" + b"answer"]
    transport.hold()
    transport.release()  # a read that wrote nothing and woke nothing
    await asyncio.sleep(0)
    assert real.writes == [b"ping-ack" + b"answer"]


async def test_a_lock_step_request_with_a_ping_is_answered_in_one_send() -> None:
    """Through the real server, as grpc-go's BDP estimator does: each request comes
    with a PING in one write; its PING ACK and its answer leave in one socket
    write (before, the PING ACK went alone and the answer a loop turn later)."""
    built = build_server()
    sock = bind("127.0.0.1", 0)
    await built.start(sock)
    port = address_of(sock)[1]
    writes = 0
    plain_write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

    def counting(self: asyncio.Transport, data: bytes) -> None:
        nonlocal writes
        if self.get_extra_info("sockname")[1] == port:  # the server's side
            writes += 1
        plain_write(self, data)

    try:
        async with await H2Client.connect(port) as client:
            stream = client.open_stream()
            client.send_data(stream, grpc_message(num(1)))
            await client.read_until(lambda: len(client.replies[stream].messages) == 1)
            await asyncio.sleep(0.1)  # SETTINGS and their ACKs are done with
            asyncio.selector_events._SelectorSocketTransport.write = counting  # type: ignore[attr-defined]
            for k in range(2, 52):
                client.send_data(stream, grpc_message(num(1)))
                client.ping(k)
                await client.read_until(
                    lambda k=k: (
                        len(client.replies[stream].messages) == k  # type: ignore[misc]
                        and client.pings_acked == k - 1
                    )
                )
    finally:
        asyncio.selector_events._SelectorSocketTransport.write = plain_write  # type: ignore[attr-defined]
        await built.shutdown(0)
    assert client.replies[stream].messages[-1] == num(51)  # NumberResponse.sum: same field
    assert writes == 50
