"""A NumberService written on raw h2, whose streams and connections a test cuts at
exactly chosen points: for the client's resume, refusal and GOAWAY handling.

:class:`ScriptedServer` answers AccumulateNumbers as the real service does (one sum
per number, OK when the client half-closes), and records every stream: the numbers
it received and the sums it sent. Before it answers a number (and when a stream
opens, as number 0) it asks ``plan(stream, count)``, which may return a :class:`Cut`:

- ``Cut.status(code, message)``: trailers with that status (after the sums sent),
  then RST_STREAM(NO_ERROR) if the client has not half-closed, as gRPC servers do;
- ``Cut.refuse()``: RST_STREAM(REFUSED_STREAM), the stream never processed;
- ``Cut.lose()``: the TCP connection aborted, no word said;
- ``Cut.hold()``: the number is read but not answered (nor any after it): what is
  "in flight" when a later cut comes, with :meth:`ScriptedServer.cut_held`.

:meth:`ScriptedServer.goaway` drains a connection as grpc-go's GracefulStop does: a
GOAWAY with last-stream-id 2^31-1 and a PING, then, once the PING is answered, a
GOAWAY with the real last stream id; streams above it are refused. The GOAWAY frames
are written raw: h2 4.4 moves a connection to CLOSED when it sends one (h2 #1181).

Everything listens on 127.0.0.1 only; every wait of a test on it has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from grpclib.const import Status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError
from hyperframe.frame import GoAwayFrame

from number_service_gen.tutorial import NumberRequest, NumberResponse

HOST = "127.0.0.1"
MAX_STREAM_ID = 2**31 - 1
_PING = b"drainnow"


@dataclass(frozen=True)
class Cut:
    """What the server does to a stream instead of answering (see the module doc)."""

    how: str  # "status", "refuse", "lose", "hold"
    status: Status = Status.UNAVAILABLE
    message: str = ""

    @classmethod
    def with_status(cls, status: Status, message: str) -> Cut:
        return cls("status", status, message)

    @classmethod
    def refuse(cls) -> Cut:
        return cls("refuse")

    @classmethod
    def lose(cls) -> Cut:
        return cls("lose")

    @classmethod
    def hold(cls) -> Cut:
        return cls("hold")


@dataclass
class Record:
    """One stream as the server saw it."""

    connection: int  # which connection (0, 1 ...) of this server
    stream_id: int
    received: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    end: str = "open"  # "ok", "status", "refused", "lost", "reset by client"
    held: bool = False  # its answers are held back (Cut.hold)


Plan = Callable[[Record, int], Cut | None]


class ScriptedServer:
    """A NumberService on raw h2 whose streams are cut as ``plan`` says."""

    def __init__(self, plan: Plan | None = None, *, host: str = HOST, port: int = 0) -> None:
        self.plan: Plan = plan or (lambda record, count: None)
        self.host = host
        self._port = port
        self.streams: list[Record] = []
        self.connections: list[_Connection] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, self.host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop_listening()
        for connection in self.connections:
            connection.abort()

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    def _connection(self) -> _Connection:
        connection = _Connection(self, len(self.connections))
        self.connections.append(connection)
        return connection

    def open_streams(self) -> list[Record]:
        return [record for record in self.streams if record.end == "open"]

    async def goaway(self, connection: int = -1, last_stream_id: int | None = None) -> None:
        """Drain one connection (the latest by default) as GracefulStop does; returns
        once the second GOAWAY, with the real last stream id, is out. With
        ``last_stream_id``: one GOAWAY with that id, at once."""
        if last_stream_id is None:
            await self.connections[connection].drain()
        else:
            self.connections[connection].goaway(last_stream_id)

    def cut_held(self, cut: Cut) -> None:
        """Cut every stream whose answers are held, now."""
        for connection in self.connections:
            for stream_id, record in list(connection.records.items()):
                if record.held and record.end == "open":
                    connection.cut(stream_id, record, cut)


class _Connection(asyncio.Protocol):
    def __init__(self, server: ScriptedServer, index: int) -> None:
        self.server = server
        self.index = index
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.records: dict[int, Record] = {}
        self.buffers: dict[int, bytes] = {}
        self.answered_headers: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.last_stream_id: int | None = None  # once drained: streams above are refused
        self.closed = asyncio.Event()
        self._pinged: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for record in self.records.values():
            if record.end == "open":
                record.end = "lost"
        self.closed.set()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.abort()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._opened(event.stream_id)
            elif isinstance(event, DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._data(event.stream_id, event.data)
            elif isinstance(event, StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, StreamReset):
                record = self.records.get(event.stream_id)
                if record is not None and record.end == "open":
                    record.end = "reset by client"
            elif isinstance(event, PingAckReceived) and event.ping_data == _PING:
                if self._pinged is not None and not self._pinged.done():
                    self._pinged.set_result(None)
            elif isinstance(event, ConnectionTerminated):
                self.abort()
        self._flush()

    def _opened(self, stream_id: int) -> None:
        record = Record(self.index, stream_id)
        self.records[stream_id] = record
        self.server.streams.append(record)
        self.buffers[stream_id] = b""
        if self.last_stream_id is not None and stream_id > self.last_stream_id:
            self.cut(stream_id, record, Cut.refuse())
            return
        self._maybe_cut(stream_id, record, 0)

    def _data(self, stream_id: int, data: bytes) -> None:
        record = self.records.get(stream_id)
        if record is None or record.end != "open":
            return
        buffer = self.buffers[stream_id] + data
        while len(buffer) >= 5:
            (size,) = struct.unpack(">I", buffer[1:5])
            if len(buffer) < 5 + size:
                break
            message, buffer = buffer[5 : 5 + size], buffer[5 + size :]
            num = NumberRequest.parse(message).num or 0
            record.received.append(num)
            if record.held or self._maybe_cut(stream_id, record, len(record.received)):
                continue
            self._answer(stream_id, record, sum(record.received))
        self.buffers[stream_id] = buffer

    def _maybe_cut(self, stream_id: int, record: Record, count: int) -> bool:
        cut = self.server.plan(record, count)
        if cut is None:
            return False
        if cut.how == "hold":
            record.held = True
        else:
            self.cut(stream_id, record, cut)
        return True

    def _answer(self, stream_id: int, record: Record, total: int) -> None:
        self._headers(stream_id)
        payload = bytes(NumberResponse(sum=total))
        self.h2.send_data(stream_id, struct.pack(">?I", False, len(payload)) + payload)
        record.sent.append(total)

    def _headers(self, stream_id: int) -> None:
        if stream_id not in self.answered_headers:
            self.answered_headers.add(stream_id)
            self.h2.send_headers(
                stream_id, [(":status", "200"), ("content-type", "application/grpc")]
            )

    def _ended(self, stream_id: int) -> None:
        record = self.records.get(stream_id)
        if record is None or record.end != "open" or record.held:
            return
        record.end = "ok"
        self._headers(stream_id)
        self.h2.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)

    def cut(self, stream_id: int, record: Record, cut: Cut) -> None:
        """End a stream as ``cut`` says (see the module doc)."""
        if cut.how == "lose":
            record.end = "lost"
            self.abort()
            return
        if cut.how == "refuse":
            record.end = "refused"
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        else:
            record.end = "status"
            trailers = [("grpc-status", str(cut.status.value))]
            trailers.append(("grpc-message", quote(cut.message, safe=" ")))
            if stream_id not in self.answered_headers:  # trailers-only
                self.answered_headers.add(stream_id)
                trailers = [(":status", "200"), ("content-type", "application/grpc"), *trailers]
            self.h2.send_headers(stream_id, trailers, end_stream=True)
            stream = self.h2.streams.get(stream_id)
            if stream is not None and not stream.closed:  # the client still sends
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        self._flush()

    async def drain(self) -> None:
        """GOAWAY(2^31-1) and a PING; once it is answered, GOAWAY(last stream id)."""
        self._goaway(MAX_STREAM_ID)
        self._pinged = asyncio.get_running_loop().create_future()
        self.h2.ping(_PING)
        self._flush()
        await asyncio.wait_for(self._pinged, 5)
        self.last_stream_id = max(self.records, default=0)
        self._goaway(self.last_stream_id)

    def goaway(self, last_stream_id: int) -> None:
        """One GOAWAY with ``last_stream_id``; streams above it are refused from now."""
        self.last_stream_id = last_stream_id
        self._goaway(last_stream_id)

    def _goaway(self, last_stream_id: int) -> None:
        assert self.transport is not None
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())

    def _flush(self) -> None:
        if self.transport is not None and (data := self.h2.data_to_send()):
            with contextlib.suppress(RuntimeError):
                self.transport.write(data)
