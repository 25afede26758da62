"""Client-side workarounds: what a grpclib client call knows but does not say publicly,
and connections that outlive a GOAWAY.

Private attributes used here, with what each stands in for:

- ``grpclib.client.Stream._maybe_raise()``: the status in trailers the server sent
  before it reset the stream. grpclib then raises "Stream reset by remote party" from
  ``send_message``, ``recv_message`` and ``recv_trailing_metadata`` alike, though the
  trailers were received; grpclib #75 fixed this for ``recv_initial_metadata`` only,
  and its own ``Stream.__aexit__`` reads such trailers with this method.
- ``grpclib.client.Stream._stream`` (grpclib's protocol stream: its ``connection``
  and ``_h2_connection``): whether the call's connection got a GOAWAY. grpclib says
  "Connection lost" even then, if the close that follows the GOAWAY is read before the
  call's task runs (its second reason overwrites the first), and has no public way to
  ask.
- :class:`Channel`, grpclib's ``Channel`` with its ``_protocol_factory()`` overridden
  and its ``_protocol``, ``_connected``, ``_config``, ``_h2_config`` and ``_authority``
  used: grpclib has no hook for the protocol of its connections, no public "is it
  connected", and no ``:authority`` apart from the host it connects to (a name
  resolved to an address here). Its protocol (:class:`_Protocol`) keeps a connection
  that received a GOAWAY for the streams the GOAWAY let through, where grpclib's
  ``EventsProcessor.process_connection_terminated`` fails every stream still open
  (grpclib has no graceful GOAWAY: the server side of grpclib #148 has none either),
  and h2 4.4 moves the connection to CLOSED on receiving a GOAWAY, after which it
  refuses every frame, those of the streams in flight too (h2 #1181, the same state
  machine on the receiving side): the protocol replaces the GOAWAY entry of h2's
  ``H2Connection._frame_dispatch_table`` (h2 has no other hook) and reads
  ``grpclib.protocol.Connection._connection`` for it (no public accessor). It
  overrides ``EventsProcessor.register``, ``close``, ``process_connection_terminated``
  and ``process_stream_reset`` (to tell a refused stream apart: grpclib's reason for a
  reset carries the error code only as text), and sets the client ``Handler``'s
  ``connection_lost`` so that the Channel opens a new connection for new calls.

With releases other than :data:`~.WRITTEN_FOR`, each function gives what plain
grpclib tells (no status, no GOAWAY), :func:`make_channel` makes grpclib's own
Channel (a GOAWAY fails every stream of its connection, as in grpclib), and
:func:`connected` cannot tell.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
import weakref
from collections.abc import Callable
from typing import Any

from grpclib.client import Channel as GrpclibChannel
from grpclib.client import Handler, Stream
from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import AbstractHandler, EventsProcessor, H2Protocol
from grpclib.protocol import Connection as GrpclibConnection
from grpclib.protocol import Stream as ProtocolStream
from h2.config import H2Configuration
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, StreamEnded, StreamReset
from hyperframe.frame import Frame, GoAwayFrame

from . import mismatch

#: The reasons a stream the server never processed ends with: a gRPC client tries
#: it again on another connection ("transparent retry").
REFUSED = "the server refused the stream before processing it (REFUSED_STREAM)"
ABOVE_GOAWAY = "the server's GOAWAY refused the stream before processing it"
# Plain grpclib's reason for the same reset, which names the code as a number.
_PLAIN_REFUSED = f"Stream reset by remote party, error_code: {ErrorCodes.REFUSED_STREAM}"
_MAX_STREAM_ID = 2**31 - 1

# Connections that received a GOAWAY, for goaway_received().
_goaways: weakref.WeakSet[GrpclibConnection] = weakref.WeakSet()


def servers_status(call: Stream[Any, Any]) -> GRPCError | None:
    """The non-OK status in trailers the server sent on ``call``, if any came.

    A server ends a stream the client still sends on with trailers and then
    RST_STREAM (gRPC's HTTP/2 protocol); grpclib reports the reset, not the status.
    """
    if mismatch() is not None or getattr(call, "_stream", None) is None:
        return None  # no stream was made: nothing came
    try:
        call._maybe_raise()
    except GRPCError as err:
        return err
    return None


def goaway_received(call: Stream[Any, Any] | None) -> bool:
    """Whether the connection of ``call`` got a GOAWAY: one of :class:`Channel`'s
    says so; on grpclib's own, h2 is CLOSED only after a GOAWAY, sent or received,
    and a grpclib client never sends one."""
    if call is None or mismatch() is not None:
        return False
    stream = getattr(call, "_stream", None)
    if getattr(stream, "connection", None) in _goaways:
        return True
    h2 = getattr(stream, "_h2_connection", None)
    return h2 is not None and h2.state_machine.state is ConnectionState.CLOSED


def refused(err: BaseException) -> bool:
    """Whether ``err`` ended a stream that the server says it never processed
    (RST_STREAM with REFUSED_STREAM, or above the last stream id of its GOAWAY): safe
    to send again from the start, on another connection."""
    return isinstance(err, StreamTerminatedError) and str(err) in (
        REFUSED,
        ABOVE_GOAWAY,
        _PLAIN_REFUSED,
    )


def make_channel(
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | None = None,
    codec: CodecBase | None = None,
    config: Configuration | None = None,
    authority: str | None = None,
) -> GrpclibChannel:
    """A grpclib Channel to ``host:port`` whose connections outlive a GOAWAY
    (:class:`Channel`), or, with other grpclib or h2 releases, grpclib's own.
    ``authority``: the ``:authority`` of its calls, if not ``host:port`` (the name
    that ``host`` was resolved from)."""
    if mismatch() is not None:
        return GrpclibChannel(host, port, ssl=ssl, codec=codec, config=config)
    return Channel(host, port, ssl=ssl, codec=codec, config=config, authority=authority)


def connected(channel: GrpclibChannel) -> bool | None:
    """Whether ``channel`` has a connection that takes new calls now (connected,
    and no GOAWAY); None for a Channel that is not one of :func:`make_channel`'s."""
    if not isinstance(channel, Channel):
        return None
    return bool(channel._connected)


def retire(channel: GrpclibChannel) -> None:
    """Let the connection ``channel`` has now take no new calls: its streams carry on,
    it closes after the last, and the next call opens a new connection. For a
    channel that is not one of :func:`make_channel`'s, nothing happens."""
    if isinstance(channel, Channel):
        channel.retire()


class Channel(GrpclibChannel):
    """grpclib's Channel, whose connections take no new calls after a GOAWAY (or
    :meth:`retire`) but carry their streams to the end, then close; a new
    connection takes the new calls. Streams the server refused end with
    :data:`REFUSED` or :data:`ABOVE_GOAWAY` (see :func:`refused`)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        codec: CodecBase | None = None,
        config: Configuration | None = None,
        authority: str | None = None,
    ) -> None:
        super().__init__(host, port, ssl=ssl, codec=codec, config=config)
        if authority is not None:
            self._authority = authority
        self._retired: set[_Protocol] = set()  # connections left to finish their streams

    def _protocol_factory(self) -> H2Protocol:
        return _Protocol(Handler(), self._config, self._h2_config, self._retired)

    def retire(self) -> None:
        """The current connection takes no new calls (see :func:`retire`)."""
        protocol = self._protocol
        if isinstance(protocol, _Protocol) and self._connected:
            protocol.retire()

    def close(self) -> None:
        """Close every connection: the current one and those still finishing."""
        for protocol in list(self._retired):
            protocol.processor.close()
        self._retired.clear()
        super().close()


class _Protocol(H2Protocol):
    """grpclib's client protocol with a GOAWAY that lets the streams below its last
    stream id finish (see :class:`_Processor`)."""

    processor: _Processor

    def __init__(
        self,
        handler: AbstractHandler,
        config: Configuration,
        h2_config: H2Configuration,
        retired: set[_Protocol],
    ) -> None:
        super().__init__(handler, config, h2_config)
        self.retired_in = retired

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.processor = _Processor(self.handler, self.connection, self)
        h2 = self.connection._connection
        h2._frame_dispatch_table[GoAwayFrame] = _receive_goaway

    def retire(self) -> None:
        self.processor.retire()


def _receive_goaway(frame: GoAwayFrame) -> tuple[list[Frame], list[ConnectionTerminated]]:
    """h2's handling of a received GOAWAY without its move to CLOSED and without
    dropping what is queued to send: the event only."""
    event = ConnectionTerminated()
    try:
        event.error_code = ErrorCodes(frame.error_code)
    except ValueError:  # an extension's code
        event.error_code = frame.error_code
    event.last_stream_id = frame.last_stream_id
    event.additional_data = frame.additional_data or None
    return [], [event]


class _Processor(EventsProcessor):
    """grpclib's events processor, with a GOAWAY that refuses only the streams above
    its last stream id and leaves the others to finish; the connection closes after
    the last of them. Each stream keeps the first reason it was ended with."""

    def __init__(
        self, handler: AbstractHandler, connection: GrpclibConnection, protocol: _Protocol
    ) -> None:
        super().__init__(handler, connection)
        self._protocol = protocol
        self.retired = False
        self.last_stream_id = _MAX_STREAM_ID  # the lowest of the GOAWAYs received
        self._ended: set[int] = set()  # streams ended here, whose reason must stand
        self._complete: set[int] = set()  # streams whose response ended (END_STREAM)
        self._closed = False

    def register(self, stream: ProtocolStream) -> Callable[[], None]:
        release = super().register(stream)
        stream_id = stream.id
        assert stream_id is not None
        if stream_id > self.last_stream_id:  # opened as the GOAWAY came in
            # From the protocol's turn, as every event comes: ending the stream from
            # inside its own call would leave that task a stray cancellation.
            asyncio.get_running_loop().call_soon(self._end, stream, ABOVE_GOAWAY)

        def release_stream() -> None:
            release()
            self._ended.discard(stream_id)
            self._complete.discard(stream_id)
            if self.retired and not self.streams:
                self.close("the connection was retired and its last stream ended")

        return release_stream

    def retire(self) -> None:
        """No new calls: grpclib's Channel connects anew when the connection of its
        last call is ``connection_lost``; this one closes after its last stream."""
        if self.retired or self._closed:
            return
        self.retired = True
        self.handler.close()  # sets connection_lost, and does nothing else
        self._protocol.retired_in.add(self._protocol)
        if not self.streams:
            self.close("the connection was retired with no stream open")

    def process_connection_terminated(self, event: ConnectionTerminated) -> None:
        _goaways.add(self.connection)
        last = _MAX_STREAM_ID if event.last_stream_id is None else event.last_stream_id
        self.last_stream_id = min(self.last_stream_id, last)
        for stream_id, stream in list(self.streams.items()):
            if stream_id > self.last_stream_id:
                self._end(stream, ABOVE_GOAWAY)
        self.retire()

    def process_stream_ended(self, event: StreamEnded) -> None:
        self._complete.add(event.stream_id)
        super().process_stream_ended(event)

    def process_stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        complete = event.stream_id in self._complete
        self._complete.discard(event.stream_id)
        if stream is not None and complete and event.error_code == ErrorCodes.NO_ERROR:
            # The response is whole: the server only asks the client to stop sending
            # (RFC 9113 8.1), and what it sent stays readable. A send now fails.
            self.connection.streams_failed += 1
            return
        if stream is not None:
            if not event.remote_reset:
                reason = "Protocol error"
            elif event.error_code == ErrorCodes.REFUSED_STREAM:
                reason = REFUSED
            else:  # grpclib's own words
                reason = f"Stream reset by remote party, error_code: {event.error_code}"
            self._end(stream, reason)
            self.handler.cancel(stream)
        self.connection.streams_failed += 1

    def close(self, reason: str = "Connection closed") -> None:
        if self._closed:
            return
        self._closed = True
        self._protocol.retired_in.discard(self._protocol)
        self.connection.close()
        self.handler.close()
        for stream in list(self.streams.values()):
            self._end(stream, reason)
        if hasattr(self, "processors"):  # grpclib's: drop the cycle through bound methods
            del self.processors

    def _end(self, stream: ProtocolStream, reason: str) -> None:
        stream_id = stream.id
        if stream_id is None or stream_id in self._ended or stream_id not in self.streams:
            return
        self._ended.add(stream_id)
        stream.__terminated__(reason)
