"""Build and run a grpclib server for NumberService; importable for embedding.

    server = create_server()
    with graceful_exit([server]):
        await server.start(host, port)
        await server.wait_closed()

or simply ``await serve(host, port)``, which does the same, binds first so that
port 0 works, and logs one line with the address it listens on.
"""

from __future__ import annotations

import logging
import os
import socket

from grpclib.server import Server
from grpclib.utils import graceful_exit

from .codec import NumberCodec
from .service import NumberService

log = logging.getLogger("number_service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051


def create_server() -> Server:
    """A grpclib Server with a fresh NumberService and the strict codec, not started."""
    return Server([NumberService()], codec=NumberCodec())


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one).

    Raises OSError with the address in the message, e.g. when the port is taken.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address[:2], family=family, backlog=128)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise OSError(f"cannot listen on {host}:{port}: {reason}") from None


def address_of(sock: socket.socket) -> tuple[str, int]:
    """The host and port a bound socket really listens on."""
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


async def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
) -> None:
    """Serve until SIGINT or SIGTERM (call it in the main thread), then return."""
    sock = bind(host, port)
    server = create_server()
    with graceful_exit([server]):
        await server.start(sock=sock)
        log.info("listening on %s:%d", *address_of(sock))
        await server.wait_closed()
    log.info("stopped")
