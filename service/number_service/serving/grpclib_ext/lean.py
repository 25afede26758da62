"""Lean HTTP/2 streams: grpclib's per-stream objects without what an idle stream never uses.

grpclib's ``protocol.Stream`` makes three ``asyncio.Event``s up front (window
updated, headers received, trailers received: the last two only a client ever
waits on) and its ``Buffer`` an ``asyncio.Queue`` (three deques and an Event) plus
a deque; each deque allocates its first block at once, ~760 B: ~6 KB of an idle
stream's ~16.5 KB (``python -m benchmarks.memory``). Here:

- :class:`LeanBuffer` is grpclib's ``Buffer`` (same methods, same behaviour) holding
  the received chunks in a list and one future made only while someone waits;
- :class:`LeanStream` is grpclib's ``Stream`` whose Events are made on first use,
  and which waits for flow-control window on a future of its own: a WINDOW_UPDATE
  for the connection wakes the streams waiting for window, not every stream of the
  connection (grpclib sets every stream's Event);
- :class:`LeanWrapper` is grpclib's ``Wrapper`` with the tasks inside it in a tuple
  (a stream's holds one task; grpclib's set is 216 B), using its private ``_error``;
- :func:`install` has a connection's grpclib ``EventsProcessor`` make its streams
  as :class:`LeanStream` (and wake them as above), and makes its h2 connection a
  :class:`LeanH2Connection`:
  h2's, without the ``repr(frame)`` it builds for every frame received, for a trace
  log that is off (~4% of a busy stream's server time; a DataFrame's repr
  hex-encodes its payload), and whose ``send_data`` writes a plain DATA frame
  (no padding, no END_STREAM, on a stream and connection that may send it) as its
  nine header bytes and the payload: h2's goes through both state machines (a
  no-op for such a frame), a ``DataFrame`` and its flag set, and three debug-log
  calls, 5.8 us a frame against 0.8 us; and whose ``receive_data`` reads plain
  DATA frames itself (no flags, on a stream that may receive them, within the
  windows, no content-length) as h2 would, without a ``Frame``, its flag set, the
  frame buffer and both state machines (8.4 against 4.4 us a frame with its
  acknowledgement, timeit); the rest, and everything after it, h2 reads.

Each is a change that could go into grpclib as it is (the same classes, made
lazily). Private grpclib attributes used, standing in for a missing hook (grpclib
has none for the stream class its server makes; no upstream issue yet): the
``EventsProcessor.processors`` table (its RequestReceived, WindowUpdated and
RemoteSettingsChanged entries replaced: grpclib's own, but for the stream class and
whom they wake), grpclib
``Connection._connection`` / ``_transport`` (what grpclib's ``create_stream`` passes
to a new stream), and ``Stream``'s own attributes, which the subclass sets as
grpclib's ``__init__`` does. From h2: the h2 connection's class is changed in place
(grpclib makes the ``H2Connection`` itself, with no hook for its class) and
``_receive_frame`` is overridden (h2 issue: none yet; the fix upstream is to call
``repr`` only when the logger traces), and ``send_data`` appends to h2's private
``_data_to_send`` as h2's ``_prepare_for_sending`` does (h2 issue: none yet; the fix
upstream is the same shortcut in h2's ``send_data``); ``receive_data`` reads h2's
private frame buffer (``incoming_buffer._preamble_len``, ``_data``,
``_headers_buffer``: that it holds nothing), its flow-control window managers and a
stream's ``_expected_content_length`` / ``_actual_content_length``, and updates them
as h2's ``_receive_data_frame`` does (h2 issue: none yet; upstream, the same shortcut
would sit in the frame buffer and ``_receive_data_frame``).
"""

from __future__ import annotations

import asyncio
import struct
from types import TracebackType
from typing import Any, Protocol

from grpclib.protocol import (
    AckedData,
    Buffer,
    Connection,
    EventsProcessor,
    Stream,
    UnackedData,
)
from grpclib.utils import Wrapper
from h2.config import DummyLogger
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, Event, RemoteSettingsChanged, RequestReceived, WindowUpdated
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from h2.settings import SettingCodes
from h2.stream import StreamState
from hyperframe.frame import Frame, RstStreamFrame

from .floods import DATA, HEADER_SIZE

__all__ = ["LeanBuffer", "LeanH2Connection", "LeanStream", "LeanWrapper", "install"]


class Acker(Protocol):
    """What gives a stream's flow-control credit back: grpclib's ``Connection``."""

    def ack(self, stream_id: int, size: int) -> None: ...


class LeanBuffer(Buffer):
    """grpclib's ``Buffer``: the received DATA of one stream, with its flow-control
    credit, read in order; no Queue: a list, and a future only while a reader waits."""

    def __init__(self, connection: Acker, stream_id: int) -> None:
        """Credit goes back as ``connection.ack(stream_id, size)`` (grpclib's Buffer takes
        ``partial(connection.ack, stream_id)``: a partial and a bound method per stream)."""
        # Not Buffer.__init__: it makes the Queue and the deque this class does without.
        self._connection = connection
        self._stream_id = stream_id
        self._eof = False
        self._chunks: list[UnackedData] = []  # received, not yet read
        self._waiter: asyncio.Future[None] | None = None  # made by a reader that waits
        self._read: list[AckedData] | None = None  # read() only: taken, acked, not returned
        self._acked_size = 0

    def add(self, data: bytes, ack_size: int) -> None:
        self._chunks.append(UnackedData(data, len(data), ack_size))
        self._wake()

    def eof(self) -> None:
        self._chunks.append(UnackedData(b"", 0, 0))
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def ended(self) -> bool:
        """The stream's end has arrived (chunks before it may still wait here)."""
        return self._eof

    def ack(self, size: int) -> None:
        """Give ``size`` bytes of flow-control credit back to the client."""
        self._connection.ack(self._stream_id, size)

    def take(self) -> list[UnackedData]:
        """Every chunk received and not yet taken, at once (no wait, no credit given)."""
        chunks = self._chunks
        if chunks:
            self._chunks = []
        return chunks

    async def wait(self) -> None:
        """Return once a chunk (or the end) has arrived that is not yet taken."""
        if self._chunks:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def read(self, size: int) -> bytes:
        """grpclib's ``Buffer.read``: ``size`` bytes, crediting each chunk as it is taken;
        b'' at the end of the stream."""
        assert size >= 0, "Size can not be negative"
        if size == 0:
            return b""
        read = self._read
        if read is None:
            read = self._read = []
        if not self._eof or self._chunks:
            while self._acked_size < size:
                await self.wait()
                data, data_size, ack_size = self._chunks.pop(0)
                if not ack_size:
                    break
                read.append(AckedData(memoryview(data), data_size))
                self._acked_size += data_size
                self.ack(ack_size)
        if self._eof and self._acked_size == 0:
            return b""
        if self._acked_size < size:
            raise AssertionError("Received less data than expected")
        chunks = []
        chunks_size = 0
        while chunks_size < size:
            next_chunk, next_chunk_size = read[0]
            if chunks_size + next_chunk_size <= size:
                chunks.append(next_chunk)
                chunks_size += next_chunk_size
                read.pop(0)
            else:
                offset = size - chunks_size
                chunks.append(next_chunk[:offset])
                chunks_size += offset
                read[0] = AckedData(next_chunk[offset:], next_chunk_size - offset)
        self._acked_size -= size
        return b"".join(chunks)

    def unacked_size(self) -> int:
        """The credit of every chunk not yet read; those chunks are dropped (as grpclib's)."""
        chunks = self.take()
        return sum(chunk.ack_size for chunk in chunks)


class LeanWrapper(Wrapper):
    """grpclib's ``Wrapper`` (``cancel(error)`` cancels every task inside it, which then
    raises ``error``), holding those tasks in a tuple: a stream's wrapper holds one,
    its handler's, and grpclib's empty ``set`` alone is 216 B per open stream. No
    ``start()``: the handler arms the deadline itself (``handler._expire``). It keeps
    grpclib's private ``_error`` (the error to raise), as grpclib's own methods do."""

    def __init__(self) -> None:
        # Not Wrapper.__init__: its set.
        self._inside: tuple[asyncio.Task[Any], ...] = ()

    def __enter__(self) -> None:
        if self._error is not None:
            raise self._error
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Called not inside a task")
        self._inside = (*self._inside, task)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        task = asyncio.current_task()
        assert task
        inside = list(self._inside)
        if task in inside:
            inside.remove(task)
        self._inside = tuple(inside)
        if self._error is not None:
            self.cancel_failed = exc_type is not asyncio.CancelledError
            raise self._error

    def cancel(self, error: Exception) -> None:
        self._error = error
        for task in self._inside:
            task.cancel()
        self.cancelled = True


class LeanStream(Stream):
    """grpclib's ``protocol.Stream``, its Events made on first use, its buffer lean."""

    def __init__(
        self,
        connection: Connection,
        h2_connection: H2Connection,
        transport: asyncio.Transport,
        *,
        stream_id: int | None = None,
        wrapper: Wrapper | None = None,
        waiting: set[LeanStream],
    ) -> None:
        # Not Stream.__init__: it makes the three Events up front.
        self._waiting = waiting  # its connection's streams waiting for window
        self._window_waiter: asyncio.Future[None] | None = None
        self.connection = connection
        self._h2_connection = h2_connection
        self._transport = transport
        self.wrapper = wrapper
        self.headers = None
        self.trailers = None
        self._events: dict[str, asyncio.Event] | None = None
        if stream_id is not None:
            self.init_stream(stream_id, connection)

    def init_stream(self, stream_id: int, connection: Connection) -> None:
        super().init_stream(stream_id, connection)
        self.buffer = LeanBuffer(connection, stream_id)

    def _event(self, name: str) -> asyncio.Event:
        events = self._events
        if events is None:
            events = self._events = {}
        event = events.get(name)
        if event is None:
            event = events[name] = asyncio.Event()
        return event

    # grpclib's Stream attributes, as properties: the Event is made when first used.
    @property
    def window_updated(self) -> asyncio.Event:  # type: ignore[override]
        return self._event("window_updated")

    @property
    def headers_received(self) -> asyncio.Event:  # type: ignore[override]
        return self._event("headers_received")

    @property
    def trailers_received(self) -> asyncio.Event:  # type: ignore[override]
        return self._event("trailers_received")

    def window_opened(self) -> None:
        """A WINDOW_UPDATE (or SETTINGS) may have given this stream window: wake its send."""
        waiter = self._window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._events is not None and "window_updated" in self._events:
            self._events["window_updated"].set()

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        """grpclib's ``Stream.send_data``: in chunks of at most the window and the frame
        size, waiting for window when there is none; the whole at once (no BytesIO,
        no copy) when it fits, and a wait that only window for this stream ends."""
        assert self.id is not None
        h2 = self._h2_connection
        connection = self.connection
        pos, end = 0, len(data)
        while True:
            write_ready = connection.write_ready
            if not write_ready.is_set():
                await write_ready.wait()
            window = h2.local_flow_control_window(self.id)
            if not window > 0:  # it can become negative
                await self._wait_for_window()
                continue  # others may have used the window meanwhile: from the start
            size = min(window, h2.max_outbound_frame_size, end - pos)
            chunk = data if size == end else data[pos : pos + size]
            pos += size
            last = pos == end
            h2.send_data(self.id, chunk, end_stream=end_stream and last)
            self._transport.write(h2.data_to_send())
            self.data_sent += size
            connection.data_sent += size
            connection.data_send_process()
            if last:
                return

    async def _wait_for_window(self) -> None:
        waiter = self._window_waiter = asyncio.get_running_loop().create_future()
        self._waiting.add(self)
        try:
            await waiter
        finally:
            self._window_waiter = None
            self._waiting.discard(self)


#: A DATA frame's header: length (24 bits, as 16 + 8), type 0, flags, stream id.
_DATA_HEADER = struct.Struct(">HBBBL")
#: Where a connection, and a stream, may send (receive) DATA with both state machines
#: unmoved.
_CONNECTION_OPEN = frozenset({ConnectionState.SERVER_OPEN, ConnectionState.CLIENT_OPEN})
_STREAM_SENDS = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_STREAM_RECEIVES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
_BYTES = frozenset({bytes, bytearray})  # what the shortcuts take: len() counts bytes


class LeanH2Connection(H2Connection):
    """h2's connection, formatting no frame for a trace log that is off, and sending
    and reading plain DATA frames without h2's per-frame objects."""

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: Any = None,
    ) -> None:
        """h2's ``send_data``, the same bytes and windows after it; h2's own for
        anything but a plain frame of bytes (or a bytearray) that fits (so its errors
        are h2's)."""
        stream = self.streams.get(stream_id)
        size = len(data)
        if (
            type(data) not in _BYTES
            or end_stream
            or pad_length is not None
            or stream is None
            or not 0 < size <= self.max_outbound_frame_size
            or size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
            or self.state_machine.state not in _CONNECTION_OPEN
            or stream.state_machine.state not in _STREAM_SENDS
            or type(self.config.logger) is not DummyLogger
        ):
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        out = self._data_to_send
        out += _DATA_HEADER.pack(size >> 8, size & 0xFF, 0, 0, stream_id)
        out += data
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size

    def receive_data(self, data: Any) -> list[Event]:
        """h2's ``receive_data``; plain DATA frames (no flags, on a stream that may
        receive them, within both windows, no content-length to check) read here as
        h2 reads them, without a ``Frame``, its flag set and both state machines:
        the same events, windows and stream state. Anything else, and every frame
        after it, is h2's own (its errors too), as is data that is not bytes or a
        bytearray (a memoryview may count items of more than a byte)."""
        buffer = self.incoming_buffer
        if (
            type(data) not in _BYTES
            or buffer._preamble_len
            or buffer._data
            or buffer._headers_buffer
            or self.state_machine.state not in _CONNECTION_OPEN
            or type(self.config.logger) is not DummyLogger
        ):
            return super().receive_data(data)
        if type(data) is bytearray:  # held by the caller, who may change it
            data = bytes(data)
        end = len(data)
        pos = 0
        events: list[Event] = []
        window = self._inbound_flow_control_window_manager
        streams = self.streams
        while end - pos >= HEADER_SIZE:
            length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            if data[pos + 3] != DATA or data[pos + 4] or length > end - pos - HEADER_SIZE:
                break
            stream = streams.get(int.from_bytes(data[pos + 5 : pos + 9]) & 0x7FFFFFFF)
            if (
                stream is None
                or length > self.max_inbound_frame_size
                or length > window.current_window_size
                or length > stream._inbound_window_manager.current_window_size
                or stream._expected_content_length is not None
                or stream.state_machine.state not in _STREAM_RECEIVES
                or not stream.state_machine.headers_received
            ):
                break
            start = pos + HEADER_SIZE
            pos = start + length
            window.window_consumed(length)
            stream._inbound_window_manager.window_consumed(length)
            stream._actual_content_length += length
            events.append(
                DataReceived(
                    stream_id=stream.stream_id,
                    data=data[start:pos],
                    flow_controlled_length=length,
                )
            )
        if pos < end:
            events.extend(super().receive_data(data[pos:]))
        return events

    def _receive_frame(self, frame: Frame) -> list[Event]:
        # h2 4.4.1's H2Connection._receive_frame, but for its first line,
        # self.config.logger.trace("Received frame: %s", repr(frame)), whose repr
        # runs even when the logger is h2's no-op DummyLogger.
        if type(self.config.logger) is not DummyLogger:  # someone traces: h2's own
            return super()._receive_frame(frame)
        events: list[Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


def install(processor: EventsProcessor) -> None:
    """Have grpclib's ``processor`` make each new stream a :class:`LeanStream`, and its
    h2 connection a :class:`LeanH2Connection`."""
    connection = processor.connection
    waiting: set[LeanStream] = set()  # streams of this connection waiting for window
    h2 = connection._connection
    if type(h2) is H2Connection:  # the same object, h2's state kept: only the class
        h2.__class__ = LeanH2Connection

    def process_request_received(event: RequestReceived) -> None:
        # grpclib's EventsProcessor.process_request_received, with our stream class.
        assert event.stream_id is not None
        stream = LeanStream(
            connection,
            connection._connection,
            connection._transport,
            stream_id=event.stream_id,
            waiting=waiting,
        )
        release_stream = processor.register(stream)
        processor.handler.accept(stream, event.headers, release_stream)  # type: ignore[arg-type]

    def wake_waiting() -> None:
        for stream in list(waiting):
            stream.window_opened()

    def process_window_updated(event: WindowUpdated) -> None:
        # grpclib's sets every stream's window_updated Event for the connection's.
        if event.stream_id == 0:
            wake_waiting()
            return
        stream = processor.streams.get(event.stream_id)
        if isinstance(stream, LeanStream):
            stream.window_opened()
        elif stream is not None:
            stream.window_updated.set()

    def process_remote_settings_changed(event: RemoteSettingsChanged) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            wake_waiting()

    processors = processor.processors
    processors[RequestReceived] = process_request_received
    processors[WindowUpdated] = process_window_updated
    processors[RemoteSettingsChanged] = process_remote_settings_changed
