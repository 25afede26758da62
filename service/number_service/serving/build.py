"""A server for any betterproto2 services, with what an operator needs around them.

    serving = Serving.build([MyService()])       # StrictCodec, Limits() by default
    await serving.start(bind("127.0.0.1", 0))
    ...
    await serving.shutdown(grace=10)             # the drain

:meth:`Serving.build` adds to the services health (``grpc.health.v1``, one status for
the whole server and each service), reflection (v1 and v1alpha, from betterproto2's
descriptors), stream tracking with metrics and one log line per stream, and the
limits; and, when tracing is on (``tracing.py``: the OTEL_* variables, say), an
OpenTelemetry SERVER span per stream. :meth:`Serving.shutdown` is the graceful
drain that grpclib's ``graceful_exit`` lacks (grpclib issues #107, #148): it waits
for the streams of the services' own methods, not for health's Watch streams nor
reflection's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl  # the parameter of Serving.start is called ssl, as in grpclib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from grpclib.encoding.base import CodecBase
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.server import Server

from . import grpclib_ext, listening, tracing
from .codec import StrictCodec
from .limits import Limits
from .logs import log, log_stream_end
from .metrics import Metrics
from .reflection import with_reflection
from .streams import SHUTDOWN_MESSAGE, Servable, Streams

STOP_WAIT = 5.0  # seconds past the grace period that a shutdown waits for connections
ACCEPT_SETTLE = 0.1  # seconds for connections accepted before the socket closed to be made
STARTED_WAIT = 0.5  # seconds, at most, for the streams let in by the drain to start
ADOPT_WAIT = 0.2  # seconds for the connections taken from the listen backlog to be made


@dataclass
class Serving:
    """A grpclib server of some services with health, reflection, stream tracking,
    metrics and logs, and its drain; made by :meth:`build`."""

    server: Server
    streams: Streams
    health: ServiceStatus
    metrics: Metrics = field(default_factory=Metrics)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def build(
        cls,
        services: Collection[Servable],
        *,
        codec: CodecBase | None = None,
        limits: Limits | None = None,
        shutdown_message: str = SHUTDOWN_MESSAGE,
        tracer_provider: Any = None,
        trace_messages: bool = False,
    ) -> Serving:
        """Serve ``services`` with ``codec`` (default :class:`StrictCodec`) within
        ``limits`` (default :class:`Limits`' defaults); a stream a drain has to end
        gets UNAVAILABLE with ``shutdown_message``. Spans go to ``tracer_provider``
        (an OpenTelemetry ``TracerProvider``), by default to :func:`tracing.provider`'s,
        if tracing is on; ``trace_messages``: a span event per message."""
        limits = Limits() if limits is None else limits
        health = ServiceStatus()
        served = with_reflection([*services, Health({service: [health] for service in services})])
        server = grpclib_ext.make_server(
            served,
            codec=StrictCodec() if codec is None else codec,
            config=limits.grpclib_config(),
            stream_limits=limits.stream_limits(),
            connection_limits=limits.connection_limits(),
        )
        drained = [path for service in services for path in service.__mapping__()]
        if tracer_provider is None:
            tracer_provider = tracing.provider()
        spans = None  # tracing off: not one listener more
        if tracer_provider is not None:  # its listeners before Streams': see otel.ServerSpans
            spans = tracing.server_spans(server, tracer_provider, message_events=trace_messages)
        streams = Streams(
            server,
            served,
            drained=drained,
            shutdown_message=shutdown_message,
            # Ours refuse new streams as gRPC servers do (connections.py); plain
            # grpclib's cannot, so its new streams get UNAVAILABLE.
            refuse_while_draining=not isinstance(server, grpclib_ext.Server),
        )
        streams.on_end.append(log_stream_end)
        if spans is not None:
            spans.follow(streams)
        built = cls(server, streams, health, limits=limits)
        built.metrics.attach(streams)
        return built

    @property
    def connections(self) -> grpclib_ext.Connections | None:
        """The open connections and their counts; None under plain grpclib."""
        server = self.server
        return server.connections if isinstance(server, grpclib_ext.Server) else None

    async def start(self, sock: socket.socket, ssl: _ssl.SSLContext | None = None) -> None:
        """Serve on ``sock``; with ``ssl`` (see ``tls.server_context``), TLS only.

        A TLS client must finish its handshake within ``limits.tls_handshake_timeout``
        seconds or is disconnected: until then the connection cap and keepalive do
        not see the connection (asyncio makes the protocol only after the handshake).
        """
        if isinstance(self.server, grpclib_ext.Server):
            await self.server.start_on(
                sock, ssl=ssl, ssl_handshake_timeout=self.limits.tls_handshake_timeout
            )
        else:  # plain grpclib: asyncio's 60 s handshake timeout
            await self.server.start(sock=sock, ssl=ssl)
        self.health.set(True)

    def start_from(
        self, listener: Callable[[Callable[[], asyncio.Protocol]], asyncio.AbstractServer]
    ) -> None:
        """Serve the connections ``listener`` sets up (``handoff.Receiver``: those a
        ``--workers`` supervisor accepted and handed to this worker); this package's
        Server only (the supervisor uses SO_REUSEPORT under plain grpclib)."""
        if not isinstance(self.server, grpclib_ext.Server):
            raise RuntimeError("handed connections need grpclib_ext's Server")
        self.server.serve_from(listener)
        self.health.set(True)

    async def _started(self, connections: grpclib_ext.Connections, timeout: float) -> None:
        """Wait, up to ``timeout`` s, until every stream handler task of ``connections``
        has reached its method (so the drain counts it) or ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled once per loop turn: nothing signals a task reaching its method.
        while loop.time() < deadline and any(  # noqa: ASYNC110
            not self.streams.started(task) for task in connections.handler_tasks()
        ):
            await asyncio.sleep(0)

    async def shutdown(self, grace: float) -> None:
        """Drain: NOT_SERVING, no new connections or streams, in-flight streams get
        ``grace`` seconds to finish; those left end with UNAVAILABLE. Then every
        connection is closed, so that clients holding one cannot keep it waiting.

        New streams are refused as gRPC servers do (grpc-go's GracefulStop): every
        connection gets a GOAWAY with last-stream-id 2^31-1 and a PING, then, once
        the PING is answered (or after ``DRAIN_PING_TIMEOUT``), a GOAWAY with its real
        last stream id; streams that still come get RST_STREAM(REFUSED_STREAM), which
        clients retry on another connection. A connection closes once its last
        stream is done. (Plain grpclib: new streams get UNAVAILABLE.)"""
        started = asyncio.get_running_loop().time()
        self.health.set(False)
        # Plain grpclib has no way to stop listening alone: its close() would also
        # cancel every stream at once. Its new streams are refused (Streams.drain).
        if isinstance(self.server, grpclib_ext.Server):
            ping_wait = min(grace, grpclib_ext.DRAIN_PING_TIMEOUT)
            # No new handshake, and the sweep of the backlog only once those under
            # way are in it (listening.py): closing would reset them, requests sent.
            # The GOAWAYs go first: a stream opened meanwhile on a connection that
            # had none would be let in, where clients expect it refused.
            if self.server.shut():
                self.server.connections.begin_drain(ping_wait)
                await asyncio.sleep(listening.SETTLE)
            self.server.stop_listening()
            await self.server.adopted(ADOPT_WAIT)
            await self.server.connections.drain(ping_wait)
            # Connections asyncio accepted just before the socket closed get their
            # protocol a turn or more later, and drain at once when they do: wait for
            # them, so that the drain does not end (and exit) with their requests
            # unread, a TCP reset (through nginx: a call it tries again elsewhere).
            await asyncio.sleep(ACCEPT_SETTLE)
            await self.server.connections.drain(ping_wait)
            # The streams let in just before the second GOAWAYs: their tasks start,
            # and are counted in flight, a turn or more later (after what the
            # connection's slice of frames held back). Counting before would let the
            # drain end under them, and close their connections unread (a TCP reset).
            await self._started(self.server.connections, STARTED_WAIT)
        in_flight = self.streams.drained_in_flight
        log.info("draining: not listening; up to %g s for %d stream(s)", grace, in_flight)
        left = max(0.0, grace - (asyncio.get_running_loop().time() - started))
        ended = await self.streams.drain(left)
        if ended:
            log.warning("grace period over: ended %d stream(s) with UNAVAILABLE", ended)
        # Cancels what still runs (health Watch streams, say) and closes every
        # connection (grpclib_ext.Connections): from Python 3.12.1 wait_closed()
        # waits for them, and plain grpclib's close() leaves them to the clients.
        self.server.close()
        bound = grace + STOP_WAIT
        try:
            await asyncio.wait_for(self.server.wait_closed(), bound)
        except TimeoutError:
            log.warning("connections still open %g s after the drain; stopping without them", bound)
