"""The batched AccumulateNumbers handler (fastpath.py) that NumberServer.build serves:
requests that arrive together are answered together, in one DATA frame, and
nothing else changes: order, lock-step answers, errors after the sums before them,
message counts. Over a real server on loopback, with a raw HTTP/2 client that
sees each DATA frame."""

from __future__ import annotations

import asyncio
import itertools
import socket

from grpclib import events
from grpclib.const import Status
from grpclib.testing import ChannelFor
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.settings import SettingCodes, Settings
from rawh2 import H2Client, Reply, grpc_message

from number_service.client import NumberClient
from number_service.codec import decode_int32_field, encode_int32_field
from number_service.fastpath import _BATCH, BatchedAccumulate, supported
from number_service.pytest_plugin import RunningServer
from number_service.server import NumberServer, address_of, bind
from number_service.service import NumberService
from number_service.streams import TRAILERS_WAIT, StreamRecord

TIMEOUT = 5.0
INT32_MAX = 2**31 - 1


def framed(*numbers: int) -> bytes:
    """Requests for ``numbers``, gRPC-framed back to back (to go in one DATA frame)."""
    return b"".join(grpc_message(encode_int32_field(n)) for n in numbers)


def sums(reply: Reply) -> list[int]:
    return [decode_int32_field(m) for m in reply.messages]


async def call_counting_frames(h2: H2Client, data: bytes) -> tuple[Reply, int]:
    """Send ``data`` as one DATA frame with END_STREAM; the reply and how many DATA
    frames (with a payload) it came in."""
    stream_id = h2.open_stream()
    h2.send_data(stream_id, data, end_stream=True)
    reply = h2.replies[stream_id]
    frames = 0
    while not (reply.ended or reply.reset is not None or h2.closed):
        for event in await h2.receive(TIMEOUT):
            if isinstance(event, DataReceived) and event.stream_id == stream_id and event.data:
                frames += 1
    return reply, frames


def ended_records(server: RunningServer) -> list[StreamRecord]:
    ended: list[StreamRecord] = []
    server.instance.streams.on_end.append(ended.append)
    return ended


def test_supported_by_this_grpclib() -> None:
    """Else NumberServer.build silently serves the generated handler, and every test
    here would be testing that instead."""
    assert supported()


async def test_requests_in_one_data_frame_are_answered_in_one(
    number_server: RunningServer,
) -> None:
    numbers = list(range(-50, _BATCH - 50))  # a whole batch, in one DATA frame
    ended = ended_records(number_server)
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(*numbers))
    assert reply.grpc_status == Status.OK.value, reply
    assert sums(reply) == list(itertools.accumulate(numbers))
    assert frames == 1
    record = next(r for r in ended if r.method_name == "AccumulateNumbers")
    assert (record.received, record.sent, record.status) == (_BATCH, _BATCH, Status.OK)


async def test_a_large_backlog_goes_out_in_several_batches_in_order(
    number_server: RunningServer,
) -> None:
    numbers = [n * 7 - 3000 for n in range(3 * _BATCH + 10)]  # ~14 KiB: one DATA frame
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(*numbers))
    assert reply.grpc_status == Status.OK.value, reply
    assert sums(reply) == list(itertools.accumulate(numbers))
    assert frames >= 4  # at most _BATCH answers per write: other streams get turns


async def test_a_lock_step_client_gets_each_answer_before_it_sends_the_next(
    number_server: RunningServer,
) -> None:
    async with await H2Client.connect(number_server.port) as h2:
        stream_id = h2.open_stream()
        reply = h2.replies[stream_id]
        expected: list[int] = []
        for n in (5, -2, 40, 0, 7):
            expected.append((expected[-1] if expected else 0) + n)
            h2.send_data(stream_id, framed(n))
            await h2.read_until(lambda: len(reply.messages) == len(expected), TIMEOUT)
            assert sums(reply) == expected
        h2.conn.end_stream(stream_id)
        await h2.reply(stream_id, TIMEOUT)
    assert reply.grpc_status == Status.OK.value


async def test_overflow_mid_batch_sends_the_sums_before_it_then_the_status(
    number_server: RunningServer,
) -> None:
    ended = ended_records(number_server)
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(1, 2, INT32_MAX, 3))
    assert sums(reply) == [1, 3]
    assert frames == 1
    assert reply.grpc_status == Status.OUT_OF_RANGE.value
    assert reply.grpc_message is not None
    assert "sum 3 + num 2147483647" in reply.grpc_message
    record = next(r for r in ended if r.method_name == "AccumulateNumbers")
    # The overflowing request was read whole (and counted), as on the generated path.
    assert (record.received, record.sent) == (3, 2)


async def test_undecodable_request_mid_batch_sends_the_sums_before_it_then_internal(
    number_server: RunningServer,
) -> None:
    bad = grpc_message(b"\x08")  # field 1, varint cut short
    async with await H2Client.connect(number_server.port) as h2:
        reply, _ = await call_counting_frames(h2, framed(4, 5) + bad + framed(6))
    assert sums(reply) == [4, 9]
    assert reply.grpc_status == Status.INTERNAL.value
    assert reply.grpc_message == (
        "request could not be decoded as tutorial.NumberRequest: truncated varint"
    )


async def test_compressed_request_mid_batch_is_unimplemented_after_the_sums(
    number_server: RunningServer,
) -> None:
    data = framed(1) + grpc_message(b"\x08\x01", compressed=True) + framed(2)
    async with await H2Client.connect(number_server.port) as h2:
        reply, _ = await call_counting_frames(h2, data)
    assert sums(reply) == [1]
    assert reply.grpc_status == Status.UNIMPLEMENTED.value


async def test_without_number_codec_the_generated_handler_serves() -> None:
    """A server built with another codec (here grpclib's default) gets the generated
    handler, whose bytes its codec writes."""
    service = NumberService(batched=BatchedAccumulate())
    async with ChannelFor([service]) as channel:
        client = NumberClient.over(channel)
        got = [s async for s in client.accumulate([3, 4, -1], timeout=TIMEOUT)]
    assert got == [3, 7, 6]


async def test_a_grpclib_message_listener_gets_the_generated_handler(
    number_server: RunningServer,
) -> None:
    """Listeners of grpclib's RecvMessage/SendMessage events see every message: the
    batched handler, which sends none, steps aside for them."""
    seen: list[int] = []

    async def record(event: events.RecvMessage) -> None:
        seen.append(event.message.num)

    events.listen(number_server.server, events.RecvMessage, record)
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(1, 2, 3))
    assert sums(reply) == [1, 3, 6]
    assert seen == [1, 2, 3]
    assert frames == 3  # one per message: the generated handler


REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/tutorial.NumberService/AccumulateNumbers"),
    (":authority", "127.0.0.1"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]


async def test_shutdown_ends_even_when_a_client_never_reads() -> None:
    """A client that floods and never reads: the server's answers fill the socket
    buffers within a second on this path, and the drain's UNAVAILABLE trailers can
    never be written. Shutdown must still end (it once waited forever)."""
    built = NumberServer.build()
    sock = bind("127.0.0.1", 0)
    await built.start(sock)
    port = address_of(sock)[1]
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    h2 = H2Connection(H2Configuration(client_side=True))
    big = 2**31 - 1  # the client lets the server send all it likes: its socket is what fills
    h2.local_settings = Settings(
        client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: big}
    )
    h2.initiate_connection()
    h2.increment_flow_control_window(big - 65535)
    stream_id = h2.get_next_available_stream_id()
    h2.send_headers(stream_id, REQUEST_HEADERS)
    try:
        await loop.sock_sendall(raw, h2.data_to_send())
        # The server's SETTINGS and window update open its 4 MiB receive window.
        h2.receive_data(await asyncio.wait_for(loop.sock_recv(raw, 65536), 5))
        await loop.sock_sendall(raw, h2.data_to_send())
        batch = grpc_message(encode_int32_field(1)) * 2000
        while h2.local_flow_control_window(stream_id) > len(batch):  # the server's 4 MiB
            h2.send_data(stream_id, batch)
            await loop.sock_sendall(raw, h2.data_to_send())
        await asyncio.sleep(1.0)  # the server answers until its writes back up
        started = loop.time()
        await asyncio.wait_for(built.shutdown(grace=0.5), 0.5 + TRAILERS_WAIT + 5)
        assert loop.time() - started < 0.5 + TRAILERS_WAIT + 2
    finally:
        raw.close()
