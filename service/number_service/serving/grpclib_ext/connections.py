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
- defends against HTTP/2 floods (:mod:`.floods` does the accounting, sans I/O): hands
  h2 at most ``frames_per_turn`` frames per event-loop turn (reading paused for the
  rest), and closes a connection that breaks a flood limit with a GOAWAY
  (ENHANCE_YOUR_CALM, or the protocol error) and one warning naming the peer and
  the limit; a connection error h2 finds (bad HPACK, a bad frame) gets h2's GOAWAY
  and an info line, where grpclib would drop it unsaid;
- after a flood cut, refuses new connections from the same address for a while
  (:mod:`.cooldown`), first of all and before any HTTP/2 set-up, with a GOAWAY
  ENHANCE_YOUR_CALM saying so;
- refuses request headers h2 cannot decode as ASCII with RST_STREAM(PROTOCOL_ERROR)
  (a stream error, where h2's UnicodeDecodeError escaped as a "Fatal error"
  traceback), gives an HPACK decoding error its COMPRESSION_ERROR (RFC 9113 4.3),
  ignores frames of unknown types (RFC 9113 5.5; grpclib dropped the connection),
  and queues no empty DATA frame (grpclib queued every one, ~100 B each);
- hands grpclib no request that the client reset within the same slice (Rapid
  Reset: grpclib would build its stream, buffers and task only to cancel them);
- drains as grpc-go's GracefulStop does (:meth:`Connection.drain`, for the server's
  shutdown): GOAWAY with last-stream-id 2^31-1 and a PING, then, on the PING's ACK
  (or after ``DRAIN_PING_TIMEOUT``), GOAWAY with the real last stream id; streams
  after it get RST_STREAM(REFUSED_STREAM), which gRPC clients retry elsewhere; the
  connection closes, lingering, after its last stream. A client's own GOAWAY ends
  none of its streams in flight;
- closes after a GOAWAY of its own by lingering: FIN once it is written, what the
  client still sends read and dropped, an abort after ``CLOSE_WAIT`` (closing with
  unread bytes would send a TCP RST, which can destroy the GOAWAY unread);
- gives the C heap's free memory back (glibc's malloc_trim, at most once a second)
  after a connection that moved over ``TRIM_AFTER`` bytes closes;
- is in its server's :class:`Connections`, so that the server's ``close()`` closes
  every connection once what it holds is written (grpclib leaves them to the clients).

Private attributes used here, with what each stands in for:

- grpclib's ``Connection._connection``, the h2 connection under grpclib's: there is no
  public accessor, and the settings, the stream refusal and the idle GOAWAY are h2's.
- h2's ``H2Connection._frame_dispatch_table`` (its HEADERS handler, wrapped) and
  ``_closed_streams``: h2 4 raises TooManyStreamsError, a connection error, for a
  stream over the limit, and has no hook to refuse just that stream (no upstream
  issue found; RFC 9113 5.1.2 allows either, gRPC clients expect REFUSED_STREAM);
  the same wrapper turns h2's UnicodeDecodeError (it decodes headers with grpclib's
  ``header_encoding='ascii'``) into a stream reset and HPACK errors into
  COMPRESSION_ERROR. ``_closed_streams`` is also made smaller: h2 keeps how each of
  the last 65,536 streams closed (~100 B each) for every connection.
- grpclib's ``EventsProcessor.processors`` (its event dispatch, which has no entry
  for h2's UnknownFrameReceived, and queues empty DATA) and ``H2Protocol``'s
  ``connection.feed`` / ``processor`` (its ``data_received``, done here in slices):
  grpclib has no flood defence nor any hook for what it is fed (no upstream issue).
- h2's ``_frame_dispatch_table`` again, for PING (the drain's ACK must be seen in h2's
  frame loop, between the HEADERS frames read with it: no hook in h2 or grpclib) and
  GOAWAY (h2 4.4 moves to CLOSED on a GOAWAY it receives and refuses every frame
  after it, h2 #1181; grpclib's ``process_connection_terminated`` ends every stream).
  The drain's own GOAWAYs are written raw for the same h2 issue. grpclib has no
  graceful close (grpclib issues #107, #148). grpclib's ``Connection.
  stream_close_waiter`` (no underscore, undocumented) tells when a stream ends.
- grpclib's ``EventsProcessor.register``, wrapped per connection: grpclib has no event
  for a stream's start and end on a connection, which the idle timeout needs (grpclib
  has no idle timeout: grpc's MaxConnectionIdle has no grpclib equivalent).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
from collections.abc import Callable
from typing import Any, cast

from grpclib.config import Configuration
from grpclib.protocol import AbstractHandler, H2Protocol
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    PingAckReceived,
    RequestReceived,
    StreamReset,
    UnknownFrameReceived,
)
from h2.exceptions import DenialOfServiceError, ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes
from h2.stream import StreamClosedBy
from h2.utilities import SizeLimitDict
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from ..settings import flag
from . import lean
from .coalesce import CoalescingTransport
from .cooldown import Cooldown, address_key
from .floods import FloodLimits, FrameAccounting, Verdict
from .handler import Handler

log = logging.getLogger(__name__)

CLOSE_WAIT = 1.0  # seconds a connection closed at shutdown gets to write what it holds
#: Seconds a draining connection waits for the answer to its PING before it sends the
#: second GOAWAY anyway (grpc-go waits 5 s; a peer that answers at all does so in one
#: round trip, and the grace period runs meanwhile).
DRAIN_PING_TIMEOUT = 1.0
DRAIN_PING = b"drain\x00\x00\x00"  # the opaque data of the drain's PING (8 bytes)
DRAIN_REASON = "server is shutting down"  # the drain's GOAWAY debug data
MAX_STREAM_ID = 2**31 - 1  # the first GOAWAY's last-stream-id: every stream may still come
#: How many closed streams h2 remembers per connection (how each closed: a late frame on
#: a stream reset is answered RST_STREAM, on one ended, a connection error). h2 keeps
#: 65,536; a gRPC client sends frames on a stream only until it sees its end, so the
#: last few hundred are the ones that matter.
CLOSED_STREAMS_KEPT = 1024
#: Connections refused (during a cool-down, at the connection cap, after close()) that
#: are held open at once, at most, each until its client closes or CLOSE_WAIT passes
#: (so that it reads why); more are dropped at once, so that an attacker connecting
#: in parallel cannot fill the fds.
REFUSED_HELD = 64


class ConnectionLimits:
    """What one server's connections may be; None: no limit."""

    __slots__ = (
        "cooldown",
        "floods",
        "idle_timeout",
        "max_concurrent_streams",
        "max_connections",
    )

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_concurrent_streams: int | None = None,
        idle_timeout: float | None = None,
        floods: FloodLimits | None = None,
        cooldown: float | None = None,
    ) -> None:
        self.max_connections = max_connections  # open at once
        self.max_concurrent_streams = max_concurrent_streams  # None: h2's default (100)
        self.idle_timeout = idle_timeout  # seconds without a stream before the close
        self.floods = FloodLimits() if floods is None else floods  # what frames may be
        self.cooldown = cooldown  # seconds an address that flooded is refused, at first


class Connections:
    """The open connections of one server, their counts, and their close."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0  # connections admitted and not yet closed
        self.refused = 0  # connections refused at the cap, in all
        self.idle_closed = 0  # connections closed by the idle timeout, in all
        self.cut = 0  # connections closed for breaking a flood limit, in all
        self.cooled = 0  # connections refused while their address cooled down, in all
        self.held = 0  # refused connections held open now (REFUSED_HELD at most)
        #: The addresses whose connections were cut for a flood (see cooldown.py).
        self.cooldown = Cooldown(limits.cooldown)
        self.closing = False  # close() was called: connections made from now on are refused
        self.draining = False  # drain() was called: connections made from now on drain
        self.drain_timeout = DRAIN_PING_TIMEOUT  # drain()'s, for those made later
        self._drains: list[asyncio.Future[None]] = []  # each connection's, once draining
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
                    "connection cap reached: %d open (%s %d); "
                    "refusing new connections until some close",
                    self.open,
                    flag("max_connections"),
                    cap,
                )
            self._refused_in_burst += 1
            self.refused += 1
            return False
        if self._refused_in_burst:
            log.info(
                "accepting connections again; refused %d at the cap (%s %s)",
                self._refused_in_burst,
                flag("max_connections"),
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

    def begin_drain(self, timeout: float = DRAIN_PING_TIMEOUT) -> None:
        """The first half of :meth:`drain`, at once: every connection (and each made
        from now on) gets its first GOAWAY and PING; nothing is waited for."""
        self.draining = True
        self.drain_timeout = timeout
        for connection in list(self.live):
            connection.drain(timeout)

    async def drain(self, timeout: float = DRAIN_PING_TIMEOUT) -> None:
        """Begin the graceful close of every connection (:meth:`Connection.drain`);
        return once each has sent its second GOAWAY, the one with its real last stream
        id (its PING answered, or ``timeout`` s passed), those made meanwhile too.

        A connection made from now on drains at once: asyncio makes a connection's
        protocol a turn or more after it accepts it (a TLS one after its handshake),
        so one accepted just before the listening socket closed may come now, its
        request already sent. Refusing it would close it unread (a TCP reset) and
        fail that request."""
        self.begin_drain(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + CLOSE_WAIT  # each connection has its timer
        while (pending := [f for f in self._drains if not f.done()]) and (
            left := deadline - loop.time()
        ) > 0:
            await asyncio.wait(pending, timeout=left)
        self._drains = [f for f in self._drains if not f.done()]

    def handler_tasks(self) -> list[asyncio.Task[Any]]:
        """The stream handlers' tasks of every connection that are not done, started
        or not (:meth:`.handler.Handler.open_tasks`)."""
        return [
            task
            for connection in self.live
            if isinstance(connection.handler, Handler)
            for task in connection.handler.open_tasks()
        ]

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
        self._held_open = False  # refused (_turn_away), and held open until the client closes
        self._idle: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] | None = None  # done once the connection is gone
        self._accounting: FrameAccounting | None = None
        self._inbound = bytearray()  # received, not yet handed to h2 (whole frames later)
        self._paused = False  # reading paused while frames wait for a later turn
        self._turn: asyncio.Handle | None = None  # the next turn's slice
        self._done = False  # closed by us for a flood or a protocol error
        self._abort_later: asyncio.TimerHandle | None = None
        self._coalescing: CoalescingTransport | None = None  # the transport grpclib writes to
        self._drain: asyncio.Future[None] | None = None  # drain(): done at the second GOAWAY
        self._drain_timer: asyncio.TimerHandle | None = None  # the PING's answer, or else
        self._drain_last: int | None = None  # the second GOAWAY's last stream id, once sent
        self._drain_close: asyncio.Task[None] | None = None  # closes after the last stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        connections = self._connections
        connections.live.add(self)
        limits = connections.limits
        cooldown = connections.cooldown
        if len(cooldown):  # some address is cooling down, perhaps this one
            address = address_key(transport.get_extra_info("peername"))
            left = cooldown.remaining(address, loop.time())
            if left:  # first of all: before any HTTP/2 set-up, which is what it would cost
                self._cool_off(left)
                return
        if connections.closing:  # made after close(): a TLS handshake just done
            self._refuse("server is shutting down; try again later")
            return
        if not connections.admit():
            self._refuse(
                f"too many connections ({flag('max_connections')} {limits.max_connections}); "
                "try again later"
            )
            return
        self._admitted = True
        # A stream transport, though not always an asyncio.Transport subclass
        # (uvloop's is not): only its methods are used.
        self._accounting = FrameAccounting(limits.floods)
        coalescing = CoalescingTransport(cast(asyncio.Transport, transport), watch=self._sent)
        self._coalescing = coalescing
        super().connection_made(coalescing)
        h2 = _h2(self)
        self._accounting.max_frame_size = h2.max_inbound_frame_size
        h2._closed_streams = SizeLimitDict(size_limit=CLOSED_STREAMS_KEPT)
        lean.install(self.processor)  # streams without grpclib's up-front Events and Queue
        processors = self.processor.processors
        processors[UnknownFrameReceived] = _ignore
        processors[DataReceived] = _without_empty_data(processors[DataReceived])  # type: ignore[arg-type]
        wanted = limits.max_concurrent_streams
        if wanted is not None and wanted != h2.local_settings.max_concurrent_streams:
            # h2 sent its default (100) in the first SETTINGS; this sends a second.
            # h2 enforces the new value once the client has acknowledged it.
            h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: wanted})
            self.connection.flush()
        _guard_headers(h2, lambda: self._drain_last is not None)
        _watch_drain_ping(h2, self._last_goaway_frame)
        h2._frame_dispatch_table[GoAwayFrame] = _receive_goaway
        if connections.draining:  # made after the drain began: see Connections.drain
            self.drain(connections.drain_timeout)
        elif limits.idle_timeout is not None:
            self._watch_idle()

    def _refuse(self, reason: str) -> None:
        """Refuse a connection (no stream processed) with a GOAWAY NO_ERROR naming
        ``reason``: see :meth:`_turn_away`."""
        self._turn_away(SETTINGS_FRAME + goaway_frame(0, ErrorCodes.NO_ERROR, reason).serialize())

    def _cool_off(self, left: float) -> None:
        """Refuse a connection whose address is cooling down after a flood, with a
        GOAWAY ENHANCE_YOUR_CALM saying for how long: see :meth:`_turn_away`."""
        self._connections.cooled += 1
        transport = self._transport
        log.debug(
            "refused a connection from %s: cooling down after a flood, %.1f s left",
            peer(transport),
            left,
            extra={"peer": peer(transport)},
        )
        self._turn_away(SETTINGS_FRAME + cooling_goaway(left))

    def _turn_away(self, frames: bytes) -> None:
        """Refuse this connection before any HTTP/2 set-up (which is what it would
        cost): ``frames``, SETTINGS and a GOAWAY, written raw (no h2 connection is made
        for it), then a FIN; what the client still sends is read and dropped
        (data_received) until it closes, or CLOSE_WAIT passes: closing with its bytes
        unread (its preface, at least) would reset it, and the GOAWAY with it. Beyond
        REFUSED_HELD such connections at once (cooling, over the cap, or made after
        close(): one budget, so that none of them can fill the fds), the others are
        closed at once."""
        self.handler.close()  # no stream will come: the server may forget the handler
        connections = self._connections
        transport = cast(asyncio.Transport, self._transport)
        transport.write(frames)
        if connections.held >= REFUSED_HELD or not transport.can_write_eof():  # TLS
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # reset by the client already (ENOTCONN): nothing to say
            transport.abort()
            return
        self._held_open = True
        connections.held += 1
        self._abort_later = asyncio.get_running_loop().call_later(CLOSE_WAIT, self.abort)

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
        if self._drain is not None:  # the drain closes it
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
        log.debug("closing a connection idle for %g s (%s)", timeout, flag("idle_timeout"))
        self._connections.idle_closed += 1
        try:
            _h2(self).close_connection(
                ErrorCodes.NO_ERROR, f"idle for {timeout:g} s ({flag('idle_timeout')})".encode()
            )
            self.connection.flush()
        except ProtocolError:  # the connection is already closed for h2
            pass
        # Through grpclib's connection, not the raw transport: its transport may hold
        # the GOAWAY back (coalesce.py) and sends it before it closes.
        self.connection.close()

    # --- the drain: a graceful GOAWAY, as grpc-go's GracefulStop sends it -------------

    def drain(self, timeout: float = DRAIN_PING_TIMEOUT) -> asyncio.Future[None] | None:
        """Begin a graceful close: GOAWAY with last-stream-id 2^31-1 (the client opens
        no more streams here, and those already on their way are still taken) and a
        PING; when its ACK comes, or after ``timeout`` s, a second GOAWAY with the real
        last stream id, after which new streams get RST_STREAM(REFUSED_STREAM), which
        gRPC clients retry on another connection by themselves. Streams in flight carry
        on; after the last, the connection closes (FIN, see :meth:`close`).

        The GOAWAYs are written raw, outside h2's state machine: h2 4.4 moves its
        connection to CLOSED once it sends a GOAWAY (h2 #1181) and then refuses the
        frames of the streams in flight. Returns what is done once the second GOAWAY
        is out; None when there is nothing to drain (refused, closing, draining).
        """
        transport = self._transport
        if (
            not self._admitted
            or self._done
            or self._drain is not None
            or self._coalescing is None
            or transport is None
            or transport.is_closing()
        ):
            return None
        loop = asyncio.get_running_loop()
        self._drain = loop.create_future()
        self._connections._drains.append(self._drain)
        self._stop_idle()
        self.connection.flush()  # what h2 holds goes first
        goaway(self._coalescing, MAX_STREAM_ID, ErrorCodes.NO_ERROR, DRAIN_REASON)
        ping = PingFrame(0)
        ping.opaque_data = DRAIN_PING
        self._coalescing.write(ping.serialize())
        self._drain_timer = loop.call_later(timeout, self._last_goaway_unanswered)
        return self._drain

    def _last_goaway_frame(self) -> GoAwayFrame | None:
        """The second GOAWAY, the last stream id being the highest the client opened so
        far (every later one is refused); None if it is not due or went already. Called
        in h2's frame loop when the PING's ACK is read, so that the streams opened
        before the ACK, and only those, are let in."""
        if self._drain is None or self._drain_last is not None:
            return None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._drain_last = _h2(self).highest_inbound_stream_id
        asyncio.get_running_loop().call_soon(self._drained)
        return goaway_frame(self._drain_last, ErrorCodes.NO_ERROR, DRAIN_REASON)

    def _last_goaway_unanswered(self) -> None:
        """The PING was not answered in time: the second GOAWAY all the same."""
        self._drain_timer = None
        if self._done or self._coalescing is None or self._transport is None:
            return
        self.connection.flush()
        frame = self._last_goaway_frame()
        if frame is not None:
            self._coalescing.write(frame.serialize())

    def _drained(self) -> None:
        """The second GOAWAY is out: close once the streams in flight are done."""
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._transport is not None and not self._done:
            self._drain_close = asyncio.get_running_loop().create_task(self._close_after_streams())

    async def _close_after_streams(self) -> None:
        # grpclib sets stream_close_waiter each time one of its streams is released.
        waiter = self.connection.stream_close_waiter
        while self.processor.streams:
            waiter.clear()
            await waiter.wait()
        self._drain_close = None
        self.close()
        if self._transport is not None and self._abort_later is None:
            self._abort_later = asyncio.get_running_loop().call_later(CLOSE_WAIT, self.abort)

    # --- the close at shutdown ----------------------------------------------------------

    def close(self) -> None:
        """Close the connection once what it holds is written (see Connections.close).

        It lingers: a FIN once everything is written, then what the client still
        sends is read and dropped until it closes too (or the abort of
        ``Connections.wait_closed``); closing with unread bytes would make the
        kernel send a TCP RST, which can destroy what the client has not read yet.
        No GOAWAY of its own: after a drain the client has had two.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._stop_idle()
        if self._admitted and not self._done:
            self._done = True  # from now on what comes is dropped (data_received)
            if self._drain_timer is not None:
                self._drain_timer.cancel()
                self._drain_timer = None
            if self._coalescing is not None:
                self._coalescing.linger()
            # Through grpclib's connection: it stops the keepalive, and its transport
            # may hold writes back (coalesce.py), which it sends before it closes.
            self.connection.close()
        elif not self._admitted:
            transport.close()

    def abort(self) -> None:
        """Drop the connection at once, whatever it still holds."""
        if self._transport is not None:
            # A stream transport, though not always an asyncio one (see above).
            cast(asyncio.WriteTransport, self._transport).abort()

    # --- asyncio's calls: grpclib's protocol only for an admitted connection ------------

    # --- what the client sends: in slices, accounted ----------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._done:
            return
        if self._inbound:
            self._inbound += data
            self._take()
        else:
            self._take(data)

    def _take(self, data: bytes | None = None) -> None:
        """Hand h2 this turn's slice of whole frames (``data``, else what waits in
        ``_inbound``); keep the rest, and come back next turn if whole frames are left."""
        self._turn = None
        transport = self._transport
        accounting = self._accounting
        if self._done or transport is None or transport.is_closing() or accounting is None:
            return
        take = accounting.received(self._inbound if data is None else data)
        end = take.end
        if data is None:
            chunk = bytes(self._inbound[:end])
            del self._inbound[:end]
        else:
            chunk = data if end == len(data) else data[:end]
            if end < len(data):
                self._inbound = bytearray(data[end:])
        if chunk:
            coalescing = self._coalescing  # set as the connection is admitted
            assert coalescing is not None
            coalescing.hold()  # its answers and the handlers' in one send (coalesce.py)
            try:
                self._feed(chunk)
            finally:
                coalescing.release()
        verdict = take.verdict or accounting.verdict
        if verdict is not None:
            self._cut(verdict)
            return
        if self._done or transport.is_closing():
            return
        reading = cast(asyncio.ReadTransport, transport)
        if take.more:
            if not self._paused:
                self._paused = True
                reading.pause_reading()
            self._turn = asyncio.get_running_loop().call_soon(self._take)
        elif self._paused:
            self._paused = False
            reading.resume_reading()

    def _feed(self, chunk: bytes) -> None:
        """grpclib's ``H2Protocol.data_received``, with a GOAWAY for h2's protocol errors."""
        try:
            events = self.connection.feed(chunk)
        except ProtocolError as err:
            self._protocol_error(err)
            return
        self.connection.flush()
        if len(events) > 1:
            events = _without_reset_requests(events)
        for event in events:
            self.processor.process(event)
        self.connection.flush()

    def _sent(self, data: bytes, unsent: int) -> None:
        """Told every write to the socket (``CoalescingTransport``'s watch)."""
        accounting = self._accounting
        if accounting is None or self._done:
            return
        verdict = accounting.sent(data, unsent=unsent)
        if verdict is not None:
            asyncio.get_running_loop().call_soon(self._cut, verdict)

    def _cut(self, verdict: Verdict) -> None:
        """Close a connection that broke a flood limit: GOAWAY, the close, one warning."""
        if self._done or self._transport is None or self._coalescing is None:
            return
        self._done = True
        self._connections.cut += 1
        h2 = _h2(self)
        self.connection.flush()  # what h2 holds goes first
        goaway(
            self._coalescing,
            h2.highest_inbound_stream_id,
            verdict.code,
            verdict.reason,
        )
        frames = self._accounting.frames if self._accounting is not None else 0
        # A flood is worth a warning, and a cool-down; a frame too long is a broken
        # client, like the protocol errors h2 finds.
        flood = verdict.code is ErrorCodes.ENHANCE_YOUR_CALM
        log.log(
            logging.WARNING if flood else logging.INFO,
            "closed the connection from %s after %d frames: %s (GOAWAY %s)%s",
            peer(self._transport),
            frames,
            verdict.reason,
            verdict.code.name,
            self._strike() if flood else "",
            extra={"peer": peer(self._transport), "limit": verdict.reason},
        )
        self._close_now()

    def _strike(self) -> str:
        """Start this connection's address's cool-down (see cooldown.py); what the
        warning of its cut says of it."""
        loop = asyncio.get_running_loop()
        transport = self._transport
        address = None if transport is None else address_key(transport.get_extra_info("peername"))
        length = self._connections.cooldown.strike(address, loop.time())
        if not length:
            return ""
        option = flag("flood_cooldown")
        return f"; new connections from {address} refused for {length:g} s ({option})"

    def _protocol_error(self, err: ProtocolError) -> None:
        """h2 found a connection error: send its GOAWAY (or ours, if it queued none)."""
        self._done = True
        code = ErrorCodes(err.error_code)
        self.connection.flush()
        if self._coalescing is not None and _h2(self).state_machine.state is not (
            ConnectionState.CLOSED
        ):
            # h2 sent no GOAWAY (a bad preface, found before its frame loop): ours.
            goaway(self._coalescing, 0, code, str(err))
        flood = isinstance(err, DenialOfServiceError)
        log.log(
            logging.WARNING if flood else logging.INFO,
            "closed the connection from %s: %s (GOAWAY %s)%s",
            peer(self._transport),
            err,
            code.name,
            self._strike() if flood else "",
            extra={"peer": peer(self._transport)},
        )
        self._close_now()

    def _close_now(self) -> None:
        """Stop every stream and close; abort if the client does not read it in time."""
        self._stop_idle()
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        self._inbound = bytearray()
        if self._coalescing is not None:
            self._coalescing.linger()  # the client reads the GOAWAY; what it sends is dropped
        if self._paused and self._transport is not None:
            self._paused = False
            cast(asyncio.ReadTransport, self._transport).resume_reading()
        self.processor.close("connection closed by the server")
        self._abort_later = asyncio.get_running_loop().call_later(CLOSE_WAIT, self.abort)

    def pause_writing(self) -> None:
        if self._admitted:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        accounting = self._accounting
        if accounting is not None and accounting.received_bytes >= TRIM_AFTER:
            trim_memory_soon()  # what its buffers took, once its handlers are done
        self._accounting = None
        self._stop_idle()
        for handle in (self._turn, self._abort_later, self._drain_timer):
            if handle is not None:
                handle.cancel()
        self._turn = self._abort_later = self._drain_timer = None
        if self._drain_close is not None:
            self._drain_close.cancel()
            self._drain_close = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # nothing left to drain
        self._inbound = bytearray()
        if self._held_open:
            self._held_open = False
            self._connections.held -= 1
        if self._admitted:
            self._admitted = False
            self._connections.open -= 1
            super().connection_lost(exc)
        self._transport = None
        self._connections.live.discard(self)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)


#: A connection that sent this many bytes had its buffers (DATA payloads in h2's and
#: grpclib's queues, streams' partial messages) allocated from the C heap, in pieces of
#: 16 KiB and up: once it closes, the freed memory is given back to the system.
TRIM_AFTER = 1 << 20
TRIM_EVERY = 1.0  # seconds between trims, at least
TRIM_DELAY = 0.2  # seconds after the connection is lost


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_trim = _libc_trim()
_trim_at: float | None = None  # when the trim asked for will run (None: none asked)
_last_trim = -TRIM_EVERY


def trim_memory_soon() -> None:
    """Give the C heap's free memory back to the system in TRIM_DELAY seconds (once
    a closed connection's handlers are done), or as soon after the last trim as
    TRIM_EVERY allows; one trim for every connection that closes meanwhile.

    Without it, a connection that buffered megabytes left the process's RSS ~20 MiB
    higher after it closed (glibc keeps freed memory between live allocations). A
    trim takes ~0.03 ms on a heap of this size."""
    global _trim_at
    if _trim is None or _trim_at is not None:
        return
    loop = asyncio.get_running_loop()
    _trim_at = max(loop.time() + TRIM_DELAY, _last_trim + TRIM_EVERY)
    loop.call_at(_trim_at, _trim_now)


def _trim_now() -> None:
    global _trim_at, _last_trim
    _trim_at = None
    _last_trim = asyncio.get_running_loop().time()
    if _trim is not None:
        _trim(0)


def _h2(protocol: H2Protocol) -> H2Connection:
    """The h2 connection under grpclib's; it keeps it in the private ``_connection``."""
    h2: H2Connection = protocol.connection._connection
    return h2


def _guard_headers(h2: H2Connection, draining: Callable[[], bool]) -> None:
    """Wrap h2's HEADERS handler (in the private ``_frame_dispatch_table``; h2 has no
    public hook) so that

    - a stream opened over SETTINGS_MAX_CONCURRENT_STREAMS, or after the drain's
      second GOAWAY (``draining()`` true), gets RST_STREAM REFUSED_STREAM, as RFC
      9113 sections 5.1.2 and 6.8 require, and the others carry on
      (h2 4 raises TooManyStreamsError, a connection error, and grpclib then drops
      the whole connection). The refused stream is closed-by-reset for h2: later
      frames on it get RST_STREAM and their flow-control credit back;
    - headers that are not ASCII (grpclib has h2 decode them as ``ascii``) make a
      malformed request: RST_STREAM(PROTOCOL_ERROR), a stream error; h2's
      UnicodeDecodeError would escape as a "Fatal error" traceback;
    - an HPACK decoding error is a connection error COMPRESSION_ERROR (RFC 9113
      section 4.3; h2 says PROTOCOL_ERROR), a header list over h2's limit one of
      ENHANCE_YOUR_CALM (h2's DenialOfServiceError), on refused streams too.
    """
    table = h2._frame_dispatch_table
    receive_headers = table[HeadersFrame]

    def refuse(frame: HeadersFrame) -> tuple[list[Frame], list[Any]]:
        _decode(h2, frame.data)  # keep HPACK state in step with the client
        stream_id = frame.stream_id
        h2.highest_inbound_stream_id = max(h2.highest_inbound_stream_id, stream_id)
        h2._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM
        reset = RstStreamFrame(stream_id)
        reset.error_code = ErrorCodes.REFUSED_STREAM
        return [reset], []

    def guarded(frame: HeadersFrame) -> tuple[list[Frame], list[Any]]:
        if (
            frame.stream_id > h2.highest_inbound_stream_id and frame.stream_id % 2 and draining()
        ):  # a new stream after the drain's last stream id
            return refuse(frame)
        try:
            handled: tuple[list[Frame], list[Any]] = receive_headers(frame)
            return handled
        except TooManyStreamsError:
            return refuse(frame)
        except UnicodeDecodeError:
            h2.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)  # queues the RST
            return [], []
        except DenialOfServiceError:
            raise
        except ProtocolError as err:
            if isinstance(err.__cause__, HPACKError):
                raise compression_error(err) from err
            raise

    table[HeadersFrame] = guarded


def _watch_drain_ping(h2: H2Connection, answered: Callable[[], Frame | None]) -> None:
    """Wrap h2's PING handler (in the private ``_frame_dispatch_table``; h2 has no
    hook, and grpclib none for what it is fed) so that the ACK of the drain's PING
    sends what ``answered()`` returns (the second GOAWAY) in h2's frame loop: streams
    whose HEADERS came before the ACK are let in, those after it refused, whatever
    else the same read held. The ACK is not passed on to grpclib, whose keepalive
    would take it for the answer to a PING of its own."""
    table = h2._frame_dispatch_table
    receive_ping = table[PingFrame]

    def watched(frame: PingFrame) -> tuple[list[Frame], list[Any]]:
        frames, events = receive_ping(frame)
        if "ACK" in frame.flags and frame.opaque_data == DRAIN_PING:
            events = [event for event in events if not isinstance(event, PingAckReceived)]
            last = answered()
            if last is not None:
                frames = [*frames, last]
        return frames, events

    table[PingFrame] = watched


def _receive_goaway(frame: GoAwayFrame) -> tuple[list[Frame], list[Any]]:
    """A client's GOAWAY, in place of h2's handler (in the private
    ``_frame_dispatch_table``; h2 has no hook): nothing to do. It limits the streams
    the server would open (none in gRPC), not the client's own, which carry on; node's
    http2 sends one as soon as it reads the drain's. h2 4.4 moves the connection to
    CLOSED on it and then refuses every frame of the streams in flight (h2 #1181, the
    state machine that makes the drain write its GOAWAYs raw), and grpclib's
    ``process_connection_terminated`` would end them all. The client closes the
    connection when it is done, or the drain does."""
    return [], []


def _decode(h2: H2Connection, block: bytes) -> None:
    """Decode a header block only to keep HPACK state; errors as h2 would raise them."""
    try:
        h2.decoder.decode(block, raw=True)
    except OversizedHeaderListError as err:
        raise DenialOfServiceError(f"Oversized header block: {err}") from err
    except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise compression_error(ProtocolError(f"Error decoding header block: {err}")) from err


def compression_error(err: ProtocolError) -> ProtocolError:
    """A ProtocolError with the code of an HPACK decoding error, COMPRESSION_ERROR."""
    error = ProtocolError(str(err))
    error.error_code = ErrorCodes.COMPRESSION_ERROR
    return error


def _without_reset_requests(events: list[Event]) -> list[Event]:
    """h2's events less the requests that the client reset in the same slice: grpclib
    would make each its stream, buffer and task only to cancel them (Rapid Reset).
    Their other events stay: grpclib gives the window of DATA for a stream it does
    not know back at once."""
    reset = {e.stream_id for e in events if isinstance(e, StreamReset) and e.remote_reset}
    if not reset:
        return events
    return [e for e in events if not (isinstance(e, RequestReceived) and e.stream_id in reset)]


def _ignore(event: object) -> None:
    """An h2 event that needs nothing done (a frame of an unknown type)."""


def _without_empty_data(process: Callable[[DataReceived], None]) -> Callable[[DataReceived], None]:
    """grpclib's DataReceived processing, skipping DATA frames with nothing in them:
    grpclib queues each one in its stream's buffer (an end of stream is its own
    event, StreamEnded), so they cost memory and flow-control nothing."""

    def process_data(event: DataReceived) -> None:
        if event.data or event.flow_controlled_length:
            process(event)

    return process_data


def goaway_frame(last_stream_id: int, code: ErrorCodes, reason: str) -> GoAwayFrame:
    """A GOAWAY frame with ``last_stream_id``, error ``code`` and ``reason`` as its
    debug data."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = code
    frame.additional_data = reason.encode()
    return frame


def goaway(
    transport: asyncio.BaseTransport, last_stream_id: int, code: ErrorCodes, reason: str
) -> None:
    """Write a GOAWAY frame (outside h2's state machine: h2 4.4 closes its connection
    once it sends one) with ``last_stream_id``, error ``code`` and ``reason`` as its
    debug data, to a stream ``transport``; the caller closes it, if it wants to."""
    frame = goaway_frame(last_stream_id, code, reason)
    cast(asyncio.WriteTransport, transport).write(frame.serialize())


SETTINGS_FRAME = SettingsFrame(0).serialize()  # the server's preface, no settings changed


def cooling_goaway(left: float) -> bytes:
    """The GOAWAY of a connection refused while its address cools down (``left`` s)."""
    reason = (
        f"cooling down after a flood from this address ({flag('flood_cooldown')}): "
        f"try again in {math.ceil(left)} s"
    )
    return goaway_frame(0, ErrorCodes.ENHANCE_YOUR_CALM, reason).serialize()


def peer(transport: asyncio.BaseTransport | None) -> str:
    """The client's address as ``host:port`` (``[host]:port`` for IPv6), for logs."""
    address = None if transport is None else transport.get_extra_info("peername")
    if not isinstance(address, tuple) or len(address) < 2:
        return "unknown"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
