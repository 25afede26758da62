"""Everything that reaches into grpclib's or h2's private attributes, and nothing else.

Each module names the private attributes it uses and the missing API or upstream
issue they stand in for. They were written against the versions in
:data:`WRITTEN_FOR`: with any other installed, :func:`make_server` says so in one log
line and serves with plain grpclib behaviour instead of breaking (no batching, no
coalesced writes, none of the per-stream or per-connection limits of this package),
and the client-side functions (:mod:`.client`) give plain grpclib's answers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from importlib import metadata
from typing import Any

from grpclib import events
from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase
from grpclib.server import Server as GrpclibServer

from .connections import DRAIN_PING_TIMEOUT, ConnectionLimits, Connections
from .floods import FloodLimits
from .server import Server
from .stream import BATCH, BatchingStream, Counter, StreamLimits, message_name

__all__ = [
    "BATCH",
    "DRAIN_PING_TIMEOUT",
    "WRITTEN_FOR",
    "BatchingStream",
    "ConnectionLimits",
    "Connections",
    "Counter",
    "FloodLimits",
    "Server",
    "StreamLimits",
    "count_messages",
    "make_server",
    "message_name",
    "mismatch",
]

log = logging.getLogger(__name__)

#: The releases whose private attributes this package was written against.
WRITTEN_FOR = {"grpclib": "0.4.9", "h2": "4.4.1", "hyperframe": "6.1.0"}


def mismatch() -> str | None:
    """How the installed grpclib, h2 and hyperframe differ from :data:`WRITTEN_FOR`."""
    found = []
    for name, expected in WRITTEN_FOR.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != expected:
            found.append(f"{name} {installed} (written for {expected})")
    return ", ".join(found) or None


def make_server(
    handlers: Collection[Any],
    *,
    codec: CodecBase | None = None,
    config: Configuration | None = None,
    stream_limits: StreamLimits | None = None,
    connection_limits: ConnectionLimits | None = None,
) -> GrpclibServer:
    """This package's :class:`Server` or, if grpclib or h2 are not the releases it was
    written for, grpclib's own (saying so once, in one line)."""
    different = mismatch()
    if different is None:
        return Server(
            handlers,
            codec=codec,
            config=config,
            stream_limits=stream_limits,
            connection_limits=connection_limits,
        )
    log.warning(
        "installed %s: serving with plain grpclib behaviour (no batched streams, "
        "coalesced writes, per-stream and per-connection limits, or flood defences)",
        different,
    )
    return GrpclibServer(handlers, codec=codec, config=config)


def count_messages(server: GrpclibServer, counter: Counter) -> None:
    """Call ``counter(received, sent)`` in each stream's task for its messages; attach
    before the server starts. This package's Server reports them in batches; a plain
    grpclib server, through one of its message events per message."""
    if isinstance(server, Server):
        previous = server.counter
        if previous is None:
            server.counter = counter
        else:

            def both(received: int, sent: int) -> None:
                previous(received, sent)
                counter(received, sent)

            server.counter = both
        return

    async def received(event: events.RecvMessage) -> None:
        counter(1, 0)

    async def sent(event: events.SendMessage) -> None:
        counter(0, 1)

    events.listen(server, events.RecvMessage, received)
    events.listen(server, events.SendMessage, sent)
