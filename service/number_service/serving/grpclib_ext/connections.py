"""One protocol per connection: grpclib's H2Protocol with what a server needs around it.

:class:`Connection` is what the ext :class:`~.server.Server` makes for every accepted
connection. On top of grpclib's own protocol it

- coalesces the connection's writes, one socket send per loop turn (:mod:`.coalesce`);
- refuses a connection over ``max_connections``: the server's SETTINGS, a GOAWAY
  (NO_ERROR, no stream processed, the reason) and the close;
- advertises ``max_concurrent_streams`` in SETTINGS_MAX_CONCURRENT_STREAMS and answers
  a stream over it with RST_STREAM(REFUSED_STREAM), as RFC 9113 section 5.1.2 asks,
  where h2 would end the whole connection;
- closes a connection that has had no stream for ``idle_timeout`` seconds, with a GOAWAY;
- is in its server's :class:`Connections`, so that the server's ``close()`` closes
  every connection once what it holds is written (grpclib leaves them to the clients).

Private attributes used here, with what each stands in for:

- grpclib's ``Connection._connection``, the h2 connection under grpclib's: there is no
  public accessor, and the settings, the stream refusal and the idle GOAWAY are h2's.
- h2's ``H2Connection._frame_dispatch_table`` (its HEADERS handler, wrapped) and
  ``_closed_streams``: h2 4 raises TooManyStreamsError, a connection error, for a
  stream over the limit, and has no hook to refuse just that stream (no upstream
  issue found; RFC 9113 5.1.2 allows either, gRPC clients expect REFUSED_STREAM).
- grpclib's ``EventsProcessor.register``, wrapped per connection: grpclib has no event
  for a stream's start and end on a connection, which the idle timeout needs (grpclib
  has no idle timeout: grpc's MaxConnectionIdle has no grpclib equivalent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from grpclib.config import Configuration
from grpclib.protocol import AbstractHandler, H2Protocol
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes
from h2.stream import StreamClosedBy
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from .coalesce import CoalescingTransport

log = logging.getLogger(__name__)

CLOSE_WAIT = 1.0  # seconds a connection closed at shutdown gets to write what it holds


class ConnectionLimits:
    """What one server's connections may be; None: no limit."""

    __slots__ = ("idle_timeout", "max_concurrent_streams", "max_connections")

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_concurrent_streams: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.max_connections = max_connections  # open at once
        self.max_concurrent_streams = max_concurrent_streams  # None: h2's default (100)
        self.idle_timeout = idle_timeout  # seconds without a stream before the close


class Connections:
    """The open connections of one server, their counts, and their close."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0  # connections admitted and not yet closed
        self.refused = 0  # connections refused at the cap, in all
        self.idle_closed = 0  # connections closed by the idle timeout, in all
        self.closing = False  # close() was called: connections made from now on are refused
        self.live: set[Connection] = set()  # every connection made and not yet lost
        self._refused_in_burst = 0  # refused since the cap was last reached

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

    def close(self) -> None:
        """Close every connection once what it holds is written, and refuse any made
        from now on (a TLS handshake that ends later, say).

        From Python 3.12.1 asyncio's ``Server.wait_closed()`` waits for every
        connection to end (cpython issue #104344), and grpclib's ``Server.close()``
        only cancels the handlers (grpclib issue #107): a client that keeps its
        connection open would hold a shutdown forever.
        """
        self.closing = True
        for connection in list(self.live):
            connection.close()

    async def wait_closed(self, timeout: float = CLOSE_WAIT) -> None:
        """After :meth:`close`: wait up to ``timeout`` s for every connection to end,
        then abort those left (their peer does not read what they hold)."""
        live = list(self.live)
        lost = [connection.lost for connection in live if connection.lost is not None]
        if lost:
            await asyncio.wait(lost, timeout=timeout)
        for connection in live:
            connection.abort()


class Connection(H2Protocol):
    """One connection: grpclib's H2Protocol with the limits of its :class:`Connections`."""

    def __init__(
        self,
        handler: AbstractHandler,
        config: Configuration,
        h2_config: H2Configuration,
        connections: Connections,
    ) -> None:
        super().__init__(handler, config, h2_config)
        self._connections = connections
        self._transport: asyncio.BaseTransport | None = None  # the socket's, not coalescing
        self._admitted = False  # False: refused, or not yet made
        self._idle: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] | None = None  # done once the connection is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.lost = asyncio.get_running_loop().create_future()
        connections = self._connections
        connections.live.add(self)
        limits = connections.limits
        if connections.closing:  # made after close(): a TLS handshake just done
            self._refuse("server is shutting down; try again later")
            return
        if not connections.admit():
            self._refuse(
                f"too many connections (--max-connections {limits.max_connections}); "
                "try again later"
            )
            return
        self._admitted = True
        # A stream transport, though not always an asyncio.Transport subclass
        # (uvloop's is not): only its methods are used.
        super().connection_made(CoalescingTransport(cast(asyncio.Transport, transport)))
        h2 = _h2(self)
        wanted = limits.max_concurrent_streams
        if wanted is not None and wanted != h2.local_settings.max_concurrent_streams:
            # h2 sent its default (100) in the first SETTINGS; this sends a second.
            # h2 enforces the new value once the client has acknowledged it.
            h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: wanted})
            self.connection.flush()
        _refuse_streams_over_limit(h2)
        if limits.idle_timeout is not None:
            self._watch_idle()

    def _refuse(self, reason: str) -> None:
        self.handler.close()  # no stream will come: the server may forget the handler
        assert self._transport is not None
        refuse(self._transport, reason)

    # --- idle timeout ------------------------------------------------------------------

    def _watch_idle(self) -> None:
        processor = self.processor
        register = processor.register

        def watched_register(stream: Any) -> Callable[[], None]:
            release = register(stream)
            self._stop_idle()

            def watched_release() -> None:
                release()
                if not processor.streams:
                    self._start_idle()

            return watched_release

        # EventsProcessor.register is what grpclib calls for each new stream; its
        # release_stream, when the stream's handler is done.
        processor.register = watched_register  # type: ignore[method-assign]
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
        transport = self._transport
        if not self._admitted or transport is None or transport.is_closing():
            return
        if self.processor.streams:  # a stream began in the meantime
            return
        timeout = self._connections.limits.idle_timeout
        log.debug("closing a connection idle for %g s (--idle-timeout)", timeout)
        self._connections.idle_closed += 1
        try:
            _h2(self).close_connection(
                ErrorCodes.NO_ERROR, f"idle for {timeout:g} s (--idle-timeout)".encode()
            )
            self.connection.flush()
        except ProtocolError:  # the connection is already closed for h2
            pass
        # Through grpclib's connection, not the raw transport: its transport may hold
        # the GOAWAY back (coalesce.py) and sends it before it closes.
        self.connection.close()

    # --- the close at shutdown ----------------------------------------------------------

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
        if self._admitted:
            # Through grpclib's connection: it stops the keepalive, and its transport
            # may hold writes back (coalesce.py), which it sends before it closes.
            self.connection.close()
        else:
            transport.close()

    def abort(self) -> None:
        """Drop the connection at once, whatever it still holds."""
        if self._transport is not None:
            # A stream transport, though not always an asyncio one (see above).
            cast(asyncio.WriteTransport, self._transport).abort()

    # --- asyncio's calls: grpclib's protocol only for an admitted connection ------------

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            super().data_received(data)

    def pause_writing(self) -> None:
        if self._admitted:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_idle()
        if self._admitted:
            self._admitted = False
            self._connections.open -= 1
            super().connection_lost(exc)
        self._transport = None
        self._connections.live.discard(self)
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


def refuse(transport: asyncio.BaseTransport, reason: str) -> None:
    """Tell a client to go away (no stream was processed) because of ``reason``, then
    close. Public h2 API only: a fresh h2 connection writes SETTINGS and the GOAWAY."""
    h2 = H2Connection(H2Configuration(client_side=False))
    h2.initiate_connection()
    h2.close_connection(ErrorCodes.NO_ERROR, reason.encode(), last_stream_id=0)
    assert isinstance(transport, asyncio.WriteTransport)
    transport.write(h2.data_to_send())
    transport.close()
