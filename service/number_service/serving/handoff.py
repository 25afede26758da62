"""Accepted connections handed from the supervisor to its workers, over a Unix socket.

With ``--workers N`` the supervisor accepts every connection and hands the socket
to the worker :class:`~.balance.Balancer` picks, as SCM_RIGHTS ancillary data
(``socket.send_fds``) on that worker's channel: one ``SOCK_SEQPACKET`` socket pair
per worker process, its end in the worker named by ``<NAME>_WORKER_CHANNEL``. What
goes over it, one byte per event:

- supervisor to worker: :data:`HAND` with one socket, a connection to serve;
- worker to supervisor: :data:`CLOSED`, one of the connections handed to it closed
  (a TLS handshake that failed included); :data:`DRAINING`, it takes no more (a socket
  it gets from then on is closed at once, and reported closed).

:class:`Handoff` is the supervisor's end, :class:`Receiver` the worker's; the
worker's server serves what the Receiver hands it (``grpclib_ext.Server.serve_from``).
Why not SO_REUSEPORT: the kernel picks a listener by a hash of each connection's
addresses and ports, so 4 connections over 2 workers land 3/1 or 4/0 more often
than 2/2, and a worker with twice the connections has twice the work.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Callable

HAND = b"h"  # supervisor to worker: a connection (one fd) to serve
CLOSED = b"c"  # worker to supervisor: one connection it was handed has closed
DRAINING = b"d"  # worker to supervisor: send no more
BATCH = 64  # messages read, or connections accepted, per wake-up at most

log = logging.getLogger(__name__)


def channel_env(name: str) -> str:
    """The environment variable naming a worker's end of its channel (a descriptor
    number), for application ``name``: ``MY_APP_WORKER_CHANNEL`` for ``my-app``."""
    return name.upper().replace("-", "_") + "_WORKER_CHANNEL"


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A new channel: (the supervisor's end, non-blocking; the worker's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


class Handoff:
    """The supervisor's end of one worker's channel: hands it sockets, hears its reports.

    ``on_closed(count)`` and ``on_draining()`` are called as the worker reports; a
    socket the channel cannot take at once (the worker is slow to read) waits here,
    in order, and is sent when it can.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_closed: Callable[[int], None],
        on_draining: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._on_closed = on_closed
        self._on_draining = on_draining
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)
        self._closed = False

    def hand(self, conn: socket.socket) -> None:
        """Send ``conn`` to the worker, then close it here (the worker has its own)."""
        if self._closed:
            conn.close()
            return
        if self._waiting:
            self._waiting.append(conn)
            return
        if not self._send(conn):
            self._waiting.append(conn)
            self._loop.add_writer(self._sock.fileno(), self._flush)

    def _send(self, conn: socket.socket) -> bool:
        """True once ``conn`` is sent (or cannot ever be: the worker is gone); False to
        try again when the channel is writable."""
        try:
            socket.send_fds(self._sock, [HAND], [conn.fileno()])
        except BlockingIOError:
            return False
        except OSError:  # the worker is gone; its end closed
            pass
        conn.close()
        return True

    def _flush(self) -> None:
        while self._waiting:
            if not self._send(self._waiting[0]):
                return
            self._waiting.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def _read(self) -> None:
        for _ in range(BATCH):
            try:
                data = self._sock.recv(BATCH)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker's end closed: it is ending
                self._loop.remove_reader(self._sock.fileno())
                return
            closed = data.count(CLOSED)
            if closed:
                self._on_closed(closed)
            if DRAINING in data:
                self._on_draining()

    def close(self) -> None:
        """Stop; the sockets still waiting are closed (their clients see the connection go)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        while self._waiting:
            self._waiting.popleft().close()
        self._sock.close()


class _Counted(asyncio.Protocol):
    """A connection's protocol, passed through, that tells once when the connection is gone."""

    def __init__(self, inner: asyncio.Protocol, gone: Callable[[], None]) -> None:
        self.inner = inner
        self.made = False
        self._gone: Callable[[], None] | None = gone

    def report(self) -> None:
        """Say the connection is gone, once."""
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.report()


class Receiver(asyncio.AbstractServer):
    """The worker's end of its channel: serves every socket the supervisor hands over,
    each with a protocol from ``factory`` (under TLS, once its handshake is done within
    ``ssl_handshake_timeout`` s), and reports each one's close. An asyncio server in
    all a grpclib Server needs of one: ``close()`` stops taking connections (the
    drain), ``wait_closed()``."""

    def __init__(
        self,
        channel: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        *,
        ssl: _ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        self._channel = channel
        self._factory = factory
        self._ssl = ssl
        self._handshake_timeout = ssl_handshake_timeout if ssl is not None else None
        self._loop = asyncio.get_running_loop()
        self._serving = True
        self._reading = True
        self._unsent = bytearray()  # reports the channel could not take at once
        self._writing = False  # waiting for the channel to take them
        self._starting: set[asyncio.Task[None]] = set()  # connections being set up
        channel.setblocking(False)
        self._loop.add_reader(channel.fileno(), self._read)

    def _read(self) -> None:
        for _ in range(BATCH):
            try:
                data, fds, _, _ = socket.recv_fds(self._channel, BATCH, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:  # the supervisor is gone (stdin tells the worker too)
                self._stop_reading()
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)  # family, type and proto read from the fd
                if self._serving:
                    task = self._loop.create_task(self._serve(conn))
                    self._starting.add(task)
                    task.add_done_callback(self._starting.discard)
                else:
                    conn.close()
                    self._report(CLOSED)

    async def _serve(self, conn: socket.socket) -> None:
        counted: _Counted | None = None
        try:
            counted = _Counted(self._factory(), lambda: self._report(CLOSED))
            made = counted
            await self._loop.connect_accepted_socket(
                lambda: made, conn, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout
            )
        except BaseException as err:
            if isinstance(err, OSError):  # a failed TLS handshake, say: the client's doing
                # asyncio's own accept says nothing of these either (outside debug mode).
                log.debug("connection not set up: %r", err)
            elif isinstance(err, Exception):
                log.exception("cannot serve a connection handed over by the supervisor")
            conn.close()
            if counted is None:
                self._report(CLOSED)
            elif not counted.made:  # else its connection_lost reports it
                counted.report()
            if not isinstance(err, Exception):  # cancelled (the drain is over), say
                raise

    def _report(self, what: bytes) -> None:
        self._unsent += what
        if not self._writing:  # else the channel is full, and _flush runs when it is not
            self._flush()

    def _flush(self) -> None:
        while self._unsent:
            try:
                sent = self._channel.send(self._unsent[:BATCH])
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._channel.fileno(), self._flush)
                return
            except OSError:  # the supervisor is gone: no one to tell
                self._unsent.clear()
                break
            del self._unsent[:sent]
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._channel.fileno())

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._channel.fileno())

    # asyncio.AbstractServer

    def close(self) -> None:
        """Take no more connections: tell the supervisor (those it sends meanwhile are closed)."""
        if self._serving:
            self._serving = False
            self._report(DRAINING)

    async def wait_closed(self) -> None:
        """End the connections still being set up (TLS handshakes under way); the
        connections set up are the server's to close."""
        self.abort_clients()
        if self._starting:
            await asyncio.wait(list(self._starting))

    def close_clients(self) -> None:
        """As :meth:`abort_clients`: the connections set up are the server's to close."""
        self.abort_clients()

    def abort_clients(self) -> None:
        """End the connections still being set up (TLS handshakes under way)."""
        for task in list(self._starting):
            task.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Serving starts as the Receiver is made."""

    async def serve_forever(self) -> None:
        raise NotImplementedError("a worker's Receiver serves until close(); await that")

    def close_channel(self) -> None:
        """Close this end of the channel (the process is ending)."""
        self._stop_reading()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._channel.fileno())
        self._channel.close()


def channel_from_env(name: str) -> socket.socket | None:
    """This worker's end of its channel, if the supervisor gave it one."""
    value = os.environ.get(channel_env(name))
    if not value:
        return None
    return socket.socket(fileno=int(value))
