"""grpclib's Server with this package's connections, streams and start-up.

:class:`Server` is a :class:`grpclib.server.Server` (its public API, its events)
whose connections are :class:`~.connections.Connection` (coalesced writes, the
connection cap, the streams setting, idle reaping) and serve every stream with
:class:`~.stream.BatchingStream` (:mod:`.handler`). Private grpclib attributes used
here, with what they stand in for:

- ``Server._protocol_factory``, overridden: grpclib has no hook for the connection
  protocol or the per-connection handler (nor any connection limit);
- ``Server._server`` (grpclib's asyncio server), set by :meth:`Server.start_on` (or
  :meth:`Server.serve_from`) and closed by :meth:`Server.stop_listening`: there is no
  public way to pass ``ssl_handshake_timeout``, nor to serve connections accepted
  elsewhere (a ``--workers`` worker's, handed over by its supervisor), nor to stop
  listening without cancelling every stream
  (grpclib issues #107 and #148 ask for a graceful close); its ``abort_clients``
  (Python 3.13+) ends TLS handshakes still under way at the end of
  :meth:`Server.wait_closed`;
- ``Server._server_closed_fut``, ``_mapping``, ``_codec``, ``_status_details_codec``,
  ``_handlers``, ``_config``, ``_h2_config``: grpclib's own state, which
  ``_protocol_factory`` and ``start_on`` use as grpclib's own methods do.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
from collections.abc import Callable, Collection
from typing import Any

from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.protocol import H2Protocol
from grpclib.server import Server as GrpclibServer

from ..listening import shut
from ..settings import flag
from .connections import Connection, ConnectionLimits, Connections
from .handler import Handler
from .stream import Budget, Counter, StreamLimits


class Server(GrpclibServer):
    """grpclib's Server, with batched streams and guarded connections (see the module)."""

    def __init__(
        self,
        handlers: Collection[Any],
        *,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        config: Configuration | None = None,
        stream_limits: StreamLimits | None = None,
        connection_limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(
            handlers, codec=codec, status_details_codec=status_details_codec, config=config
        )
        self.stream_limits = StreamLimits() if stream_limits is None else stream_limits
        #: The request bytes all connections' streams hold, within max_process_buffer.
        self.budget = Budget(self.stream_limits.max_process_buffer, flag("max_process_buffer"))
        #: Every open connection, with the counts of the connection limits.
        self.connections = Connections(
            ConnectionLimits() if connection_limits is None else connection_limits
        )
        #: Told the messages of every stream, in batches (see ``stream.Counter``).
        self.counter: Counter | None = None
        self._listening: socket.socket | None = None  # start_on's socket
        self._ssl: _ssl.SSLContext | None = None
        self._ssl_handshake_timeout: float | None = None
        self._adopting: set[asyncio.Task[Any]] = set()  # see stop_listening

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = Handler(
            self._mapping,
            self._codec,
            self._status_details_codec,
            self.__dispatch__,
            limits=self.stream_limits,
            counter=self.counter,
            budget=Budget(
                self.stream_limits.max_connection_buffer, flag("max_connection_buffer"), self.budget
            ),
        )
        self._handlers.add(handler)
        return Connection(handler, self._config, self._h2_config, self.connections)

    def close(self) -> None:
        """Stop listening and cancel every handler (grpclib's close), then close every
        connection once what it holds is written (``Connections.close``)."""
        super().close()
        self.connections.close()

    async def wait_closed(self) -> None:
        """Once :meth:`close` was called: wait a moment for the connections to end
        (``Connections.wait_closed``; those whose peer does not read are aborted), end
        TLS handshakes still under way (Python 3.13+; before, their handshake timeout
        does), then wait for the handlers as grpclib does."""
        if self._server is None or self._server_closed_fut is None:
            raise RuntimeError("Server is not started")
        await self._server_closed_fut
        await self.connections.wait_closed()
        abort_clients = getattr(self._server, "abort_clients", None)
        if abort_clients is not None:
            abort_clients()
        await super().wait_closed()

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
        self._listening = sock
        self._ssl, self._ssl_handshake_timeout = ssl, ssl_handshake_timeout

    def serve_from(
        self, listener: Callable[[Callable[[], asyncio.Protocol]], asyncio.AbstractServer]
    ) -> None:
        """Serve the connections that ``listener(protocol_factory)`` sets up with the
        factory it is given, instead of a listening socket of this process's own (a
        worker's ``handoff.Receiver``); its ``close()`` is :meth:`stop_listening`'s."""
        if self._server is not None:
            raise RuntimeError("Server is already started")
        self._server = listener(self._protocol_factory)
        self._server_closed_fut = asyncio.get_running_loop().create_future()

    def shut(self) -> bool:
        """Start no new handshake on the listening socket (``listening.shut``), before
        :meth:`stop_listening`; False if not (no socket of its own, not Linux)."""
        if self._listening is None or self._server is None:
            return False
        return shut(self._listening)

    def stop_listening(self) -> None:
        """Refuse new connections; open ones and their streams carry on.

        The connections the kernel has completed but asyncio not yet accepted (the
        listen backlog) are accepted first and served like the others, and so get
        the drain's GOAWAYs: closing the socket would reset them, and a client that
        had sent its request on one (nginx does at once) would see it fail, where a
        refused connection or stream is tried again elsewhere. Call :meth:`shut`
        ``listening.SETTLE`` s before: else a connection completed between the last
        accept() and the close, or a handshake still under way, would be reset too.
        """
        if self._server is None:
            return
        backlog: list[socket.socket] = []
        listening = self._listening
        if listening is not None and listening.fileno() != -1:
            listening.setblocking(False)  # asyncio's already; an accept must not wait
            while True:
                try:
                    conn, _ = listening.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # too many open files, say: those left are reset
                    break
                backlog.append(conn)
        self._server.close()  # at once after the sweep: no await in between
        loop = asyncio.get_running_loop()
        for conn in backlog:
            conn.setblocking(False)
            task = loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                self._protocol_factory,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self._ssl_handshake_timeout if self._ssl else None,
            )
        except (TimeoutError, OSError):  # reset by then, or no TLS handshake
            conn.close()

    async def adopted(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the connections :meth:`stop_listening` took from
        the backlog to be made (TLS ones that take longer are refused when they are:
        the server is draining by then)."""
        if self._adopting:
            await asyncio.wait(list(self._adopting), timeout=timeout)
