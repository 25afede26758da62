"""Lean streams (serving.grpclib_ext.lean): what an idle open stream holds on the server,
and that grpclib's behaviour is kept (the buffer reads as grpclib's does)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import random
import sys
from typing import Any

import pytest
from grpclib.protocol import Buffer
from grpclib.utils import Wrapper
from rawh2 import H2Client, grpc_message

from benchmarks.floods import DATA, END_STREAM, PING, PRIORITY, WINDOW_UPDATE, frame
from number_service import NumberClient
from number_service.codec import decode_int32_field, encode_int32_field
from number_service.pytest_plugin import RunningServer
from number_service.serving import grpclib_ext
from number_service.serving.grpclib_ext.lean import LeanBuffer, LeanWrapper

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
    if isinstance(buffer, LeanBuffer):
        buffer._connection = Acked(acked)
    else:
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
    expected = await feed_and_read(Buffer(lambda n: None), chunks, sizes)
    assert await feed_and_read(LeanBuffer(Acked([]), 1), chunks, sizes) == expected


class Acked:
    """A connection that notes the credit given back (LeanBuffer's Acker)."""

    def __init__(self, acked: list[int]) -> None:
        self.acked = acked

    def ack(self, stream_id: int, size: int) -> None:
        self.acked.append(size)


def handler_tasks(server: RunningServer) -> list[asyncio.Task[None]]:
    """The stream tasks the server's connection handlers hold."""
    assert isinstance(server.server, grpclib_ext.Server)
    return server.server.connections.handler_tasks()


async def test_an_idle_streams_handler_keeps_no_request_headers(
    number_server: RunningServer,
) -> None:
    client = NumberClient(number_server.host, number_server.port, timeout=TIMEOUT)
    async with client, client.session() as session:
        assert await session.add(3) == 3
        (task,) = handler_tasks(number_server)
        frame = task.get_coro().cr_frame  # type: ignore[union-attr]
        kept = [v for v in frame.f_locals.values() if isinstance(v, (list, dict))]
        assert not [v for v in kept if any(isinstance(x, tuple) for x in v)], kept
        assert await session.add(4) == 7  # the deadline (timeout=) still armed, unexpired


async def test_stream_tasks_are_forgotten_as_they_end(number_server: RunningServer) -> None:
    client = NumberClient(number_server.host, number_server.port, timeout=TIMEOUT)
    started = asyncio.Event()

    async def cut_short() -> None:
        async with client.session() as session:
            assert await session.add(1) == 1
            started.set()
            await asyncio.sleep(TIMEOUT)

    async with client:
        for k in range(5):
            async with client.session() as session:
                assert await session.add(k) == k
        cut = asyncio.create_task(cut_short())
        await asyncio.wait_for(started.wait(), TIMEOUT)
        assert len(handler_tasks(number_server)) == 1
        cut.cancel()  # the client resets the stream; the server cancels its task
        with contextlib.suppress(asyncio.CancelledError):
            await cut
        for _ in range(200):
            if not handler_tasks(number_server):
                break
            await asyncio.sleep(0.01)
        assert handler_tasks(number_server) == []
        await asyncio.sleep(0.05)
        assert not any(h._cancelled for h in number_server.server._handlers)


async def test_the_server_formats_no_frame_it_receives(
    number_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h2 builds repr(frame) of every frame received for a trace log that is off;
    the server's connections don't (the client's, plain h2, still do: the count works)."""
    from h2.connection import H2Connection
    from hyperframe.frame import Frame

    formatted = {"server": 0, "client": 0}
    frame_repr = Frame.__repr__

    def counting_repr(self: Frame) -> str:
        caller = sys._getframe(1).f_locals.get("self")
        if isinstance(caller, H2Connection):
            formatted["client" if caller.config.client_side else "server"] += 1
        return frame_repr(self)

    monkeypatch.setattr(Frame, "__repr__", counting_repr)
    client = NumberClient(number_server.host, number_server.port, timeout=TIMEOUT)
    async with client, client.session() as session:
        for k in range(1, 11):
            assert await session.add(1) == k
    assert formatted["client"] >= 10
    assert formatted["server"] == 0


async def test_a_connection_window_update_wakes_only_streams_waiting_for_window(
    number_server: RunningServer,
) -> None:
    async with await H2Client.connect(number_server.port) as h2:
        ids = []
        for k in range(1, 21):
            stream_id = h2.open_stream()
            h2.send_data(stream_id, grpc_message(encode_int32_field(k)))
            ids.append(stream_id)
        while not all(h2.replies[i].messages for i in ids):
            await h2.receive(TIMEOUT)
        h2.conn.increment_flow_control_window(1000)  # a WINDOW_UPDATE for the connection
        h2.ping(7)
        while not h2.pings_acked:
            await h2.receive(TIMEOUT)
        streams = server_streams(number_server)
        assert len(streams) == 20
        # grpclib set a window_updated Event on every stream; none is made here
        assert [s for s in streams if s._events is not None] == []


async def test_streams_stalled_on_the_connection_window_go_on_when_it_opens(
    number_server: RunningServer,
) -> None:
    """The answers of two streams pass the client's 65,535-byte connection window:
    the server's sends wait for it, and the client's WINDOW_UPDATEs wake them."""
    numbers = [(i * 7919) % 2001 - 1000 for i in range(5000)]
    async with await H2Client.connect(number_server.port) as h2:
        while h2.conn.outbound_flow_control_window <= 65535:  # the server's 4 MiB windows
            await h2.receive(TIMEOUT)
        ids = []
        for _ in range(2):
            stream_id = h2.open_stream()
            data = b"".join(grpc_message(encode_int32_field(n)) for n in numbers)
            for at in range(0, len(data), 16384):  # h2's largest frame
                end = at + 16384 >= len(data)
                h2.send_data(stream_id, data[at : at + 16384], end_stream=end)
            ids.append(stream_id)
        await h2.flush()
        await asyncio.sleep(0.5)  # the server answers until the connection window is used up
        while not all(h2.replies[i].ended for i in ids):
            await h2.receive(TIMEOUT)
        for stream_id in ids:
            reply = h2.replies[stream_id]
            assert reply.grpc_status == 0, reply
            sums = [decode_int32_field(m) for m in reply.messages]
            assert sums == list(itertools.accumulate(numbers))


@pytest.mark.parametrize("stubborn", [False, True])
async def test_the_lean_wrapper_cancels_as_grpclibs(stubborn: bool) -> None:
    """LeanWrapper (a tuple where grpclib's Wrapper has a set) behaves as grpclib's:
    cancel() cancels the task inside it, which raises the error at the exit;
    cancel_failed says whether the task swallowed its cancellation; entering after
    the cancel raises the error at once."""
    outcomes = []
    for wrapper in (Wrapper(), LeanWrapper()):

        async def inside(wrapper: Wrapper = wrapper) -> str:
            with wrapper:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if not stubborn:
                        raise
            return "not cancelled"

        task = asyncio.create_task(inside())
        await asyncio.sleep(0)
        wrapper.cancel(TimeoutError("Deadline exceeded"))
        with pytest.raises(TimeoutError, match="Deadline exceeded"):
            await asyncio.wait_for(task, 5)
        with pytest.raises(TimeoutError, match="Deadline exceeded"), wrapper:
            pass
        outcomes.append((wrapper.cancelled, wrapper.cancel_failed))
    assert outcomes[0] == (True, stubborn)
    assert outcomes[1] == outcomes[0]


def _h2_pair(server_class: type[Any]) -> tuple[Any, Any]:
    """A plain h2 client and a server connection of ``server_class``, settings
    exchanged, streams 1 (open) and 3 (half-closed by the client) answered with
    headers, so the server may send DATA on both; stream 5 open, not answered, its
    request with a content-length of 10."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = H2Connection(H2Configuration(client_side=True))
    server = server_class(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    request = [(":method", "POST"), (":scheme", "http"), (":path", "/p"), (":authority", "a")]
    client.send_headers(1, request)
    client.send_headers(3, request, end_stream=True)
    client.send_headers(5, [*request, ("content-length", "10")])
    server.receive_data(client.data_to_send())
    for stream_id in (1, 3):
        server.send_headers(stream_id, [(":status", "200")])
    client.receive_data(server.data_to_send())
    return client, server


def _send_data_outcome(server: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What ``send_data(*args)`` did: the bytes out (or the error), the connection's
    window, the stream's state and window."""
    stream_id = args[0]
    try:
        server.send_data(*args)
        result: Any = bytes(server.data_to_send())
    except Exception as err:  # h2's errors are part of the outcome
        result = type(err).__name__
    stream = server.streams.get(stream_id)
    if stream is None:
        return result, server.outbound_flow_control_window, None
    state = stream.state_machine.state, stream.open, stream.outbound_flow_control_window
    return result, server.outbound_flow_control_window, state


@pytest.mark.parametrize(
    "args",
    [
        (1, b"\x00\x00\x00\x00\x02\x08\x05"),  # one small message on an open stream
        (3, b"\x00" * 1000),  # on a stream the client half-closed
        (1, memoryview(b"abc" * 100)[5:200]),
        (1, bytearray(b"a bytearray")),
        (1, memoryview(array.array("I", [1, 2, 3]))),  # 3 items, 12 bytes
        (1, "not bytes"),  # h2's TypeError, and nothing left half-written
        (1, b"x" * 16_384),  # the largest frame the peer takes
        (1, b"x" * 16_385),  # larger: h2's FrameTooLargeError
        (1, b"x" * 70_000),  # over the window: h2's FlowControlError
        (1, b""),
        (1, b"end", True),
        (1, b"padded", False, 3),
        (7, b"no such stream"),
    ],
)
def test_the_lean_h2_connection_sends_data_as_h2s(args: tuple[Any, ...]) -> None:
    """LeanH2Connection.send_data takes a shortcut for a plain DATA frame: the bytes,
    the windows and the stream's state after it are h2's, and so are its errors."""
    from h2.connection import H2Connection

    from number_service.serving.grpclib_ext.lean import LeanH2Connection

    outcomes = []
    for server_class in (H2Connection, LeanH2Connection):
        client, server = _h2_pair(server_class)
        outcomes.append(_send_data_outcome(server, args))
        outcomes.append(_send_data_outcome(server, args))  # and again, windows used
        if isinstance(outcomes[-1][0], bytes):  # the client reads it as h2's
            events = client.receive_data(outcomes[-1][0])
            outcomes.append(tuple(type(e).__name__ for e in events))
    half = len(outcomes) // 2
    assert outcomes[:half] == outcomes[half:]


def test_the_lean_h2_connection_takes_its_shortcut_for_a_plain_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain DATA frame does not go through h2's send_data (what the shortcut saves);
    one with END_STREAM does."""
    from h2.connection import H2Connection

    from number_service.serving.grpclib_ext.lean import LeanH2Connection

    calls = []
    h2_send_data = H2Connection.send_data

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(args)
        h2_send_data(self, *args, **kwargs)

    monkeypatch.setattr(H2Connection, "send_data", counted)
    _, server = _h2_pair(LeanH2Connection)
    server.send_data(1, b"plain")
    assert calls == []
    server.send_data(1, b"last", True)
    assert len(calls) == 1


def _received_frames(rng: random.Random) -> list[bytes]:
    """Frames a client might send the server of ``_h2_pair`` (streams 1 open, 3
    half-closed by the client, 5 open with a content-length of 10), good and bad."""
    padded = 0x8
    choices = [
        lambda: frame(DATA, 0, 1, rng.randbytes(rng.choice([0, 1, 7, 300, 900]))),
        lambda: frame(DATA, 0, 1, rng.randbytes(7)),
        lambda: frame(DATA, 0, 0x80000001, b"reserved bit set"),
        lambda: frame(DATA, 0, 5, b"123456"),  # counted against its content-length
        lambda: frame(DATA, END_STREAM, 1, b"last"),
        lambda: frame(DATA, padded, 1, bytes([3]) + b"pad" + bytes(3)),
        lambda: frame(DATA, 0x2, 1, b"an unknown flag"),
        lambda: frame(DATA, 0, 3, b"half-closed"),
        lambda: frame(DATA, 0, 9, b"never opened"),
        lambda: frame(DATA, 0, 1, bytes(20_000)),  # past the frame size
        lambda: frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big")),
        lambda: frame(PING, 0, 0, bytes(8)),
        # No flags, on an open stream, and not DATA: h2's.
        lambda: frame(WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")),
        lambda: frame(PRIORITY, 0, 1, bytes(4) + b"\x10"),
    ]
    weights = [30, 30, 2, 6, 1, 1, 1, 1, 0.5, 0.5, 3, 2, 2, 2]
    return [rng.choices(choices, weights)[0]() for _ in range(rng.randint(1, 40))]


def _receiver_state(server: Any) -> tuple[Any, ...]:
    streams = tuple(
        (
            stream_id,
            stream.state_machine.state,
            stream._inbound_window_manager.current_window_size,
            stream._actual_content_length,
        )
        for stream_id, stream in sorted(server.streams.items())
    )
    window = server._inbound_flow_control_window_manager.current_window_size
    return server.state_machine.state, window, streams, bytes(server.data_to_send())


@pytest.mark.parametrize("seed", range(60))
def test_the_lean_h2_connection_receives_data_as_h2s(seed: int) -> None:
    """LeanH2Connection.receive_data reads plain DATA frames itself: for random runs of
    frames (good, bad, and ones h2 must refuse) cut at random points, the events, the
    errors, the windows, the streams' states and what it sends back are h2's."""
    from h2.connection import H2Connection

    from number_service.serving.grpclib_ext.lean import LeanH2Connection

    rng = random.Random(seed)
    wire = b"".join(_received_frames(rng))
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(0, 6))))
    chunks = [wire[a:b] for a, b in itertools.pairwise([0, *cuts, len(wire)])]
    seen = []
    for server_class, pieces in itertools.product((H2Connection, LeanH2Connection), (1, 2)):
        _, server = _h2_pair(server_class)
        server.send_headers(5, [(":status", "200")])
        if seed % 3 == 0:  # a connection window that a few frames use up
            server._inbound_flow_control_window_manager.current_window_size = 1000
        elif seed % 3 == 1:  # and a stream's
            server.streams[1]._inbound_window_manager.current_window_size = 1000
        outcome: list[Any] = []
        for k, chunk in enumerate([wire] if pieces == 1 else chunks):
            given: Any = (chunk, bytearray(chunk), memoryview(chunk))[k % 3]  # what h2 takes
            try:
                events = server.receive_data(given)
                outcome.append([(type(e).__name__, vars(e)) for e in events])
            except Exception as err:  # and what h2 sends for it (a GOAWAY, say)
                outcome.append([type(err).__name__, str(err), _receiver_state(server)])
                break
            outcome.append(_receiver_state(server))
        seen.append(outcome)
    assert seen[2:] == seen[:2]  # all at once, and in pieces


def test_the_lean_h2_connection_refuses_data_before_headers_as_h2() -> None:
    """On a client connection, DATA before the response's HEADERS is h2's
    ProtocolError (a stream a server makes has always received its headers)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.exceptions import ProtocolError

    from number_service.serving.grpclib_ext.lean import LeanH2Connection

    seen = []
    for client_class in (H2Connection, LeanH2Connection):
        client = client_class(H2Configuration(client_side=True))
        server = H2Connection(H2Configuration(client_side=False))
        client.initiate_connection()
        server.initiate_connection()
        client.receive_data(server.data_to_send())
        request = [(":method", "POST"), (":scheme", "http"), (":path", "/p"), (":authority", "a")]
        client.send_headers(1, request)
        with pytest.raises(ProtocolError) as raised:
            client.receive_data(frame(DATA, 0, 1, b"too soon"))
        seen.append((type(raised.value), str(raised.value), bytes(client.data_to_send())[-17:]))
    assert seen[1] == seen[0]
