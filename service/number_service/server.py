"""NumberService wired to the serving layer: which services, which codec, the app name.

    server = create_server()
    with graceful_exit([server]):
        await server.start(host, port)
        await server.wait_closed()

is the plain grpclib way, and works. ``await serve(ServeConfig(...))`` is what the
``number-service serve`` command runs: the serving layer (``number_service.serving``)
adds what an operator needs, including the graceful drain; :func:`build_server`
gives its pieces to embed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpclib.server import Server

from . import serving
from .codec import NumberCodec
from .service import NumberService
from .serving import Limits, Serving, make_server

NAME = "number-service"  # the names of its environment variables, header, metrics files
#: The largest request message NumberService's server takes by default (--max-message-size).
#: The serving layer's default is gRPC's 4 MiB, for any service; NumberService's own
#: requests are at most 11 bytes (a NumberRequest with a negative int32: a 1-byte tag and
#: a 10-byte varint), health's and reflection's carry names of tens of bytes. 1 KiB fits
#: them all with room for fields a newer client may add (skipped as unknown), and keeps
#: what one stream's unfinished message can make the server hold at 1 KiB, not 4 MiB.
MAX_MESSAGE_SIZE = 1024
#: UNAVAILABLE's message for a stream still open when a drain's grace period is over.
SHUTDOWN_MESSAGE = (
    "server shut down before this stream finished; "
    "the sums so far are valid, start a new stream to continue"
)


def services() -> list[NumberService]:
    """What a NumberService server serves (health and reflection come on top)."""
    return [NumberService()]


def create_server() -> Server:
    """A grpclib Server with a fresh NumberService and the strict codec, not started:
    the serving layer's Server (batched streams, coalesced writes)."""
    return make_server(services(), codec=NumberCodec())


def default_limits() -> Limits:
    """The serving layer's limits with NumberService's message size (MAX_MESSAGE_SIZE)."""
    return Limits(max_message_size=MAX_MESSAGE_SIZE)


def build_server(limits: Limits | None = None) -> Serving:
    """NumberService with health, reflection, stream tracking, metrics, logs and the
    drain, within ``limits`` (default: :func:`default_limits`); not started."""
    return Serving.build(
        services(),
        codec=NumberCodec(),
        limits=default_limits() if limits is None else limits,
        shutdown_message=SHUTDOWN_MESSAGE,
    )


class NumberServer:
    """``NumberServer.build(limits)`` is :func:`build_server` (its earlier name)."""

    build = staticmethod(build_server)


@dataclass
class ServeConfig(serving.ServeConfig):
    """The serving layer's ServeConfig with NumberService's name and limits."""

    name: str = NAME
    limits: Limits = field(default_factory=default_limits)


async def serve(config: ServeConfig | None = None) -> None:
    """Serve NumberService until SIGINT or SIGTERM, then drain and return (call in
    the main thread). Raises as ``serving.serve`` does."""
    await serving.serve(
        services,
        ServeConfig() if config is None else config,
        codec=NumberCodec(),
        shutdown_message=SHUTDOWN_MESSAGE,
    )
