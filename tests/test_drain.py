"""The drain on the wire: what an HTTP/2 client sees when ``serve`` gets SIGTERM.

grpc-go's GracefulStop: GOAWAY with last-stream-id 2^31-1 and a PING; once the PING
is answered, GOAWAY with the real last stream id. A stream that crossed the first
GOAWAY is served, one opened after the second is refused with
RST_STREAM(REFUSED_STREAM), streams in flight carry on, and the connection ends with
a FIN, not a reset. A raw h2 client on 127.0.0.1 reads every frame; GOAWAY frames are
kept from its h2 (h2 4.4 refuses every frame after it receives one, h2 #1181).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import signal
import socket
from collections.abc import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, TrailersReceived
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, RstStreamFrame
from processes import EXIT_TIMEOUT, HOST, ServerProcess, reap, start_server
from rawh2 import ACCUMULATE, H2Client, RawSocket, Reply, grpc_message, parse_frames

from number_service import build_server
from number_service.serving import address_of, bind, grpclib_ext

TIMEOUT = 10.0  # seconds for any one wait here (the machine is shared)
MAX_STREAM_ID = 2**31 - 1


def number(num: int) -> bytes:
    """A NumberRequest with ``num`` (positive, small), as a gRPC message."""
    return grpc_message(b"\x08" + bytes([num]))


def answer(num: int) -> bytes:
    """A NumberResponse with sum ``num`` (positive, small), as a gRPC message."""
    return grpc_message(b"\x08" + bytes([num]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Client:
    """A raw HTTP/2 client that records every frame the server sends, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.frames: list[Frame] = []
        self.rest = b""
        self.data: dict[int, bytes] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.eof = False
        self.reset_by_peer = False
        self.hold: list[Frame] = []  # frames received, not yet given to h2

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        client = cls(reader, writer)
        client.h2.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        if data := self.h2.data_to_send():
            self.writer.write(data)
            await self.writer.drain()

    def open(self, *payloads: bytes) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", ACCUMULATE)]
        headers += [(":authority", HOST), ("te", "trailers"), ("content-type", "application/grpc")]
        self.h2.send_headers(stream_id, headers)
        for payload in payloads:
            self.h2.send_data(stream_id, payload)
        return stream_id

    async def read_frames(self) -> list[Frame]:
        """Read once; the whole frames that came (EOF and reset are noted)."""
        try:
            chunk = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
        except ConnectionResetError:
            self.reset_by_peer = True
            chunk = b""
        if not chunk:
            self.eof = True
            return []
        frames, self.rest = parse_frames(self.rest + chunk)
        self.frames += frames
        return frames

    def give(self, frame: Frame) -> None:
        """Hand one frame to h2 (not a GOAWAY) and note what it says of streams."""
        if isinstance(frame, GoAwayFrame):
            return
        for event in self.h2.receive_data(frame.serialize()):
            if isinstance(event, DataReceived) and event.stream_id is not None:
                stream_id = event.stream_id
                self.data[stream_id] = self.data.get(stream_id, b"") + (event.data or b"")
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
            elif isinstance(event, TrailersReceived) and event.stream_id is not None:
                self.trailers[event.stream_id] = {
                    _text(key): _text(value) for key, value in event.headers or []
                }

    async def until(self, done: Callable[[], bool], *, give: bool = True) -> None:
        """Read and (with ``give``) hand frames to h2 until ``done()`` or EOF."""
        async with asyncio.timeout(TIMEOUT):
            while not done() and not self.eof:
                for frame in await self.read_frames():
                    if give:
                        self.give(frame)
                    else:
                        self.hold.append(frame)
                await self.flush()

    def goaways(self) -> list[GoAwayFrame]:
        return [f for f in self.frames if isinstance(f, GoAwayFrame)]

    def refused(self, stream_id: int) -> bool:
        return any(
            isinstance(f, RstStreamFrame)
            and f.stream_id == stream_id
            and f.error_code == ErrorCodes.REFUSED_STREAM
            for f in self.frames
        )


def status_of(client: Client, stream_id: int) -> str | None:
    return client.trailers.get(stream_id, {}).get("grpc-status")


async def test_sigterm_sends_two_goaways_refuses_new_streams_and_ends_with_a_fin() -> None:
    server: ServerProcess = start_server(0, "--grace", "20")
    try:
        client = await Client.connect(server.port)
        first = client.open(number(5))
        await client.until(lambda: client.data.get(first) == answer(5))

        server.proc.send_signal(signal.SIGTERM)
        # The first GOAWAY (2^31-1) and its PING; not handed to h2 yet, so that a
        # stream opened now reaches the server before the PING's answer does.
        await client.until(lambda: any(isinstance(f, PingFrame) for f in client.hold), give=False)
        (goaway,) = client.goaways()
        assert goaway.last_stream_id == MAX_STREAM_ID
        assert goaway.error_code == ErrorCodes.NO_ERROR
        types = [type(f).__name__ for f in client.frames]
        assert types.index("GoAwayFrame") < types.index("PingFrame"), types
        crossed = client.open(number(7))  # sent before the PING's ACK: still served
        await client.flush()
        for frame in client.hold:
            client.give(frame)  # h2 answers the PING now
        client.hold = []
        await client.flush()
        await client.until(lambda: len(client.goaways()) == 2)
        second = client.goaways()[1]
        assert second.last_stream_id == crossed, second  # the real last stream id
        assert second.error_code == ErrorCodes.NO_ERROR

        late = client.open(number(9))  # after the second GOAWAY: refused, not answered
        await client.flush()
        await client.until(lambda: client.refused(late))
        assert late not in client.data
        assert late not in client.trailers

        # The streams in flight carry on, and end OK.
        client.h2.send_data(first, number(1), end_stream=True)
        client.h2.send_data(crossed, b"", end_stream=True)
        await client.flush()
        await client.until(lambda: status_of(client, first) == status_of(client, crossed) == "0")
        assert client.data[first] == answer(5) + answer(6)
        assert client.data[crossed] == answer(7)

        # Then the server closes: a FIN, with nothing left unread on either side.
        await client.until(lambda: False)
        assert client.eof
        assert not client.reset_by_peer
        assert len(client.goaways()) == 2
        client.writer.close()
        with contextlib.suppress(ConnectionError):
            await client.writer.wait_closed()
        assert server.proc.wait(EXIT_TIMEOUT) == 0
        log = server.stderr.rest()
        assert "Traceback" not in log, log
        assert "grace period over" not in log, log
    finally:
        reap(server.proc)


async def test_a_connection_still_in_the_listen_backlog_is_served_not_reset() -> None:
    """A connection the kernel completed but the server had not yet accepted when
    its drain began, its request already sent (as nginx sends one): it is taken
    from the backlog and drained like the others (its stream answered, the two
    GOAWAYs), where closing the listening socket would reset it and fail a request
    that no client retries. In-process, so that the drain starts before the event
    loop can accept the connection."""
    sock = bind(HOST, 0)
    built = build_server()
    await built.start(sock)
    port = address_of(sock)[1]
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)  # blocks the loop: unaccepted
    h2, stream_id = one_request()
    raw.sendall(h2.data_to_send())
    shutdown = asyncio.create_task(built.shutdown(grace=5))  # runs before the accept
    client = H2Client(RawSocket(*await asyncio.open_connection(sock=raw)))
    client.conn = h2
    client.replies[stream_id] = Reply()
    try:
        reply = client.replies[stream_id]
        await client.read_until(lambda: client.closed)
        assert reply.grpc_status == 0, reply
        assert reply.data == answer(5)
        assert [g.last_stream_id for g in client.goaways] == [MAX_STREAM_ID, stream_id]
        await asyncio.wait_for(shutdown, TIMEOUT)
    finally:
        await client.close()
        if not shutdown.done():
            shutdown.cancel()


def one_request() -> tuple[H2Connection, int]:
    """A client's h2 connection holding its first bytes, as nginx sends them on
    connecting: the preface and SETTINGS, then one AccumulateNumbers stream with one
    number and its end; and that stream's id."""
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    h2.initiate_connection()
    stream_id = h2.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", ACCUMULATE)]
    headers += [(":authority", HOST), ("te", "trailers"), ("content-type", "application/grpc")]
    h2.send_headers(stream_id, headers)
    h2.send_data(stream_id, number(5), end_stream=True)
    return h2, stream_id


def request_bytes() -> bytes:
    """The bytes of :func:`one_request`."""
    return one_request()[0].data_to_send()


def connect_late(late: socket.socket, address: tuple[str, int]) -> bool:
    """Connect ``late`` (non-blocking) to ``address`` and, if the kernel completes the
    handshake at once (as on loopback when it takes it), send :func:`request_bytes`;
    whether it did."""
    late.connect_ex(address)
    _, writable, _ = select.select([], [late], [], 0.3)
    if writable and late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
        late.sendall(request_bytes())
        return True
    return False


async def assert_refused_not_reset(late: socket.socket, sent: bool) -> None:
    """A connection made as a listening socket closed: if it connected (``sent``), it
    is served or closed with a FIN, never reset; if its SYN was dropped, sent again it
    finds the port closed."""
    if sent:
        late.setblocking(True)
        late.settimeout(TIMEOUT)
        with contextlib.suppress(TimeoutError):
            while late.recv(65536):  # a reset raises ConnectionResetError
                pass
    else:
        _, writable, _ = await asyncio.to_thread(select.select, [], [late], [], TIMEOUT)
        assert writable, "the late connection neither connected nor was refused"
        error = late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert error == errno.ECONNREFUSED, os.strerror(error)


async def test_a_connection_made_as_the_listening_socket_closes_is_refused_not_reset() -> None:
    """A connection the kernel completes after the drain's last accept() and before
    the listening socket's close() would be reset by the close, its request already
    sent (nginx sends one at once, and answers that call 502: it does not retry a
    request it has sent). The drain first has the kernel start no new handshake on
    the socket (a socket filter drops SYNs: the client sends its SYN again a second
    later and finds the port closed), lets those under way complete, accepts the
    backlog, then closes: such a client sees a refused connection, which it can
    retry elsewhere (nginx does), never a reset.

    Deterministic: the client connects from inside the asyncio server's close(), the
    moment between the sweep and the socket's close."""
    sock = bind(HOST, 0)
    built = build_server()
    await built.start(sock)
    server = built.server
    assert isinstance(server, grpclib_ext.Server)
    listener = server._server  # asyncio's Server, whose close() closes the socket
    assert listener is not None
    real_close = listener.close
    port = address_of(sock)[1]
    late = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    late.setblocking(False)
    sent: list[bool] = []

    def close_with_a_late_connection() -> None:
        listener.close = real_close  # type: ignore[method-assign]
        sent.append(connect_late(late, (HOST, port)))
        real_close()

    listener.close = close_with_a_late_connection  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(built.shutdown(grace=5), TIMEOUT)
        assert len(sent) == 1, "the listening socket was not closed"
        await assert_refused_not_reset(late, sent[0])
    finally:
        late.close()


async def test_a_goaway_from_the_client_leaves_its_streams_in_flight_running() -> None:
    """A client's GOAWAY (node's http2 sends one as soon as it has the server's, to
    close gracefully) speaks of streams the server would open, none in gRPC: the
    client's streams in flight carry on to OK. h2 4.4 moved the connection to CLOSED
    on it and refused their next DATA (a PROTOCOL_ERROR GOAWAY), and grpclib ended
    every stream of the connection."""
    sock = bind(HOST, 0)
    built = build_server()
    await built.start(sock)
    try:
        client = await H2Client.connect(address_of(sock)[1])
        stream_id = client.open_stream()
        client.send_data(stream_id, number(5))
        reply = client.replies[stream_id]
        await client.read_until(lambda: reply.data == answer(5))
        mine = GoAwayFrame(0)
        mine.last_stream_id = 0
        mine.error_code = ErrorCodes.NO_ERROR
        await client.sock.send(mine.serialize())
        client.send_data(stream_id, number(2), end_stream=True)
        await client.read_until(lambda: reply.ended or reply.reset is not None)
        assert client.goaways == []
        assert reply.grpc_status == 0, reply
        assert reply.data == answer(5) + answer(7)
        await client.close()
    finally:
        await built.shutdown(grace=0)


async def test_a_connection_made_once_the_drain_began_is_drained_not_refused() -> None:
    """asyncio makes a connection's protocol a loop turn or more after it accepts it
    (and a TLS one after its handshake): one accepted just before the listening
    socket closed is made once the drain has begun, its request perhaps already sent
    (nginx sends it at once). It is drained like the others: its stream answered,
    the two GOAWAYs, no reset (refusing it closed it with the request unread, a TCP
    reset: nginx answered that request 502). Here the connection is made as asyncio's
    accept makes it, from a socket pair, while a stream in flight keeps the drain on."""
    sock = bind(HOST, 0)
    built = build_server()
    await built.start(sock)
    server = built.server
    assert isinstance(server, grpclib_ext.Server)
    busy = await H2Client.connect(address_of(sock)[1])
    shutdown: asyncio.Task[None] | None = None
    try:
        held = busy.open_stream()
        busy.send_data(held, number(1))
        await busy.read_until(lambda: busy.replies[held].data == answer(1))
        shutdown = asyncio.create_task(built.shutdown(grace=5))
        await busy.read_until(lambda: len(busy.goaways) == 2)

        ours, theirs = socket.socketpair()
        h2, stream_id = one_request()
        ours.sendall(h2.data_to_send())
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(server._protocol_factory, theirs)
        late = H2Client(RawSocket(*await asyncio.open_connection(sock=ours)))
        late.conn = h2
        late.replies[stream_id] = reply = Reply()
        await late.read_until(lambda: late.closed)
        assert reply.grpc_status == 0, reply
        assert reply.data == answer(5)
        assert [g.last_stream_id for g in late.goaways] == [MAX_STREAM_ID, stream_id]
        await late.close()
        busy.send_data(held, b"", end_stream=True)
        await busy.read_until(lambda: busy.closed)
        assert busy.replies[held].grpc_status == 0
        await asyncio.wait_for(shutdown, TIMEOUT)
    finally:
        await busy.close()
        if shutdown is None:
            await built.shutdown(grace=0)
