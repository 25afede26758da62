"""Build and run the NumberService server: health, reflection, metrics, logs, drain.

    server = create_server()
    with graceful_exit([server]):
        await server.start(host, port)
        await server.wait_closed()

is the plain grpclib way, and works. ``await serve(ServeConfig(...))`` is what the
``number-service serve`` command runs: it adds what an operator needs, including a
graceful drain that grpclib's ``graceful_exit`` lacks (grpclib issues #107, #148).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl as _ssl  # the parameter of NumberServer.start is called ssl, as in grpclib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.server import Server

from ..codec import NumberCodec
from ..service import ACCUMULATE_NUMBERS, NumberService
from . import grpclib_ext
from .addresses import host_port
from .limits import Limits
from .logs import log_stream_end
from .metrics import Metrics, MetricsEndpoint
from .reflection import with_reflection
from .streams import Streams
from .tls import TLSConfig
from .worker import Worker

log = logging.getLogger("number_service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_GRACE = 10.0
STOP_WAIT = 5.0  # seconds past the grace period that a shutdown waits for connections


def create_server() -> Server:
    """A grpclib Server with a fresh NumberService and the strict codec, not started:
    the serving layer's Server (batched streams, coalesced writes)."""
    return grpclib_ext.make_server([NumberService()], codec=NumberCodec())


@dataclass
class ServeConfig:
    """Everything ``serve`` needs; the CLI fills it from flags and environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    grace: float = DEFAULT_GRACE  # seconds in-flight streams get to finish on shutdown
    metrics_host: str = DEFAULT_HOST
    metrics_port: int | None = None  # None: no metrics endpoint
    tls: TLSConfig | None = None  # None: plaintext
    workers: int = 1  # processes; more than 1 is run by the command's supervisor.py
    worker: Worker | None = None  # set when this process is one of those workers
    limits: Limits = field(default_factory=Limits)  # message size, streams, connections ...


@dataclass
class NumberServer:
    """A NumberService server with health, reflection, stream tracking and metrics."""

    server: Server
    streams: Streams
    health: ServiceStatus
    metrics: Metrics = field(default_factory=Metrics)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def build(cls, limits: Limits | None = None) -> NumberServer:
        """The server with ``limits`` (default: :class:`Limits`' defaults)."""
        limits = Limits() if limits is None else limits
        number = NumberService()
        health = ServiceStatus()
        services = with_reflection([number, Health({number: [health]})])
        server = grpclib_ext.make_server(
            services,
            codec=NumberCodec(),
            config=limits.grpclib_config(),
            stream_limits=limits.stream_limits(),
            connection_limits=limits.connection_limits(),
        )
        streams = Streams(server, services, drained=[ACCUMULATE_NUMBERS])
        streams.on_end.append(log_stream_end)
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

    async def shutdown(self, grace: float) -> None:
        """Drain: NOT_SERVING, no new connections or streams, in-flight streams get
        ``grace`` seconds to finish; those left end with UNAVAILABLE. Then every
        connection is closed, so that clients holding one cannot keep it waiting."""
        self.health.set(False)
        # Plain grpclib has no way to stop listening alone: its close() would also
        # cancel every stream at once. Its new streams are refused (Streams.drain).
        if isinstance(self.server, grpclib_ext.Server):
            self.server.stop_listening()
        in_flight = self.streams.drained_in_flight
        log.info("draining: not listening; up to %g s for %d stream(s)", grace, in_flight)
        ended = await self.streams.drain(grace)
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


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one); ``reuse_port``
    sets SO_REUSEPORT, so that workers share the port.

    Raises OSError with the address in the message, e.g. when the port is taken.
    """
    with listen_errors(host, port):
        family, address = resolve(host, port)
        listener = socket.create_server(
            address,
            family=family,
            backlog=128,
            reuse_port=reuse_port,
            dualstack_ipv6=dual_stack(family, address),
        )
        # create_server leaves proto 0, and asyncio sets TCP_NODELAY on accepted
        # sockets only when proto is IPPROTO_TCP: without it, Nagle plus delayed
        # ACKs held each lock-step answer ~40 ms. Re-wrap the fd with the right proto.
        return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, listener.detach())


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The family and address to listen on for host:port: the first getaddrinfo gives."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, (str(address[0]), int(address[1]))


def dual_stack(family: int, address: tuple[str, int]) -> bool:
    """Whether a socket on ``address`` takes IPv4 connections too: on ``::`` (all
    interfaces) it does, where the system can (IPV6_V6ONLY off); any other IPv6
    address is IPv6 only."""
    return family == socket.AF_INET6 and address[0] == "::" and socket.has_dualstack_ipv6()


@contextmanager
def listen_errors(host: str, port: int) -> Iterator[None]:
    """Turn a failure to resolve or bind host:port into one OSError that names it."""
    try:
        yield
    except socket.gaierror as err:  # its errno is not an os.strerror one
        raise OSError(f"cannot listen on {host_port(host, port)}: {err.strerror}") from None
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise OSError(f"cannot listen on {host_port(host, port)}: {reason}") from None


def address_of(sock: socket.socket) -> tuple[str, int]:
    """The host and port a bound socket really listens on."""
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


async def serve(config: ServeConfig | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return (call in the main thread).

    Raises OSError when it cannot listen, ``tls.TLSFileError`` for an unusable
    certificate, key or CA file (before it listens).

    A second signal during the drain cuts the grace period short.
    """
    config = ServeConfig() if config is None else config
    context = None if config.tls is None else config.tls.server_context()
    worker = config.worker
    sock = bind(config.host, config.port, reuse_port=worker is not None)
    built = NumberServer.build(config.limits)
    if worker is not None:
        worker.attach(built.server)
    endpoint = None
    if config.metrics_port is not None:
        endpoint = MetricsEndpoint(built.metrics, config.metrics_host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, endpoint.port)
    stop = asyncio.Event()
    if worker is None:
        undo_signals = _install_signals(stop, built.streams)
    else:
        undo_signals = worker.install(stop, built.streams.hurry)
    try:
        await built.start(sock, context)
        mode = "" if config.tls is None else f" ({config.tls.mode})"
        if worker is None:
            log.info("listening on %s%s", host_port(*address_of(sock)), mode)
        else:  # the supervisor says "listening on" once every worker is ready
            worker.ready(host_port(*address_of(sock)))
        await stop.wait()
        await built.shutdown(config.grace)
    finally:
        undo_signals()
        if endpoint is not None:
            await endpoint.close()
    log.info("stopped")


def _install_signals(stop: asyncio.Event, streams: Streams) -> Callable[[], None]:
    """SIGINT or SIGTERM sets ``stop``; a second one hurries the drain. Returns the undo."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, stop, streams)

    def undo() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    return undo


def _on_signal(stop: asyncio.Event, streams: Streams) -> None:
    if stop.is_set():
        streams.hurry()
    stop.set()
