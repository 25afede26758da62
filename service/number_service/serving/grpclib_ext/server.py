"""grpclib's Server with this package's streams, connections and start-up.

:class:`Server` is a :class:`grpclib.server.Server` (its public API, its events)
whose connections coalesce their writes per loop turn (:mod:`.coalesce`) and serve
every stream with :class:`~.stream.BatchingStream` (:mod:`.handler`). grpclib has no
hook for the connection protocol or the per-connection handler, so it overrides the
private ``Server._protocol_factory``; :meth:`start` and :meth:`stop_listening` set and
close grpclib's private ``_server`` (there is no public way to pass
``ssl_handshake_timeout``, nor to stop listening without cancelling every stream:
grpclib issues #107 and #148 ask for a graceful close).
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
from collections.abc import Collection
from typing import Any, cast

from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.protocol import H2Protocol
from grpclib.server import Server as GrpclibServer

from .coalesce import CoalescingTransport
from .handler import Handler
from .stream import Counter, StreamLimits


class _CoalescingProtocol(H2Protocol):
    live: set[_CoalescingProtocol]  # its server's open connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass
        # (uvloop's is not): only its methods are used.
        super().connection_made(CoalescingTransport(cast(asyncio.Transport, transport)))
        self.live.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.live.discard(self)
        super().connection_lost(exc)


class Server(GrpclibServer):
    """grpclib's Server, with batched streams and coalesced writes (see the module)."""

    def __init__(
        self,
        handlers: Collection[Any],
        *,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        config: Configuration | None = None,
        limits: StreamLimits | None = None,
    ) -> None:
        super().__init__(
            handlers, codec=codec, status_details_codec=status_details_codec, config=config
        )
        self.stream_limits = StreamLimits() if limits is None else limits
        #: Told the messages of every stream, in batches (see ``stream.Counter``).
        self.counter: Counter | None = None
        self._live: set[_CoalescingProtocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = Handler(
            self._mapping,
            self._codec,
            self._status_details_codec,
            self.__dispatch__,
            limits=self.stream_limits,
            counter=self.counter,
        )
        self._handlers.add(handler)
        protocol = _CoalescingProtocol(handler, self._config, self._h2_config)
        protocol.live = self._live
        return protocol

    def close(self) -> None:
        """Stop listening and cancel every handler (grpclib's close), then close every
        connection once what it holds is written. grpclib leaves connections to the
        clients, and from Python 3.12.1 ``wait_closed()`` waits for every one of them
        (cpython issue #104344): a client that stayed connected held it forever."""
        super().close()
        for protocol in list(self._live):
            protocol.connection.close()

    async def start_on(
        self,
        sock: socket.socket,
        *,
        ssl: _ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        """Serve on a listening ``sock``; under TLS, a client must finish its handshake
        within ``ssl_handshake_timeout`` seconds (asyncio's default would be 60)."""
        if self._server is not None:
            raise RuntimeError("Server is already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_factory,
            sock=sock,
            ssl=ssl,
            ssl_handshake_timeout=ssl_handshake_timeout if ssl is not None else None,
        )
        self._server_closed_fut = loop.create_future()

    def stop_listening(self) -> None:
        """Refuse new connections; open ones and their streams carry on."""
        if self._server is not None:
            self._server.close()
