"""Resource limits of a server: what they are by default, and what enforces them.

:class:`Limits` holds every limit with its default. Two pieces enforce them on a
grpclib :class:`~grpclib.server.Server` (grpclib 0.4.9 has no knob for any of them
except keepalive, whose options are experimental and underscore-named):

- every stream (``grpclib_ext.BatchingStream``) answers a request message over
  ``max_message_size`` with RESOURCE_EXHAUSTED as soon as its 5-byte gRPC length
  prefix arrives, so the body is never decoded; and ends a stream that sends no
  request for ``stream_idle_timeout`` seconds;
- :class:`Connections` wraps every accepted connection: it refuses connections
  over ``max_connections`` with a GOAWAY, advertises ``max_concurrent_streams`` in
  the server's HTTP/2 SETTINGS (a stream over it gets RST_STREAM REFUSED_STREAM),
  and closes a connection that has had no stream for ``idle_timeout`` seconds,
  also with a GOAWAY. It also closes every connection when the server shuts down
  (:meth:`Connections.close`), which grpclib leaves to the clients.

Keepalive pings (and closing a peer that does not answer them) are grpclib's own,
configured by :meth:`Limits.grpclib_config`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from grpclib.config import Configuration
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes
from h2.stream import StreamClosedBy
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from .grpclib_ext import StreamLimits

log = logging.getLogger("number_service.limits")

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # gRPC's default maximum received message
DEFAULT_MAX_CONCURRENT_STREAMS = 100  # h2's and grpclib's until now; gRPC core's too
DEFAULT_MAX_CONNECTIONS = 1000  # below the usual `ulimit -n` of 1024
DEFAULT_KEEPALIVE_TIME = 300.0  # seconds between pings on each connection
DEFAULT_KEEPALIVE_TIMEOUT = 20.0  # seconds for a ping's answer; gRPC's default
DEFAULT_IDLE_TIMEOUT = None  # off, as gRPC's MaxConnectionIdle: see Limits.idle_timeout
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS client has to finish its handshake
CLOSE_WAIT = 1.0  # seconds a connection closed at shutdown gets to write what it holds


@dataclass(frozen=True)
class Limits:
    """Every resource limit of a server; None turns an optional one off."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # bytes of one request message
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS  # per connection
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS  # open at once, per process
    keepalive_time: float | None = DEFAULT_KEEPALIVE_TIME  # seconds between pings
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT  # close if the ping's ACK is late
    # Close a connection without streams after this long. Off by default: a grpclib
    # client (ours too) fails a call that races with that close, where grpcio and
    # grpc-go retry it; keepalive reaps dead and silent peers anyway.
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    stream_idle_timeout: float | None = None  # end a stream with no request for this long
    # Under TLS: close a connection whose TLS handshake is not done after this long
    # (asyncio's ssl_handshake_timeout). Such a connection is not yet counted by
    # max_connections nor seen by keepalive: both start once the handshake is done.
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 (there is no off)")
        if not 1 <= self.max_concurrent_streams <= 2**31 - 1:
            raise ValueError("max_concurrent_streams must be 1 to 2147483647")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1 (None: no cap)")
        for name in (
            "keepalive_time",
            "keepalive_timeout",
            "idle_timeout",
            "stream_idle_timeout",
            "tls_handshake_timeout",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (None: off)")

    def stream_limits(self) -> StreamLimits:
        """The limits every stream enforces itself."""
        return StreamLimits(
            max_message_size=self.max_message_size, idle_timeout=self.stream_idle_timeout
        )

    def grpclib_config(self) -> Configuration:
        """grpclib's Configuration with our keepalive: ping every ``keepalive_time``
        seconds, with or without streams, and close a connection whose peer does
        not answer within ``keepalive_timeout``.

        grpclib's other defaults would stop pinging after two pings without data
        sent, and leave 300 s between pings; either would let a dead peer of a
        silent stream go unnoticed, so both are lifted.
        """
        if self.keepalive_time is None:
            # grpclib's server default would ping every 2 h; off means off.
            return Configuration(_keepalive_time=None)
        return Configuration(
            _keepalive_time=self.keepalive_time,
            _keepalive_timeout=self.keepalive_timeout,
            _keepalive_permit_without_calls=True,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=self.keepalive_time,
        )


# --- connections ------------------------------------------------------------------------


class Connections:
    """The open connections of one server: the cap, the streams setting, idle reaping.

    Attach before the server starts. grpclib has no public way to see or shape a
    connection, so the server's ``_protocol_factory`` (what asyncio calls for every
    accepted connection) is wrapped: each connection gets a :class:`_Guarded`
    protocol around grpclib's own.
    """

    def __init__(self, server: Server, limits: Limits) -> None:
        self.limits = limits
        self.open = 0  # connections admitted and not yet closed
        self.refused = 0  # connections refused at the cap, in all
        self.idle_closed = 0  # connections closed by the idle timeout, in all
        self._refused_in_burst = 0  # refused since the cap was last reached
        self.closing = False  # close() was called: connections made from now on are refused
        self._live: set[_Guarded] = set()  # every connection made and not yet lost
        factory: Callable[[], H2Protocol] = server._protocol_factory
        setattr(server, "_protocol_factory", lambda: _Guarded(self, factory))  # noqa: B010

    def admit(self) -> bool:
        """Count a new connection in; False when the cap is reached (refuse it).

        Logs one warning when refusing starts and one info line when a connection
        is admitted again, not one line per refused connection.
        """
        cap = self.limits.max_connections
        if cap is not None and self.open >= cap:
            if not self._refused_in_burst:
                log.warning(
                    "connection cap reached: %d open (--max-connections %d); "
                    "refusing new connections until some close",
                    self.open,
                    cap,
                )
            self._refused_in_burst += 1
            self.refused += 1
            return False
        if self._refused_in_burst:
            log.info(
                "accepting connections again; refused %d at the cap (--max-connections %s)",
                self._refused_in_burst,
                cap,
            )
            self._refused_in_burst = 0
        self.open += 1
        return True

    async def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Close every connection, and any made from now on; return once all are gone.

        From Python 3.12.1 asyncio's ``Server.wait_closed()`` waits for every
        connection to end (cpython issue #104344), and grpclib's ``Server.close()``
        only cancels the handlers (grpclib issue #107): a client that keeps its
        connection open would hold a shutdown forever. Call this after the streams
        are done or cancelled. Each connection is closed once what it holds is
        written (the trailers of streams a drain ended go out first); one whose
        peer does not read is aborted after ``timeout`` seconds.
        """
        self.closing = True
        live = list(self._live)
        for connection in live:
            connection.close()
        lost = [connection.lost for connection in live if connection.lost is not None]
        if lost:
            await asyncio.wait(lost, timeout=timeout)
        for connection in live:
            connection.abort()  # those still open: the peer stopped reading


class _Guarded(asyncio.Protocol):
    """One connection: grpclib's H2Protocol inside, with our limits around it."""

    def __init__(self, connections: Connections, factory: Callable[[], H2Protocol]) -> None:
        self._connections = connections
        self._factory = factory
        self._inner: H2Protocol | None = None  # None: refused, or not yet made
        self._transport: asyncio.BaseTransport | None = None
        self._idle: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] | None = None  # done once the connection is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.lost = asyncio.get_running_loop().create_future()
        self._connections._live.add(self)
        limits = self._connections.limits
        if self._connections.closing:  # made after close(): a TLS handshake just done
            _refuse(transport, "server is shutting down; try again later")
            return
        if not self._connections.admit():
            _refuse(
                transport,
                f"too many connections (--max-connections {limits.max_connections}); "
                "try again later",
            )
            return
        inner = self._inner = self._factory()
        inner.connection_made(transport)
        if limits.max_concurrent_streams != DEFAULT_MAX_CONCURRENT_STREAMS:
            # h2 sent its default (100) in the first SETTINGS; this sends a second.
            # h2 enforces the new value once the client has acknowledged it.
            h2 = _h2(inner)
            h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams})
            inner.connection.flush()
        _refuse_streams_over_limit(_h2(inner))
        if limits.idle_timeout is not None:
            register = inner.processor.register

            def watched_register(stream: Any) -> Callable[[], None]:
                release = register(stream)
                self._stop_idle()

                def watched_release() -> None:
                    release()
                    if not inner.processor.streams:
                        self._start_idle()

                return watched_release

            # EventsProcessor.register is what grpclib calls for each new stream; its
            # release_stream, when the stream's handler is done.
            inner.processor.register = watched_register  # type: ignore[method-assign]
            self._start_idle()

    def _start_idle(self) -> None:
        timeout = self._connections.limits.idle_timeout
        if timeout is None or self._transport is None or self._transport.is_closing():
            return
        self._stop_idle()
        self._idle = asyncio.get_running_loop().call_later(timeout, self._close_idle)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _close_idle(self) -> None:
        self._idle = None
        inner, transport = self._inner, self._transport
        if inner is None or transport is None or transport.is_closing():
            return
        if inner.processor.streams:  # a stream began in the meantime
            return
        timeout = self._connections.limits.idle_timeout
        log.debug("closing a connection idle for %g s (--idle-timeout)", timeout)
        self._connections.idle_closed += 1
        h2 = _h2(inner)
        try:
            h2.close_connection(
                ErrorCodes.NO_ERROR, f"idle for {timeout:g} s (--idle-timeout)".encode()
            )
            inner.connection.flush()
        except ProtocolError:  # the connection is already closed for h2
            pass
        # Through grpclib's connection, not the raw transport: its transport may hold
        # the GOAWAY back (coalesce.py) and sends it before it closes.
        inner.connection.close()

    def close(self) -> None:
        """Close the connection once what it holds is written (see Connections.close).

        No GOAWAY: a grpclib client fails every stream still open on its side when
        it reads one, and a draining GOAWAY is a change of its own. This close is
        what the end of the process used to do, FIN after everything written.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._stop_idle()
        if self._inner is None:
            transport.close()
        else:
            # Through grpclib's connection: it stops the keepalive, and its transport
            # may hold writes back (coalesce.py), which it sends before it closes.
            self._inner.connection.close()

    def abort(self) -> None:
        """Drop the connection at once, whatever it still holds."""
        if self._transport is not None:
            # A stream transport, though not always an asyncio one (see coalesce.py).
            cast(asyncio.WriteTransport, self._transport).abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport, as grpclib's H2Protocol does

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_idle()
        if self._inner is not None:
            self._connections.open -= 1
            self._inner.connection_lost(exc)
            self._inner = None
        self._transport = None
        self._connections._live.discard(self)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)


def _h2(protocol: H2Protocol) -> H2Connection:
    """The h2 connection under grpclib's; it keeps it in the private ``_connection``."""
    h2: H2Connection = protocol.connection._connection
    return h2


def _refuse_streams_over_limit(h2: H2Connection) -> None:
    """Answer a stream opened over SETTINGS_MAX_CONCURRENT_STREAMS with RST_STREAM
    REFUSED_STREAM, as RFC 9113 section 5.1.2 requires, and let the others carry on.

    h2 4 instead raises TooManyStreamsError, a connection error, and grpclib then
    drops the whole connection with every stream on it. h2 has no public hook for
    this, so its HEADERS handler in the private ``_frame_dispatch_table`` is
    wrapped. The refused stream is then closed-by-reset for h2: later frames on it
    get RST_STREAM and their flow-control credit back, as for any reset stream.
    """
    table = h2._frame_dispatch_table
    receive_headers = table[HeadersFrame]

    def refusing(frame: HeadersFrame) -> tuple[list[Frame], list[Any]]:
        try:
            handled: tuple[list[Frame], list[Any]] = receive_headers(frame)
            return handled
        except TooManyStreamsError:
            h2.decoder.decode(frame.data)  # keep HPACK state in step with the client
            stream_id = frame.stream_id
            h2.highest_inbound_stream_id = max(h2.highest_inbound_stream_id, stream_id)
            h2._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM
            reset = RstStreamFrame(stream_id)
            reset.error_code = ErrorCodes.REFUSED_STREAM
            return [reset], []

    table[HeadersFrame] = refusing


def _refuse(transport: asyncio.BaseTransport, reason: str) -> None:
    """Tell a client to go away (no stream was processed) because of ``reason``, then close."""
    h2 = H2Connection(H2Configuration(client_side=False))
    h2.initiate_connection()
    h2.close_connection(ErrorCodes.NO_ERROR, reason.encode(), last_stream_id=0)
    assert isinstance(transport, asyncio.WriteTransport)
    transport.write(h2.data_to_send())
    transport.close()
