"""Run services until a signal: bind, signals, the ready line, the drain, the stop.

    await serve(lambda: [MyService()], ServeConfig(port=50051, name="my-service"))

serves them as :meth:`Serving.build <.build.Serving.build>` does, on ``host:port``,
until SIGINT or SIGTERM, then drains them and returns: what a ``serve`` command runs.
Also here: the listening socket (:func:`bind`) and how addresses are written.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import socket
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from grpclib.encoding.base import CodecBase

from . import handoff, tracing
from .build import Serving
from .limits import Limits
from .logs import log
from .metrics import MetricsEndpoint
from .settings import DEFAULT_GRACE, DEFAULT_HOST, DEFAULT_NAME, DEFAULT_PORT
from .streams import SHUTDOWN_MESSAGE, Servable, Streams
from .tls import TLSConfig
from .worker import Worker


@dataclass
class ServeConfig:
    """Everything :func:`serve` needs; a command fills it from flags and environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    grace: float = DEFAULT_GRACE  # seconds in-flight streams get to finish on shutdown
    metrics_host: str = DEFAULT_HOST
    metrics_port: int | None = None  # None: no metrics endpoint
    tls: TLSConfig | None = None  # None: plaintext
    workers: int = 1  # processes; more than 1 is run by the command's supervisor.py
    worker: Worker | None = None  # set when this process is one of those workers
    limits: Limits = field(default_factory=Limits)  # message size, streams, connections ...
    # The application's name, from which the names of what its processes share come:
    # the workers' environment variable and header, the metrics directory (worker.py),
    # the default service.name of its spans and the <NAME>_TRACE_MESSAGES variable.
    name: str = DEFAULT_NAME
    # With tracing on (OTEL_* variables, tracing.py): a span event per message, as
    # <NAME>_TRACE_MESSAGES=1 asks too.
    trace_messages: bool = False


async def serve(
    services: Callable[[], Collection[Servable]],
    config: ServeConfig | None = None,
    *,
    codec: CodecBase | None = None,
    shutdown_message: str = SHUTDOWN_MESSAGE,
) -> None:
    """Serve ``services()`` until SIGINT or SIGTERM, then drain and return (call in
    the main thread); ``codec`` and ``shutdown_message`` as :meth:`Serving.build` takes them.

    Raises OSError when it cannot listen, ``tls.TLSFileError`` for an unusable
    certificate, key or CA file (before it listens).

    A second signal during the drain cuts the grace period short.

    Traced when the OTEL_* variables ask for it (``tracing.py``); the spans left
    are exported before it returns, within ``tracing.FLUSH_TIMEOUT`` seconds.
    """
    config = ServeConfig() if config is None else config
    context = None if config.tls is None else config.tls.server_context()
    worker = config.worker
    # A worker of a supervisor that accepts for it serves what it is handed
    # (handoff.py); under plain grpclib, a worker listens with SO_REUSEPORT.
    channel = None if worker is None else handoff.channel_from_env(config.name)
    sock = None
    if channel is None:
        sock = bind(config.host, config.port, reuse_port=worker is not None)
    built = Serving.build(
        services(),
        codec=codec,
        limits=config.limits,
        shutdown_message=shutdown_message,
        tracer_provider=tracing.provider(config.name),
        trace_messages=config.trace_messages or tracing.messages_asked(config.name),
    )
    if worker is not None:
        worker.attach(built.server)
    endpoint = None
    if config.metrics_port is not None:
        endpoint = await MetricsEndpoint.start(
            built.metrics, config.metrics_host, config.metrics_port
        )
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, endpoint.port)
    stop = asyncio.Event()
    if worker is None:
        undo_signals = _install_signals(stop, built.streams)
    else:
        undo_signals = worker.install(stop, built.streams.hurry)
    try:
        if sock is None:
            assert channel is not None
            built.start_from(
                functools.partial(
                    handoff.Receiver,
                    channel,
                    ssl=context,
                    ssl_handshake_timeout=config.limits.tls_handshake_timeout,
                )
            )
            address = host_port(config.host, config.port)
        else:
            await built.start(sock, context)
            address = host_port(*address_of(sock))
        # What start-up made lives as long as the process: out of the collector's
        # sight, a full collection (which a flood of connections brings on) scans only
        # what connections make. Measured under Rapid Reset: 39 ms pauses, then none.
        gc.collect()
        gc.freeze()
        mode = "" if config.tls is None else f" ({config.tls.mode})"
        if worker is None:
            log.info("listening on %s%s", address, mode)
        else:  # the supervisor says "listening on" once every worker is ready
            worker.ready(address)
        await stop.wait()
        await built.shutdown(config.grace)
    finally:
        undo_signals()
        if endpoint is not None:
            await endpoint.close()
        tracing.shutdown()
    log.info("stopped")


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


def host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
