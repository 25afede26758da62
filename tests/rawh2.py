"""A small raw HTTP/2 client for tests that must put exactly chosen bytes on the wire.

Two levels:

- :class:`H2Client` speaks real HTTP/2 through ``h2`` (the library grpclib itself
  uses), but lets a test choose every header and every byte of every DATA frame:
  wrong content types, lying gRPC length prefixes, compressed flags, floods of
  PINGs, streams opened and reset at once. :meth:`H2Client.reply` collects what
  the server answered on one stream as a :class:`Reply`.
- :class:`RawSocket` is a plain TCP connection for bytes that are not HTTP/2 at
  all; :func:`frame` builds a frame from any type, flags, stream id and payload,
  and :func:`parse_frames` reads what the server sent back.

Every wait has a timeout; connections go to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, SettingsFrame

HOST = "127.0.0.1"
TIMEOUT = 5.0  # seconds: the longest any single network wait here may take
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ACCUMULATE = "/tutorial.NumberService/AccumulateNumbers"
_READ_SIZE = 65536

# Frame types by number (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame, exactly as given: any type, flags, stream id and payload.

    The 24-bit length field is the payload's length (a payload over 16 MiB - 1 is
    refused here, not truncated); use :func:`frame_header` to make it lie.
    """
    return frame_header(len(payload), frame_type, flags, stream_id) + payload


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header; ``stream_id`` may set the reserved bit."""
    if not 0 <= length < 1 << 24:
        raise ValueError(f"frame length {length} does not fit 24 bits")
    return struct.pack(">I", length)[1:] + struct.pack(">BBI", frame_type, flags, stream_id)


def grpc_message(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; ``length`` overrides (lies about) the prefix."""
    size = len(payload) if length is None else length
    return struct.pack(">?I", compressed, size) + payload


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of ``data``, and the bytes left after them."""
    frames: list[Frame] = []
    view = memoryview(data)
    while len(view) >= 9:
        header, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        header.parse_body(view[9 : 9 + length])
        frames.append(header)
        view = view[9 + length :]
    return frames, bytes(view)


@dataclass
class Received:
    """What a :class:`RawSocket` has read so far, and whether the server closed it."""

    data: bytes
    closed: bool  # the server closed the connection (end of file or reset)

    @property
    def frames(self) -> list[Frame]:
        return parse_frames(self.data)[0]

    def frame_types(self) -> list[str]:
        return [type(f).__name__ for f in self.frames]

    def settings_acked(self) -> bool:
        """Whether the server acknowledged a SETTINGS frame of ours."""
        return any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in self.frames)

    def goaway(self) -> GoAwayFrame | None:
        """The GOAWAY the server sent, if it sent one."""
        found = [f for f in self.frames if isinstance(f, GoAwayFrame)]
        assert len(found) <= 1, f"more than one GOAWAY: {found}"
        return found[0] if found else None

    def ping_acked(self, opaque: bytes) -> bool:
        """Whether the server acknowledged the PING that carried ``opaque``."""
        return any(
            isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == opaque
            for f in self.frames
        )


class RawSocket:
    """A TCP connection that sends bytes as given and reads whatever comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.data = b""  # everything received so far
        self.closed = False

    @classmethod
    async def connect(cls, port: int, host: str = HOST) -> RawSocket:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        return cls(reader, writer)

    async def __aenter__(self) -> RawSocket:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(self, data: bytes, *, eof: bool = False) -> None:
        """Send ``data``; with ``eof``, then half-close (the server reads end of file).

        A server that has already closed the connection is not an error here: what
        it did shows in the next :meth:`read`.
        """
        with contextlib.suppress(ConnectionError):
            self.writer.write(data)
            if eof and self.writer.can_write_eof():
                self.writer.write_eof()
            await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def read(
        self, until: Callable[[Received], bool] | None = None, timeout: float = TIMEOUT
    ) -> Received:
        """Read until the server closes, ``until`` holds, or ``timeout`` passes.

        Returns everything received on this connection so far; a timeout is not an
        error here (``closed`` then says False).
        """

        def now() -> Received:
            return Received(self.data, self.closed)

        try:
            async with asyncio.timeout(timeout):
                while not self.closed and not (until is not None and until(now())):
                    try:
                        chunk = await self.reader.read(_READ_SIZE)
                    except ConnectionError:  # reset by the server: closed too
                        chunk = b""
                    self.data += chunk
                    self.closed = not chunk
        except TimeoutError:
            pass
        return now()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass
class Reply:
    """Everything the server sent on one stream, as an HTTP/2 client sees it."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False  # END_STREAM arrived
    reset: int | None = None  # RST_STREAM error code, if the stream was reset
    goaway: int | None = None  # GOAWAY error code, if the connection was ended
    disconnected: bool = False  # the connection closed under the stream

    def _header(self, name: str) -> str | None:
        # A trailers-only response carries grpc-status in its headers.
        for key, value in (*self.trailers, *self.headers):
            if key == name:
                return value
        return None

    @property
    def http_status(self) -> int | None:
        value = self._header(":status")
        return None if value is None else int(value)

    @property
    def grpc_status(self) -> int | None:
        value = self._header("grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str | None:
        value = self._header("grpc-message")
        return None if value is None else urllib.parse.unquote(value)

    @property
    def messages(self) -> list[bytes]:
        """The gRPC messages in the DATA received (all of them must be whole)."""
        out = []
        rest = self.data
        while rest:
            compressed, size = struct.unpack(">?I", rest[:5])
            assert not compressed, "the server compressed a message"
            assert len(rest) >= 5 + size, f"message of {size} bytes cut short: {rest!r}"
            out.append(rest[5 : 5 + size])
            rest = rest[5 + size :]
        return out


class H2Client:
    """An HTTP/2 client connection over which tests send requests byte by byte.

    Methods that queue frames (``open_stream``, ``send_data``, ``ping`` ...) do not
    write; :meth:`flush` does, and every reading method flushes first.
    """

    def __init__(self, sock: RawSocket) -> None:
        self.sock = sock
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.replies: dict[int, Reply] = {}
        self.pings_acked = 0
        self.goaway: ConnectionTerminated | None = None  # the first GOAWAY's
        self.goaways: list[GoAwayFrame] = []  # every GOAWAY, in order
        self._goaways: list[ConnectionTerminated] = []  # of this read, not yet taken
        self._partial = b""  # a frame not yet whole
        self.closed = False  # end of file or reset from the server

    @classmethod
    async def connect(cls, port: int, host: str = HOST) -> H2Client:
        client = cls(await RawSocket.connect(port, host))
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def __aenter__(self) -> H2Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.sock.close()

    def open_stream(
        self,
        path: str = ACCUMULATE,
        *,
        content_type: str | None = "application/grpc",
        extra: Iterable[tuple[str, str]] = (),
        end_stream: bool = False,
    ) -> int:
        """Queue the request HEADERS of a new stream; return its id.

        ``content_type`` None leaves the header out; ``extra`` adds headers.
        """
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path)]
        headers += [(":authority", HOST), ("te", "trailers")]
        if content_type is not None:
            headers.append(("content-type", content_type))
        headers += extra
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.replies[stream_id] = Reply()
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` (any bytes: gRPC framing is up to the caller) on a stream."""
        self.conn.send_data(stream_id, data, end_stream=end_stream)

    def reset(self, stream_id: int, error_code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(stream_id, error_code)

    def ping(self, n: int) -> bytes:
        """Queue a PING carrying ``n``."""
        opaque = struct.pack(">Q", n)
        self.conn.ping(opaque)
        return opaque

    async def flush(self) -> None:
        if data := self.conn.data_to_send():
            await self.sock.send(data)

    async def receive(self, timeout: float = TIMEOUT) -> list[Event]:
        """Flush, then read once (up to ``timeout``) and take in what arrived.

        Returns the h2 events; TimeoutError if nothing arrived in time.
        """
        await self.flush()
        if self.closed:
            return []
        try:
            data = await asyncio.wait_for(self.sock.reader.read(_READ_SIZE), timeout)
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            for reply in self.replies.values():
                if not reply.ended and reply.reset is None:
                    reply.disconnected = True
            return []
        events = self.conn.receive_data(self._without_goaways(data))
        events = self._goaways + events
        self._goaways = []
        for event in events:
            self._take(event)
        return events

    def _without_goaways(self, data: bytes) -> bytes:
        """``data`` less its GOAWAY frames, each noted as h2's event for it: h2 4.4
        refuses every frame after a GOAWAY it received (h2 #1181), and a draining
        server sends two and then the frames of the streams in flight. Frames cut
        short wait for the next read."""
        buffer = self._partial + data
        kept = bytearray()
        view = memoryview(buffer)
        while len(view) >= 9:
            length = int.from_bytes(view[:3], "big")
            if len(view) < 9 + length:
                break
            if view[3] == GOAWAY:
                goaway = GoAwayFrame(0)
                goaway.parse_body(view[9 : 9 + length])
                event = ConnectionTerminated()
                event.error_code = ErrorCodes(goaway.error_code)
                event.last_stream_id = goaway.last_stream_id
                event.additional_data = goaway.additional_data or None
                self._goaways.append(event)
                self.goaways.append(goaway)
            else:
                kept += view[: 9 + length]
            view = view[9 + length :]
        self._partial = bytes(view)
        return bytes(kept)

    def _take(self, event: Event) -> None:
        if isinstance(event, ConnectionTerminated):
            if self.goaway is None:
                self.goaway = event
            for reply in self.replies.values():
                reply.goaway = int(event.error_code or 0)
        elif isinstance(event, PingAckReceived):
            self.pings_acked += 1
        elif isinstance(event, (ResponseReceived, TrailersReceived)):
            reply = self._reply(event.stream_id)
            headers = [(_text(k), _text(v)) for k, v in event.headers]
            if isinstance(event, ResponseReceived):
                reply.headers = headers
            else:
                reply.trailers = headers
        elif isinstance(event, DataReceived):
            self._reply(event.stream_id).data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            self._reply(event.stream_id).ended = True
        elif isinstance(event, StreamReset):
            self._reply(event.stream_id).reset = int(event.error_code)

    def _reply(self, stream_id: int) -> Reply:
        return self.replies.setdefault(stream_id, Reply())

    async def read_until(self, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Flush, then read until ``done()`` holds or the connection ends.

        Raises TimeoutError when neither happens within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not done() and not self.closed:
                await self.receive(timeout)

    async def reply(self, stream_id: int, timeout: float = TIMEOUT) -> Reply:
        """Read until the stream ends, is reset, or the connection ends or goes away."""
        reply = self.replies[stream_id]
        await self.read_until(
            lambda: reply.ended or reply.reset is not None or self.goaway is not None, timeout
        )
        return reply

    async def until_pings_acked(self, count: int, timeout: float = TIMEOUT) -> None:
        """Read until ``count`` PING ACKs in all have arrived, or the connection ends."""
        await self.read_until(lambda: self.pings_acked >= count or self.goaway is not None, timeout)

    async def call(
        self,
        *payloads: bytes,
        path: str = ACCUMULATE,
        content_type: str | None = "application/grpc",
        extra: Iterable[tuple[str, str]] = (),
        framed: bool = False,
        timeout: float = TIMEOUT,
    ) -> Reply:
        """One whole stream: headers, each payload as one DATA frame, END_STREAM.

        Payloads are wrapped as gRPC messages unless ``framed`` (sent as given).
        """
        stream_id = self.open_stream(path, content_type=content_type, extra=extra)
        for payload in payloads:
            self.send_data(stream_id, payload if framed else grpc_message(payload))
        self.conn.end_stream(stream_id)
        return await self.reply(stream_id, timeout)
