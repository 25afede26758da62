"""AccumulateNumbers in batches: every request already received is answered in one write.

The generated handler (betterproto over grpclib) costs, per message each way, one
grpclib ``Buffer`` read (two awaits: prefix and body), one grpclib event object and
dispatch, one ``send_data`` and so one HTTP/2 DATA frame through h2 and hyperframe:
~60% of the server's CPU on a busy stream. :class:`BatchedAccumulate` is a handler for
the same method that instead takes all the request bytes that have arrived, decodes
every whole message with the strict :func:`~number_service.codec.decode_int32_field`,
and sends the sums as one gRPC-framed buffer, one ``send_data`` (grpclib splits it to
the flow-control window and frame size, and waits for the window).

What a client sees is unchanged: each request is answered with the sum so far, in
order, as soon as it arrives (nothing waits to fill a batch: a lock-step client gets
a batch of one); an error sends the sums before it and then the same status and
message as the generated path; the idle timeout counts from the last whole request.
One difference, on purpose: an empty DATA frame inside a message is skipped, where
grpclib's ``Buffer.read`` takes it for the end of the stream.

``NumberServer.build`` uses it (its Streams counts the messages through
``count``); a plain ``Server([NumberService()])`` keeps the generated handler.
grpclib has no public API for reading what is buffered, so :func:`read_available`
uses the private fields of grpclib 0.4.9's ``protocol.Buffer``;
:func:`supported` checks they are there and the service falls back otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpclib import events
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import Buffer

from . import statuses
from .accumulator import Accumulator, SumOutOfRangeError
from .codec import PREFIX_SIZE, DecodeError, NumberCodec, decode_int32_field, encode_int32_field

# Messages answered per write at most, so that one stream cannot hog the loop: a
# reviewer measured a lock-step stream next to a pipelined flood at p50 13.7 ms with
# 512 and 2.1 ms with 32 (the generated path: 8.2 ms); the flood itself lost ~15%.
_BATCH = 64
_CUT_SHORT = "Received less data than expected"  # grpclib's words, from Buffer.read

#: ``count(received, sent)``: called with the messages of each batch, in the stream's task.
Counter = Callable[[int, int], None]
Handler = Callable[[Any], Awaitable[None]]


def supported() -> bool:
    """grpclib's Buffer still has the fields :func:`read_available` relies on."""
    probe = Buffer(lambda size: None)
    return all(hasattr(probe, name) for name in ("_unacked", "_acked", "_acked_size", "_eof"))


async def read_available(buffer: Buffer) -> tuple[bytes, int]:
    """Everything received on the HTTP/2 stream and not yet read, waiting for at least
    one byte; ``b""`` at the end of the stream.

    Also returns how many of those bytes come first and were given back already
    (left by an earlier ``Buffer.read``). Only padding's flow-control window is
    given back here otherwise: the caller gives back
    the bytes it returns as it reads messages from them (``buffer._ack_callback``),
    so that, as with ``Buffer.read``, the client's window reopens only for requests
    read, and not for a backlog waiting behind a blocked send.
    ``Buffer`` queues each DATA frame's payload with its flow-controlled size; the end
    of stream is a queued empty item with ``_eof`` set. Empty DATA frames are skipped.
    """
    chunks: list[bytes] = []
    padding = 0
    acked = buffer._acked_size  # left over by a Buffer.read (not ours), already acked
    if acked:
        chunks.extend(bytes(item.data) for item in buffer._acked)
        buffer._acked.clear()
        buffer._acked_size = 0
    queue = buffer._unacked
    while True:
        while not queue.empty():
            data, size, ack_size = queue.get_nowait()
            padding += ack_size - size
            if data:
                chunks.append(data)
        if chunks or buffer._eof:
            break
        if padding:  # padding only so far: give its window back before waiting
            buffer._ack_callback(padding)
            padding = 0
        data, size, ack_size = await queue.get()
        padding += ack_size - size
        if data:
            chunks.append(data)
    if padding:
        buffer._ack_callback(padding)
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), acked


def _framed(total: int) -> bytes:
    body = encode_int32_field(total)
    return b"\x00\x00\x00\x00" + bytes((len(body),)) + body  # a body is at most 11 bytes


class BatchedAccumulate:
    """The batched AccumulateNumbers handler of one server (see the module docstring)."""

    def __init__(
        self,
        *,
        idle_timeout: float | None = None,
        max_message_size: int | None = None,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self.count: Counter | None = None  # set by whoever tracks the streams
        # grpclib RecvMessage/SendMessage listeners that ``count`` stands in for; with
        # any other listener on the server, a stream gets the generated handler.
        self.replaces: tuple[Any, ...] = ()

    def handler(self, fallback: Handler) -> Handler:
        """The grpclib handler: batched when the server's codec is NumberCodec (whose
        bytes it writes itself), else ``fallback``, the generated one."""

        async def handle(stream: Any) -> None:
            # grpclib.server.Stream keeps its codec, HTTP/2 stream and events private.
            if type(stream._codec) is not NumberCodec or self._watched(stream._dispatch):
                await fallback(stream)
            else:
                await self._serve(stream)

        return handle

    def _watched(self, dispatch: Any) -> bool:
        """Someone listens to grpclib's per-message events, which this path does not
        send (grpclib keeps listeners in the private ``_listeners``)."""
        listeners = dispatch._listeners
        return any(
            callback not in self.replaces
            for kind in (events.RecvMessage, events.SendMessage)
            for callback in listeners.get(kind, ())
        )

    async def _serve(self, stream: Any) -> None:
        h2_stream = stream._stream
        buffer: Buffer = h2_stream.buffer
        connection = h2_stream.connection
        loop = asyncio.get_running_loop()
        idle_timeout = self.idle_timeout
        acc = Accumulator()
        # Received bytes, from pos on not yet part of a whole message. A bytearray,
        # trimmed in place: a large message arriving in many frames must not be
        # copied again with every frame.
        pending = bytearray()
        pos = 0
        unacked = 0  # bytes at the end of pending whose flow-control window is not given back
        headers_sent = False
        ended = False
        waited = False  # the loop had a turn since the last batch
        deadline = None if idle_timeout is None else loop.time() + idle_timeout
        try:
            while True:
                out, error, pos = self._parse(acc, pending, pos)
                read = pos - (len(pending) - unacked)
                if read > 0:  # window back for requests read, as Buffer.read does
                    buffer._ack_callback(read)
                    unacked -= read
                if not out and error is None:
                    if ended:
                        if pos < len(pending):  # Buffer.read's words for a message cut short
                            raise statuses.undecodable(_CUT_SHORT)
                        return
                    # No whole message left: wait for more (only here, never to fill a batch).
                    waited = waited or (buffer._unacked.empty() and not buffer._eof)
                    if unacked:  # part of a message, which may need the whole window
                        buffer._ack_callback(unacked)
                        unacked = 0
                    if deadline is None:
                        data, acked = await read_available(buffer)
                    else:
                        try:
                            async with asyncio.timeout_at(deadline):
                                data, acked = await read_available(buffer)
                        except TimeoutError:
                            assert idle_timeout is not None
                            raise statuses.idle(idle_timeout) from None
                    if data:
                        del pending[:pos]
                        pending += data
                        pos = 0
                        unacked = len(data) - acked
                    else:
                        ended = True
                    continue
                count = self.count
                if count is not None:
                    # A request that overflows was read whole, as in the generated path.
                    count(len(out) + (error is not None and error.status is Status.OUT_OF_RANGE), 0)
                if out:
                    if not headers_sent:
                        await stream.send_initial_metadata()
                        headers_sent = True
                    await h2_stream.send_data(b"".join(out))
                    # grpclib's per-connection figures, as its Stream.send_message keeps them
                    now = time.monotonic()
                    connection.messages_received += len(out)
                    connection.messages_sent += len(out)
                    connection.last_message_received = connection.last_message_sent = now
                    if count is not None:
                        count(0, len(out))
                    if idle_timeout is not None:
                        deadline = loop.time() + idle_timeout
                if error is not None:
                    raise error
                if not waited:
                    # Everything was there and the window open: no await above gave
                    # other streams a turn, so give them one now.
                    await asyncio.sleep(0)
                waited = False
        finally:
            # Bytes received and never read: the connection's window must get them
            # back (grpclib's release_stream does so only for what is still queued).
            if unacked and not connection.is_closing():
                buffer._ack_callback(unacked)

    def _parse(
        self, acc: Accumulator, pending: bytearray, pos: int
    ) -> tuple[list[bytes], GRPCError | None, int]:
        """Answer the whole messages in ``pending`` from ``pos`` (at most _BATCH):
        the framed sums, the error that stopped it if any, and where it stopped."""
        out: list[bytes] = []
        end = len(pending)
        max_size = self.max_message_size
        while end - pos >= PREFIX_SIZE and len(out) < _BATCH:
            if pending[pos]:  # grpclib checks the flag as soon as the prefix is in
                return out, statuses.compressed(), pos
            size = int.from_bytes(pending[pos + 1 : pos + PREFIX_SIZE], "big")
            if max_size is not None and size > max_size:  # decided before the body comes
                return out, statuses.too_large(size, max_size), pos
            start = pos + PREFIX_SIZE
            if end - start < size:
                break
            try:
                total = acc.add(decode_int32_field(pending[start : start + size]))
            except DecodeError as err:
                return out, statuses.undecodable(err), pos
            except SumOutOfRangeError as err:
                return out, statuses.out_of_range(err), pos
            pos = start + size
            out.append(_framed(total))
        return out, None, pos
