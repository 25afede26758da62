"""Write coalescing: the HTTP/2 frames a server produces in one event-loop turn go
out in one socket send.

grpclib writes to the transport after every frame it builds, so a stream that
answers 32 buffered requests makes 32 ``send`` system calls, ~11% of the
server's CPU on a pipelined stream. :class:`CoalescingTransport` collects the
writes of one loop iteration and hands them to the real transport together at
the start of the next (``loop.call_soon``): the same bytes in the same order,
at most one loop turn later. Flow control is untouched: the real transport
still calls ``pause_writing``/``resume_writing`` on the protocol.

While the protocol handles a read (:meth:`CoalescingTransport.hold`, then
:meth:`~CoalescingTransport.release`), the send is scheduled only at its end,
after the stream handlers the read woke: what the read made h2 write (a PING ACK,
a WINDOW_UPDATE) and the handlers' answers then leave in one send, in the turn
after the read. Before, the PING ACK that grpc-go's BDP estimator asks for with
each request went out first, alone, and the answer a turn later: per lock-step
message two sends instead of one, and a loop turn more (a cProfile of the bench's
ping-pong mode: 3.0 turns per message before, 2.5 after; docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

#: ``watch(data, unsent)``: told each chunk written to the socket's transport, and
#: what that transport's buffer holds after it (not 0: the peer is not reading).
Watch = Callable[[bytes, int], None]


class CoalescingTransport(asyncio.Transport):
    """A transport that buffers ``write`` until the next loop turn, then sends once."""

    def __init__(self, transport: asyncio.Transport, watch: Watch | None = None) -> None:
        super().__init__()
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._watch = watch
        self._linger = False  # close() only half-closes: see linger()
        self._closing = False  # half-closed by close(): nothing more is written
        self._scheduled = False  # a _flush is on the loop's ready queue
        self._held = False  # a read is being handled: see hold()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._scheduled and not self._held:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def hold(self) -> None:
        """A read is being handled: what it writes waits for :meth:`release`."""
        self._held = True

    def release(self) -> None:
        """The read is handled: send what it wrote at the next loop turn, after the
        callbacks scheduled so far (the handlers it woke), so that what they write
        meanwhile goes in the same send."""
        self._held = False
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        transport = self._transport
        if not self._closing and not transport.is_closing():
            transport.write(data)
            if self._watch is not None:
                self._watch(data, transport.get_write_buffer_size())

    def linger(self) -> None:
        """Make :meth:`close` send what is written and then a FIN, and go on reading
        (the protocol drops what comes, and closes, or aborts, later). A client still
        sending when a socket is closed gets a TCP RST, which may destroy the GOAWAY
        before it reads it (nginx's "lingering close"). Not under TLS."""
        self._linger = True

    def close(self) -> None:
        self._flush()  # a GOAWAY written just before closing still goes out
        transport = self._transport
        if self._linger and transport.can_write_eof() and not transport.is_closing():
            self._closing = True
            try:
                transport.write_eof()
            except OSError:  # the peer is gone already (reset)
                transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

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
