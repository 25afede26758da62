"""Typed asyncio client for NumberService.

    async with NumberClient("127.0.0.1", 50051, timeout=5) as client:
        async for total in client.accumulate([1, 2, 3]):
            print(total)                      # 1, 3, 6
        async with client.session() as session:
            await session.add(10)             # 10
            await session.add(-4)             # 6

Every failure of the call is a :class:`grpclib.exceptions.GRPCError`: the server's
status, or DEADLINE_EXCEEDED / UNAVAILABLE made here from a timeout or a lost
connection. Numbers outside int32 raise ValueError and are never sent.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl as _ssl  # the parameter of NumberClient is called ssl, as in grpclib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline

from number_service_gen.tutorial import NumberRequest, NumberResponse

from .accumulator import check_int32
from .codec import NumberCodec
from .service import ACCUMULATE_NUMBERS
from .serving import tracing
from .serving.grpclib_ext.client import goaway_received, servers_status
from .serving.run import DEFAULT_HOST, DEFAULT_PORT

Metadata = Mapping[str, str | bytes] | Collection[tuple[str, str | bytes]]
Numbers = Iterable[int] | AsyncIterable[int]
_Call = Stream[NumberRequest, NumberResponse]

# Sums received but not yet taken by the caller; beyond this HTTP/2 flow control
# pushes back on the server instead of this process buffering without bound.
_READ_AHEAD = 64
_YIELD_EVERY = 32  # requests sent between two turns given to the event loop
_REPLAY_MAX = 1024  # numbers of an iterable kept to replay an unanswered call


@dataclass(frozen=True)
class Retry:
    """Retry connecting, with exponential backoff, while the server cannot be reached.

    Errors that trying again cannot mend end the call at once: TLS failures (a
    certificate the client does not trust, say) and a host name that does not
    resolve, unless the resolver reports a temporary failure (EAI_AGAIN).

    Only connecting is retried: a call is never sent again because of ``Retry``.
    (With or without it, ``accumulate`` sends a call again once when its connection
    ended before the server answered anything: see :meth:`NumberClient.accumulate`.)
    """

    attempts: int = 10
    initial_backoff: float = 0.1  # seconds before the second attempt
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """The waits between attempts, each jittered by up to 20% either way."""
        delay = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_backoff) * random.uniform(0.8, 1.2)
            delay *= self.multiplier


class NumberClient:
    """A connection to a NumberService server; use it as an async context manager."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        retry: Retry | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        """``retry``: keep trying to connect, e.g. while the server starts; without
        it, a server that cannot be reached is UNAVAILABLE at once. ``ssl``: connect
        with TLS, e.g. ``ssl=tls.client_context(ca="ca.pem")``; ``host`` must then be
        a name or IP address the server's certificate is issued for."""
        self._host, self._port = host, port
        self._ssl = ssl
        self._channel: Channel | None = None  # made on first use, inside the event loop
        self._owns_channel = True
        self._target = f"{host}:{port}"
        self.timeout = timeout
        self.metadata = metadata
        self.retry = retry

    @classmethod
    def over(
        cls,
        channel: Channel,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> NumberClient:
        """A client on a channel the caller owns (e.g. ``grpclib.testing.ChannelFor``)."""
        client = cls.__new__(cls)
        client._channel = channel
        client._owns_channel = False
        client._host, client._port = "", 0
        client._ssl = None
        client._target = repr(channel)
        client.timeout = timeout
        client.metadata = metadata
        client.retry = None
        return client

    async def __aenter__(self) -> NumberClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def channel(self) -> Channel:
        """The grpclib Channel that carries this client's calls."""
        if self._channel is None:
            self._channel = Channel(self._host, self._port, ssl=self._ssl, codec=NumberCodec())
        return self._channel

    def close(self) -> None:
        """Close the connection, if this client opened it."""
        if self._owns_channel and self._channel is not None:
            self._channel.close()

    async def accumulate(
        self,
        numbers: Numbers,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncGenerator[int, None]:
        """Stream ``numbers`` to the server and yield each running sum as it arrives.

        Sending and receiving overlap: numbers are read from ``numbers`` only as
        they are sent, never collected first. A sequence is checked whole before
        anything is sent; any other iterable is checked number by number, and the
        call is cancelled at the first bad one.

        To stop early, close the generator (``async with contextlib.aclosing(...)``):
        that cancels the call at once, where a mere ``break`` leaves it to the
        garbage collector.

        Sent again, once, on a new connection (with or without ``retry``, within
        the same deadline) only if the connection ended before the server answered
        anything on the call, as gRPC's transparent retry does, and only if the
        numbers can be had again (see ``_replayable``). A call that had an answer
        is never sent again: it fails UNAVAILABLE after the sums that came.
        """
        if isinstance(numbers, range):
            for num in (*numbers[:1], *numbers[-1:]):  # its bounds say it all
                check_int32(num)
        elif isinstance(numbers, (list, tuple)):
            for num in numbers:
                check_int32(num)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else Deadline.from_timeout(timeout)
        for attempt in (1, 2):
            sent: list[int] = []  # what this attempt sent, while it may be replayed
            sender: asyncio.Task[bool] | None = None
            try:
                async with self._call(timeout, metadata, deadline) as call:
                    inbox: asyncio.Queue[int | BaseException | None] = asyncio.Queue(_READ_AHEAD)
                    sender = asyncio.create_task(_send_all(call, numbers, inbox, sent))
                    receiver = asyncio.create_task(_receive_all(call, inbox))
                    try:
                        while (item := await inbox.get()) is not None:
                            if isinstance(item, BaseException):
                                raise item
                            yield item
                        if not sender.done() or not sender.result():
                            raise _ended_early()
                    finally:
                        for task in (sender, receiver):
                            task.cancel()
                        await asyncio.gather(sender, receiver, return_exceptions=True)
                return
            except _UnansweredError:
                replay = _replayable(numbers, sent, sender)
                if attempt == 2 or replay is None:
                    raise
                numbers = replay  # once, on a new connection (grpclib makes one)

    @asynccontextmanager
    async def session(
        self,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[Session]:
        """One stream for lock-step use: ``await session.add(n)`` returns the new sum.

        ``add`` raises the stream's end (a GRPCError: the server's status, a lost
        connection, the deadline) as soon as it meets it. Leaving the block
        half-closes the stream and waits for the server's OK; after an ``add``
        that raised, there is nothing left to wait for, and leaving is quiet.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else Deadline.from_timeout(timeout)
        try:
            async with self._call(timeout, metadata, deadline) as call:
                session = Session(call, lambda err: self._status_for(err, timeout, deadline, call))
                yield session
                await session.close()
        except _AlreadyRaisedError:
            pass

    @asynccontextmanager
    async def _call(
        self,
        timeout: float | None,
        metadata: Metadata | None,
        deadline: Deadline | None = None,
    ) -> AsyncIterator[_Call]:
        """Open one AccumulateNumbers stream; map transport failures to gRPC statuses.

        ``deadline`` (else one from ``timeout``) lets a retried call spend the first
        attempt's deadline rather than start a new one.
        """
        timeout = self.timeout if timeout is None else timeout
        if deadline is None and timeout is not None:
            deadline = Deadline.from_timeout(timeout)
        in_body = False
        call: _Call | None = None
        try:
            if self.retry is not None:  # retrying spends the call's deadline too
                async with asyncio.timeout(deadline.time_remaining() if deadline else None):
                    await self._connect(self.retry)
            async with tracing.request(  # a CLIENT span, when tracing is on
                self.channel,
                ACCUMULATE_NUMBERS,
                Cardinality.STREAM_STREAM,
                NumberRequest,
                NumberResponse,
                deadline=deadline,
                metadata=self.metadata if metadata is None else metadata,
            ) as call:
                await call.send_request()
                in_body = True
                yield call
                in_body = False
        except GRPCError:
            raise
        except Exception as err:
            if in_body and not getattr(err, _TRANSPORT, False):
                raise  # the caller's own error (or its input's): not ours to relabel
            raise self._status_for(err, timeout, deadline, call) from err

    def _status_for(
        self,
        err: Exception,
        timeout: float | None,
        deadline: Deadline | None,
        call: _Call | None,
    ) -> GRPCError:
        """The gRPC status for a failure of the transport under ``call`` (None: it
        failed before the stream was made)."""
        if isinstance(err, TimeoutError) or (deadline and not deadline.time_remaining()):
            return GRPCError(Status.DEADLINE_EXCEEDED, f"deadline of {timeout} s exceeded")
        if isinstance(err, StreamTerminatedError):
            reason = str(err)
            if reason == _LOST and goaway_received(call):
                reason = "the server closed the connection with a GOAWAY"  # not "lost"
            message = f"stream to {self._target} cut off: {reason}"
            if call is not None and call.initial_metadata is not None:
                return GRPCError(Status.UNAVAILABLE, message)  # answered: never retried
            if not reason.startswith(_CONNECTION_ENDS):
                return GRPCError(Status.UNAVAILABLE, message)
            if reason == _LOST:
                # A TLS server drops a plaintext connection, and an mTLS server one
                # whose certificate it refuses, with no word the client can read.
                # Not after a GOAWAY: a server that sends one speaks our protocol.
                if self._ssl is not None:
                    message += (
                        " (an mTLS server drops connections without a certificate it accepts)"
                    )
                elif self._owns_channel:
                    message += " (if the server uses TLS, connect with TLS)"
            return _UnansweredError(Status.UNAVAILABLE, message)
        if isinstance(err, socket.gaierror):
            return GRPCError(
                Status.UNAVAILABLE,
                f"cannot reach {self._target}: cannot resolve {self._host!r}: {err.strerror}",
            )
        if isinstance(err, _ssl.SSLError):
            return GRPCError(
                Status.UNAVAILABLE, f"cannot reach {self._target}: TLS handshake failed: {err}"
            )
        if isinstance(err, OSError):
            return GRPCError(Status.UNAVAILABLE, f"cannot reach {self._target}: {err}")
        return GRPCError(
            Status.INTERNAL,
            f"HTTP/2 failure talking to {self._target}: {type(err).__name__}: {err}",
        )

    async def _connect(self, retry: Retry) -> None:
        delays = retry.delays()
        while True:
            try:
                await self.channel.__connect__()
                return
            except OSError as err:
                delay = None if _hopeless(err) else next(delays, None)
                if delay is None:
                    raise
                await asyncio.sleep(delay)


# getaddrinfo's errors that say the resolver is in trouble, not that the name is
# unknown: worth trying again. Any other (EAI_NONAME, EAI_NODATA ...) is an answer.
_RESOLVER_TROUBLE = frozenset({socket.EAI_AGAIN, socket.EAI_MEMORY, socket.EAI_SYSTEM})


def _hopeless(err: OSError) -> bool:
    """Whether connecting again cannot help: a TLS failure (a certificate that is
    not trusted or not for this host, a server that does not speak TLS), or a host
    name that does not resolve."""
    if isinstance(err, _ssl.SSLError):
        return True
    return isinstance(err, socket.gaierror) and err.errno not in _RESOLVER_TROUBLE


class Session:
    """A stream driven one number at a time; made by :meth:`NumberClient.session`."""

    def __init__(self, call: _Call, status_for: Callable[[Exception], GRPCError]) -> None:
        """``status_for``: the gRPC status for a failure of the transport under ``call``."""
        self._call = call
        self._status_for = status_for
        self._closed = False
        self._ended: GRPCError | None = None  # the stream's end, once add() has raised it

    async def add(self, num: int) -> int:
        """Send ``num`` and wait for the running sum that answers it.

        Raises GRPCError when the stream has ended: the server's status and message
        (OUT_OF_RANGE when the sum would leave int32), or UNAVAILABLE,
        DEADLINE_EXCEEDED; later calls raise RuntimeError.
        """
        check_int32(num)
        if self._closed:
            raise RuntimeError("session is closed")
        try:
            await self._call.send_message(NumberRequest(num=num))
            response = await self._call.recv_message()
            if response is None:
                raise _ended_early()
        except Exception as err:
            self._closed = True
            self._ended = self._status(err)
            raise self._ended from err
        return response.sum

    async def close(self) -> None:
        """Half-close the stream and wait for the server's final status."""
        if self._ended is not None:
            raise _AlreadyRaisedError
        if not self._closed:
            self._closed = True
            try:
                await self._call.end()
                # Also reads the response headers, which a session with no add() lacks.
                if await self._call.recv_message() is not None:
                    raise GRPCError(Status.INTERNAL, "server answered a request never sent")
                await self._call.recv_trailing_metadata()
            except Exception as err:
                raise self._status(err) from err

    def _status(self, err: Exception) -> GRPCError:
        """The status ``err`` means: for a stream that ended, the server's, if it
        sent one (as grpclib's own Stream.__aexit__ decides), else the transport's;
        a deadline that passed is DEADLINE_EXCEEDED, whatever came meanwhile."""
        if isinstance(err, GRPCError):
            return err
        if isinstance(err, StreamTerminatedError) and (status := servers_status(self._call)):
            return status
        return self._status_for(err)


class _AlreadyRaisedError(Exception):
    """Leaves a session's block quietly: add() has raised the stream's end already,
    so there is no status left to wait for (grpclib would wait for trailers again)."""


# grpclib's reasons for ending every stream of a connection (grpclib.protocol).
_LOST = "Connection lost"
_CONNECTION_ENDS = (_LOST, "Received GOAWAY frame", "the server closed the connection")


class _UnansweredError(GRPCError):
    """UNAVAILABLE for a call whose connection ended (lost, or GOAWAY) before the
    server sent anything on the call's stream.

    Such a call is retried once on a new connection, as grpcio and grpc-go retry
    streams a server never processed: typically the server closed an idle
    connection (``--idle-timeout``) just as the call started. Replaying it is safe
    even if the server did see it: the running sum lives in the stream, which the
    connection took with it, and the caller has been given no sum yet.
    """


def _replayable(
    numbers: Numbers, sent: list[int], sender: asyncio.Task[bool] | None
) -> Numbers | None:
    """The numbers to send again for a retry, or None if they cannot all be had.

    A sequence is simply sent again, and so is anything not read yet (the call
    failed at its opening). Any other iterable only if every number was taken
    from it and sent (what is in ``sent``): a half-read iterator cannot be rewound.
    """
    if sender is None or isinstance(numbers, (list, tuple, range)):
        return numbers
    if sender.done() and not sender.cancelled() and sender.result() and len(sent) < _REPLAY_MAX:
        return sent
    return None


# Marks an exception that grpclib raised under a call, as opposed to one of the
# caller's own passing through the call's block: only the former becomes a status.
_TRANSPORT = "_number_service_transport"


def _ended_early() -> StreamTerminatedError:
    """Raised in the grpclib stream's block when the server ended the stream first;
    grpclib then replaces it with the server's status, if that is not OK."""
    err = StreamTerminatedError("server ended the stream before the client finished")
    setattr(err, _TRANSPORT, True)
    return err


async def _numbers(numbers: Numbers) -> AsyncIterator[int]:
    if isinstance(numbers, AsyncIterable):
        async for num in numbers:
            yield check_int32(num)
    else:
        for num in numbers:
            yield check_int32(num)


async def _send_all(
    call: _Call,
    numbers: Numbers,
    inbox: asyncio.Queue[int | BaseException | None],
    sent: list[int],
) -> bool:
    """Send every number, then half-close; True once half-closed. The numbers sent
    go into ``sent`` (up to ``_REPLAY_MAX`` of them, for a retry).

    A bad number or a failing ``numbers`` iterator is reported through ``inbox``.
    A failed send only returns False: the stream is gone, and the receiver reports
    why (the server's status, or the lost connection).
    """
    count = 0
    try:
        async for num in _numbers(numbers):
            try:
                await call.send_message(NumberRequest(num=num))
            except Exception:
                return False
            if len(sent) < _REPLAY_MAX:
                sent.append(num)
            count += 1
            if count % _YIELD_EVERY == 0:
                # Sends complete without suspending while the peer's window is
                # open (4 MiB by default): give the receiver its turn.
                await asyncio.sleep(0)
    except Exception as err:
        await inbox.put(err)
        return False
    try:
        await call.end()
    except Exception:
        return False
    return True


async def _receive_all(call: _Call, inbox: asyncio.Queue[int | BaseException | None]) -> None:
    """Put each sum into ``inbox``, then None at the end of the stream, or the error."""
    try:
        async for response in call:
            await inbox.put(response.sum)
    except Exception as err:
        setattr(err, _TRANSPORT, True)
        await inbox.put(err)
    else:
        await inbox.put(None)
