"""Batched streams (serving.grpclib_ext.BatchingStream), which every server the serving
layer builds uses: requests that arrive together are handed to the handler together
and its answers go out together, in one DATA frame, and nothing else changes: order,
lock-step answers, errors after the sums before them, message counts. Over a real
server on loopback, with a raw HTTP/2 client that sees each DATA frame."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter

from grpclib import events
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Server
from grpclib.server import Stream as GrpclibStream
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.settings import SettingCodes, Settings
from rawh2 import H2Client, Reply, grpc_message

from number_service import build_server
from number_service.codec import NumberCodec, decode_int32_field, encode_int32_field
from number_service.pytest_plugin import RunningServer
from number_service.service import NumberService
from number_service.serving.grpclib_ext import BATCH, mismatch
from number_service.serving.grpclib_ext import Server as BatchingServer
from number_service.serving.grpclib_ext.stream import Turn
from number_service.serving.run import address_of, bind
from number_service.serving.streams import TRAILERS_WAIT, StreamRecord
from number_service_gen.tutorial import NumberRequest, NumberResponse

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


def test_written_for_the_locked_grpclib_and_h2() -> None:
    """Else the serving layer serves with plain grpclib streams, and every test here
    would be testing that instead."""
    assert mismatch() is None


async def test_requests_in_one_data_frame_are_answered_in_one(
    number_server: RunningServer,
) -> None:
    numbers = list(range(-50, BATCH - 50))  # a whole batch, in one DATA frame
    ended = ended_records(number_server)
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(*numbers))
    assert reply.grpc_status == Status.OK.value, reply
    assert sums(reply) == list(itertools.accumulate(numbers))
    assert frames == 1
    record = next(r for r in ended if r.method_name == "AccumulateNumbers")
    assert (record.received, record.sent, record.status) == (BATCH, BATCH, Status.OK)


async def test_a_large_backlog_goes_out_in_several_batches_in_order(
    number_server: RunningServer,
) -> None:
    numbers = [n * 7 - 3000 for n in range(3 * BATCH + 10)]  # ~14 KiB: one DATA frame
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(*numbers))
    assert reply.grpc_status == Status.OK.value, reply
    assert sums(reply) == list(itertools.accumulate(numbers))
    assert frames >= 4  # at most BATCH answers per write: other streams get turns


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


async def test_the_handler_of_a_plain_grpclib_server_is_the_same_service() -> None:
    """Server([NumberService()]), grpclib's own with betterproto2's codec, runs the
    same handler, so it gives the same answers (one DATA frame each)."""
    server = Server([NumberService()])
    sock = bind("127.0.0.1", 0)
    await server.start(sock=sock)
    try:
        async with await H2Client.connect(address_of(sock)[1]) as h2:
            reply, frames = await call_counting_frames(h2, framed(3, 4, -1))
    finally:
        server.close()
        await server.wait_closed()
    assert sums(reply) == [3, 7, 6]
    assert frames == 3


async def test_a_grpclib_message_listener_sees_every_message_of_a_batch(
    number_server: RunningServer,
) -> None:
    """Listeners of grpclib's RecvMessage/SendMessage events see each message, and the
    answers still go out together."""
    seen: list[int] = []
    answered: list[int] = []

    async def received(event: events.RecvMessage) -> None:
        seen.append(event.message.num)

    async def sent(event: events.SendMessage) -> None:
        answered.append(event.message.sum)

    events.listen(number_server.server, events.RecvMessage, received)
    events.listen(number_server.server, events.SendMessage, sent)
    async with await H2Client.connect(number_server.port) as h2:
        reply, frames = await call_counting_frames(h2, framed(1, 2, 3))
    assert sums(reply) == [1, 3, 6]
    assert (seen, answered) == ([1, 2, 3], [1, 3, 6])
    assert frames == 1


class _SlowEcho:
    """A bidi handler that answers each request, then does other work (a sleep) before
    it takes the next: what it answered must not wait for that work."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    async def echo(self, stream: GrpclibStream[NumberRequest, NumberResponse]) -> None:
        async for request in stream:
            await stream.send_message(NumberResponse(sum=request.num))
            await asyncio.sleep(self.pause)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/tutorial.NumberService/AccumulateNumbers": Handler(
                self.echo, Cardinality.STREAM_STREAM, NumberRequest, NumberResponse
            )
        }


async def test_answers_held_for_a_batch_go_out_when_the_handler_waits_on_other_work() -> None:
    pause = 0.5
    server = BatchingServer([_SlowEcho(pause)], codec=NumberCodec())
    sock = bind("127.0.0.1", 0)
    await server.start_on(sock)
    loop = asyncio.get_running_loop()
    try:
        async with await H2Client.connect(address_of(sock)[1]) as h2:
            stream_id = h2.open_stream()
            reply = h2.replies[stream_id]
            started = loop.time()
            h2.send_data(stream_id, framed(7, 8, 9), end_stream=True)  # three at once
            await h2.read_until(lambda: len(reply.messages) >= 1, TIMEOUT)
            first = loop.time() - started
            await h2.reply(stream_id, TIMEOUT)
    finally:
        server.close()
        await server.wait_closed()
    assert sums(reply) == [7, 8, 9]
    assert first < pause, f"the first answer waited {first:.2f} s for the handler's work"


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
    built = build_server()
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


# --- a connection's share of a loop turn ------------------------------------------------


class CountedTurn(Turn):
    """A Turn that counts its resets (the periods its share is for)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.period = 0

    def _next_turn(self) -> None:
        self.period += 1
        super()._next_turn()


class Taken:
    """Which stream took requests in which period of a CountedTurn."""

    def __init__(self, streams: int) -> None:
        self.per_period: Counter[int] = Counter()
        self.waits = [0] * streams
        self.longest_gap = [0] * streams  # periods between two takes of a stream
        self.last = [0] * streams


async def busy_stream(turn: CountedTurn, ready: int, taken: Taken, index: int) -> None:
    """What BatchingStream.__anext__ does with its Turn, for ``ready`` requests that
    are all there at once (it decodes BATCH at a time)."""
    granted = run = 0
    while ready:
        if run >= BATCH:
            run = 0
            await asyncio.sleep(0)
            continue
        if granted:
            granted -= 1
        elif not turn.take():
            run = 0
            taken.waits[index] += 1
            granted = await turn.wait(min(ready, BATCH))
            continue
        ready -= 1
        run += 1
        taken.per_period[turn.period] += 1
        gap = turn.period - taken.last[index]
        taken.longest_gap[index] = max(taken.longest_gap[index], gap)
        taken.last[index] = turn.period


async def busy_streams(streams: int, requests: int, share: int = 64) -> Taken:
    """``streams`` busy streams of ``requests`` each, run to the end on one Turn:
    every request is taken, and no period between resets takes more than the share."""
    turn = CountedTurn(share)
    taken = Taken(streams)
    running = (busy_stream(turn, requests, taken, i) for i in range(streams))
    await asyncio.wait_for(asyncio.gather(*running), 20)
    assert sum(taken.per_period.values()) == streams * requests
    assert max(taken.per_period.values()) <= share
    return taken


async def test_streams_past_their_connections_share_wait_in_line_not_in_a_spin() -> None:
    """100 streams with 64 requests each on one connection, a share of 64 per turn:
    no turn takes more than the share, every request is taken, and each stream waits
    twice at most (in line). Woken all at every turn, each would wait ~50 times."""
    taken = await busy_streams(100, 64)
    assert max(taken.waits) <= 2, sorted(taken.waits)[-5:]


async def test_the_line_is_first_come_first_served() -> None:
    """100 streams with 10 batches each, a share of one batch per turn: a stream that
    comes back from its batch's yield goes to the back of the line, so each waits
    for the others' batches (~100 turns) and never much longer. Let past the line,
    one stream kept the share for turns on end and another waited ~990 turns."""
    taken = await busy_streams(100, 640)
    assert max(taken.longest_gap) <= 110, sorted(taken.longest_gap)[-5:]


async def test_a_stream_cancelled_while_in_line_does_not_stall_the_others() -> None:
    """The first streams in line are cancelled while they wait: the turn that wakes
    them skips them, and the rest are all served."""
    turn = CountedTurn(8)
    taken = Taken(20)
    tasks = [asyncio.ensure_future(busy_stream(turn, 8, taken, i)) for i in range(20)]
    await asyncio.sleep(0)  # the first takes the share; the others are in line now
    for task in tasks[1:6]:
        task.cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert [t.cancelled() for t in tasks] == [False] + [True] * 5 + [False] * 14
    assert [r for i, r in enumerate(results) if not 1 <= i <= 5] == [None] * 15
    assert sum(taken.per_period.values()) == 15 * 8
