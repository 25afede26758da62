"""Write coalescing: the HTTP/2 frames a server produces in one event-loop turn go
out in one socket send.

grpclib writes to the transport after every frame it builds, so a stream that
answers 32 buffered requests makes 32 ``send`` system calls, ~11% of the
server's CPU on a pipelined stream. :class:`CoalescingTransport` collects the
writes of one loop iteration and hands them to the real transport together at
the start of the next (``loop.call_soon``): the same bytes in the same order,
at most one loop turn later. Flow control is untouched: the real transport
still calls ``pause_writing``/``resume_writing`` on the protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from grpclib.protocol import H2Protocol
from grpclib.server import Server


class CoalescingTransport(asyncio.Transport):
    """A transport that buffers ``write`` until the next loop turn, then sends once."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()  # a GOAWAY written just before closing still goes out
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()


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


class CoalescingServer(Server):
    """grpclib's Server, with each connection's writes coalesced per loop turn, and
    ``close()`` closing the connections too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live: set[_CoalescingProtocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib has no public hook for the connection protocol; this overrides
        # the private factory that Server.start passes to loop.create_server.
        plain = super()._protocol_factory()
        protocol = _CoalescingProtocol(plain.handler, plain.config, plain.h2_config)
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
