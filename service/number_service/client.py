"""Typed asyncio client for NumberService.

    async with NumberClient("127.0.0.1", 50051, timeout=5) as client:
        async for total in client.accumulate([1, 2, 3]):
            print(total)                      # 1, 3, 6
        async with client.session() as session:
            await session.add(10)             # 10
            await session.add(-4)             # 6

    NumberClient(["10.0.0.1:50051", "10.0.0.2:50051"])   # round robin over both

Every failure of the call is a :class:`grpclib.exceptions.GRPCError`: the server's
status, or DEADLINE_EXCEEDED / UNAVAILABLE made here from a timeout or a lost
connection. Numbers outside int32 raise ValueError and are never sent.

A stream's whole state is its sum, so a stream that is cut (a server draining or
killed, a connection lost) is carried on a new one: the last sum received is sent
as its first number, whose answer the caller never sees, then the numbers sent but
not answered, and the call goes on (see :class:`Resume`).
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
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline

from number_service_gen.tutorial import NumberRequest, NumberResponse

from .accumulator import check_int32
from .codec import NumberCodec
from .service import ACCUMULATE_NUMBERS
from .serving import tracing
from .serving.grpclib_ext import client as client_ext
from .serving.settings import DEFAULT_HOST, DEFAULT_PORT
from .targets import Address, Pool, Target, UnreachableError, parse_targets

Metadata = Mapping[str, str | bytes] | Collection[tuple[str, str | bytes]]
Numbers = Iterable[int] | AsyncIterable[int]
_Call = Stream[NumberRequest, NumberResponse]

# Sums received but not yet taken by the caller; beyond this HTTP/2 flow control
# pushes back on the server instead of this process buffering without bound.
_READ_AHEAD = 64
_YIELD_EVERY = 32  # requests sent between two turns given to the event loop
# Numbers sent and not yet answered, at most: what a cut stream sends again, kept here.
IN_FLIGHT = 4096


@dataclass(frozen=True)
class Retry:
    """Retry connecting, with exponential backoff, while the server cannot be reached.

    Errors that trying again cannot mend end the call at once: TLS failures (a
    certificate the client does not trust, say) and a host name that does not
    resolve, unless the resolver reports a temporary failure (EAI_AGAIN).

    Only connecting is retried: carrying a cut stream on a new one is :class:`Resume`'s.
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


@dataclass(frozen=True)
class Resume:
    """How a cut stream of ``session()`` or ``accumulate()`` is carried on a new one.

    A cut is the end of a stream that says nothing about its numbers: UNAVAILABLE
    from the server (a drain's grace period over, "server is shutting down"), the
    connection lost or closed (a server killed or restarted), the stream refused
    (REFUSED_STREAM, or above a GOAWAY's last stream id). Each new stream goes to
    another address where one is up; up to ``attempts`` of them in a row may end
    before the server has answered anything on them, the first at once, the next
    after a backoff (jittered by 20% either way), all within the call's deadline.
    An answer starts the count again.
    """

    attempts: int = 5
    initial_backoff: float = 0.1  # seconds before the second new stream
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def waits(self) -> Iterator[float]:
        """The wait before each new stream: 0, then growing."""
        delay = self.initial_backoff
        for index in range(self.attempts):
            if index == 0:
                yield 0.0
                continue
            yield min(delay, self.max_backoff) * random.uniform(0.8, 1.2)
            delay *= self.multiplier


def _policy(resume: bool | Resume) -> Resume | None:
    if isinstance(resume, Resume):
        return resume
    return Resume() if resume else None


class NumberClient:
    """Connections to one or more NumberService servers; use it as an async context manager."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_HOST,
        port: int | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        retry: Retry | None = None,
        ssl: _ssl.SSLContext | None = None,
        resume: bool | Resume = True,
    ) -> None:
        """``target``: a host with ``port`` (``NumberClient("127.0.0.1", 50051)``), or
        without it ``"host:port"`` (``"[::1]:50051"``), several of them in a list or
        separated by commas, or a host name that resolves to several addresses; a
        target without a port uses 50051. New calls go round robin over those whose
        connection is up.

        ``retry``: keep trying to connect, e.g. while the server starts; without it,
        a call that finds no server it can reach is UNAVAILABLE at once. ``ssl``:
        connect with TLS, e.g. ``ssl=tls.client_context(ca="ca.pem")``; each host
        must be a name or IP address the server's certificate is issued for.
        ``resume``: carry cut streams on new ones (see :class:`Resume`); False: no."""
        self._targets = parse_targets(target, port, DEFAULT_PORT)
        self._ssl = ssl
        self._pool: Pool | None = None  # made on first use, inside the event loop
        self._owns_channel = True
        self._name = ", ".join(map(str, self._targets))
        self._last: Address | None = None  # where the latest call went
        self.timeout = timeout
        self.metadata = metadata
        self.retry = retry
        self.resume = _policy(resume)

    @classmethod
    def over(
        cls,
        channel: Channel,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        resume: bool | Resume = True,
    ) -> NumberClient:
        """A client on a channel the caller owns (e.g. ``grpclib.testing.ChannelFor``);
        a cut stream is resumed on the same channel."""
        client = cls.__new__(cls)
        client._targets = []
        client._ssl = None
        client._name = repr(channel)
        client._pool = Pool.over(channel, client._name)
        client._owns_channel = False
        client._last = None
        client.timeout = timeout
        client.metadata = metadata
        client.retry = None
        client.resume = _policy(resume)
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
    def targets(self) -> list[str]:
        """The targets as given (``host:port``), in order."""
        return [str(target) for target in self._targets]

    @property
    def channel(self) -> Channel:
        """The grpclib Channel of this client's latest call (the channel of ``over``)."""
        if self._last is None:
            if self._pool is not None and not self._owns_channel:
                return self._pool.addresses[0].channel
            raise RuntimeError("no call has been made yet: there is no channel to show")
        return self._last.channel

    def close(self) -> None:
        """Close the connections, if this client opened them (a later call opens new
        ones). Streams still open end with UNAVAILABLE, and are not resumed."""
        if self._owns_channel and self._pool is not None:
            self._pool.close()
            self._pool = None

    def _new_channel(self, host: str, port: int, target: Target) -> Channel:
        """The one place this client makes its grpclib Channels: one per address.
        ``host`` is an address of ``target``; TLS checks the certificate against the
        target's host, and calls name it as their ``:authority``."""
        config = Configuration(ssl_target_name_override=target.host) if self._ssl else None
        return client_ext.make_channel(
            host,
            port,
            ssl=self._ssl,
            codec=NumberCodec(),
            config=config,
            authority=None if host == target.host else _authority(target),
        )

    async def accumulate(
        self,
        numbers: Numbers,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        resume: bool | Resume | None = None,
    ) -> AsyncGenerator[int, None]:
        """Stream ``numbers`` to the server and yield each running sum as it arrives.

        Sending and receiving overlap: numbers are read from ``numbers`` only as
        they are sent, never collected first (at most :data:`IN_FLIGHT` are sent
        ahead of their sums). A sequence is checked whole before anything is sent;
        any other iterable is checked number by number, and the call is cancelled
        at the first bad one.

        A cut stream is resumed on a new one (``resume``, the client's by default;
        see :class:`Resume`): every sum is yielded once, in order. To stop early,
        close the generator (``async with contextlib.aclosing(...)``): that cancels
        the call at once, where a mere ``break`` leaves it to the garbage collector.
        """
        if isinstance(numbers, range):
            for num in (*numbers[:1], *numbers[-1:]):  # its bounds say it all
                check_int32(num)
        elif isinstance(numbers, (list, tuple)):
            for num in numbers:
                check_int32(num)
        call = _CallInfo.make(self, timeout, metadata, resume)
        # Closed with this generator, at once: a nested generator left to the garbage
        # collector would cancel the call only later (after the client closed, say).
        async with aclosing(_Accumulation(self, call, numbers).sums()) as sums:
            async for total in sums:
                yield total

    @asynccontextmanager
    async def session(
        self,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        resume: bool | Resume | None = None,
    ) -> AsyncIterator[Session]:
        """One stream for lock-step use: ``await session.add(n)`` returns the new sum.

        ``add`` raises the stream's end (a GRPCError: the server's status, a lost
        connection that could not be resumed, the deadline) as soon as it meets it.
        Leaving the block half-closes the stream and waits for the server's OK;
        after an ``add`` that raised, there is nothing left to wait for, and leaving
        is quiet. A cut stream is resumed on a new one (see :class:`Resume`).
        """
        session = Session(self, _CallInfo.make(self, timeout, metadata, resume))
        await session._start()
        try:
            yield session
        except BaseException as err:
            await session._abandon(err)
            raise
        with suppress(_AlreadyRaisedError):
            await session.close()

    # --- one stream ----------------------------------------------------------------------

    async def _open(self, info: _CallInfo, avoid: Address | None, prefix: int | None) -> _Leg:
        """Open one AccumulateNumbers stream, on the next address that is up (another
        than ``avoid`` where there is one). Raises :class:`_OpenFailedError`."""
        try:
            address = await self._pick(info, avoid)
            self._last = address
            opening = tracing.request(  # a CLIENT span per stream, when tracing is on
                address.channel,
                ACCUMULATE_NUMBERS,
                Cardinality.STREAM_STREAM,
                NumberRequest,
                NumberResponse,
                deadline=info.deadline,
                metadata=self.metadata if info.metadata is None else info.metadata,
            )
            call = await opening.__aenter__()
        except Exception as err:
            raise _OpenFailedError(self._end_for(err, info, None)) from err
        leg = _Leg(address, opening, call, prefix)
        try:
            await call.send_request()
        except Exception as err:
            end = await self._finish(leg, info, err)
            assert end is not None
            raise _OpenFailedError(end) from err
        return leg

    async def _pick(self, info: _CallInfo, avoid: Address | None) -> Address:
        """An address whose connection is up: with ``retry``, trying again while none
        can be reached, all within the call's deadline."""
        if self._pool is None:
            self._pool = Pool(self._targets, self._new_channel)
        delays = self.retry.delays() if self.retry is not None else iter(())
        remaining = info.deadline.time_remaining() if info.deadline else None
        async with asyncio.timeout(remaining):
            while True:
                try:
                    return await self._pool.pick(avoid)
                except UnreachableError as err:
                    delay = None if err.hopeless else next(delays, None)
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)

    async def _finish(self, leg: _Leg, info: _CallInfo, err: Exception | None) -> _End | None:
        """Close ``leg``'s stream after ``err`` (None: after its last answer); None if
        it ended OK, else how it ended. grpclib reads the trailers here."""
        leg.over = True
        try:
            if err is None:
                await leg.opening.__aexit__(None, None, None)
                return None
            await leg.opening.__aexit__(type(err), err, err.__traceback__)
        except Exception as status:  # the server's status, read by grpclib
            err = status
        end = self._end_for(err, info, leg)
        if end.retire and self._pool is not None:
            self._pool.retire(leg.address)
        return end

    def _end_for(self, err: Exception, info: _CallInfo, leg: _Leg | None) -> _End:
        """What the caller should see for ``err``, raised by a call (``leg``: its
        stream, None if it failed before one was opened), and whether it is a cut."""
        call = leg.call if leg is not None else None
        deadline = info.deadline
        if isinstance(err, TimeoutError) or (deadline and not deadline.time_remaining()):
            message = f"deadline of {info.timeout} s exceeded"
            return _End(GRPCError(Status.DEADLINE_EXCEEDED, message))
        if not isinstance(err, GRPCError) and call is not None:
            # The server ended the stream with a status, then stopped the client's
            # sends (RST_STREAM): what failed after is not what happened.
            err = client_ext.servers_status(call) or err
        if isinstance(err, GRPCError):
            # UNAVAILABLE from the server: it goes away (a drain); its connection too.
            cut = err.status is Status.UNAVAILABLE
            return _End(err, resumable=cut, retire=cut)
        where = str(leg.address) if leg is not None else self._name
        if isinstance(err, StreamTerminatedError):
            reason = str(err)
            if client_ext.refused(err):
                message = f"stream to {where} refused: {reason}"
                return _End(GRPCError(Status.UNAVAILABLE, message), resumable=True, refused=True)
            if reason == _LOST and client_ext.goaway_received(call):
                reason = "the server closed the connection with a GOAWAY"  # not "lost"
            message = f"stream to {where} cut off: {reason}"
            ended = reason.startswith(_CONNECTION_ENDS)
            if reason == _LOST and (call is None or call.initial_metadata is None):
                # A TLS server drops a plaintext connection, and an mTLS server one
                # whose certificate it refuses, with no word the client can read.
                # Not after a GOAWAY: a server that sends one speaks our protocol.
                if self._ssl is not None:
                    message += (
                        " (an mTLS server drops connections without a certificate it accepts)"
                    )
                elif self._owns_channel:
                    message += " (if the server uses TLS, connect with TLS)"
            return _End(GRPCError(Status.UNAVAILABLE, message), resumable=ended)
        if isinstance(err, UnreachableError):
            return _End(
                GRPCError(Status.UNAVAILABLE, self._unreachable(err)), resumable=not err.hopeless
            )
        if isinstance(err, OSError):  # the connection went between the pick and the call
            message = f"cannot reach {where}: {_reason(err)}"
            return _End(GRPCError(Status.UNAVAILABLE, message), resumable=True)
        message = f"HTTP/2 failure talking to {where}: {type(err).__name__}: {err}"
        return _End(GRPCError(Status.INTERNAL, message))

    def _unreachable(self, err: UnreachableError) -> str:
        """One line for every address that could not be connected to."""
        if len(err.failures) == 1:
            target, address, cause = err.failures[0]
            return f"cannot reach {address or target}: {_reason(cause, target)}"
        details = "; ".join(
            f"{address or target}: {_reason(cause, target)}"
            for target, address, cause in err.failures
        )
        return f"cannot reach any of {self._name}: {details}"


def _authority(target: Target) -> str:
    return str(target)


def _reason(err: OSError, target: Target | None = None) -> str:
    if isinstance(err, socket.gaierror):
        host = target.host if target is not None else "the host"
        return f"cannot resolve {host!r}: {err.strerror}"
    if isinstance(err, _ssl.SSLError):
        return f"TLS handshake failed: {err}"
    return str(err)


@dataclass
class _CallInfo:
    """What one call of the client keeps across its streams."""

    timeout: float | None
    deadline: Deadline | None
    metadata: Metadata | None
    resume: Resume | None

    @classmethod
    def make(
        cls,
        client: NumberClient,
        timeout: float | None,
        metadata: Metadata | None,
        resume: bool | Resume | None,
    ) -> _CallInfo:
        timeout = client.timeout if timeout is None else timeout
        deadline = None if timeout is None else Deadline.from_timeout(timeout)
        policy = client.resume if resume is None else _policy(resume)
        return cls(timeout, deadline, metadata, policy)


@dataclass(eq=False)
class _Leg:
    """One stream of a call that may be carried on several."""

    address: Address
    opening: AbstractAsyncContextManager[_Call]  # what made ``call``, and ends it
    call: _Call
    prefix: int | None  # the sum sent first, whose answer the caller does not see
    next: int = 0  # the index (in the call's numbers) of the next number to send here
    primed: bool = False  # the prefix is sent
    ending: bool = False  # the sender is half-closing it
    half_closed: bool = False
    broken: bool = False  # a send failed: what failed shows on the receiving side
    over: bool = False  # closed
    answers: int = 0  # answers to the call's numbers (not the prefix)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one sender at a time


@dataclass(frozen=True)
class _End:
    """How a stream ended, for the caller: the error, and whether it is a cut that a
    new stream may carry on (``refused``: the server never processed it)."""

    error: GRPCError
    resumable: bool = False
    refused: bool = False
    retire: bool = False  # its connection should take no new calls


class _OpenFailedError(Exception):
    """A stream that could not even be opened, and how that ended."""

    def __init__(self, end: _End) -> None:
        super().__init__(end.error.message)
        self.end = end


class _Resumer:
    """The budget of one call's new streams: how many in a row without an answer,
    the waits between them, the call's deadline."""

    def __init__(self, info: _CallInfo) -> None:
        self._info = info
        self._waits: Iterator[float] | None = None
        self._cut: GRPCError | None = None  # what cut the stream being resumed
        self._tries = 0

    def progress(self) -> None:
        """An answer came: the next cut has the whole budget again."""
        if self._cut is not None:
            self._waits = None
            self._cut = None
            self._tries = 0

    async def again(self, end: _End, *, fresh: bool, opening: bool = False) -> None:
        """Return once a new stream may be opened after ``end``; raise the error that
        ends the call if none may.

        ``fresh``: the call has had no answer yet, so a refused stream is sent again
        even with resuming off, as gRPC clients do for streams the server never
        processed. ``opening``: ``end`` is a stream that could not be opened, which
        is tried again only while resuming (connecting again is ``Retry``'s).
        """
        policy = self._info.resume
        if policy is None and end.refused and fresh:
            policy = Resume()
        if end.error.status is Status.DEADLINE_EXCEEDED and self._cut is not None:
            raise self._deadline_passed()  # while a new stream was being opened
        if policy is None or not end.resumable or (opening and self._cut is None):
            raise end.error
        if self._waits is None or self._cut is None:
            self._cut = end.error
            self._waits = policy.waits()
        wait = next(self._waits, None)
        if wait is None:
            last = "" if end.error is self._cut else f"; the last: {end.error.message}"
            raise GRPCError(
                self._cut.status,
                f"{self._cut.message} (not resumed: {self._tries} new stream(s) failed{last})",
            )
        self._tries += 1
        deadline = self._info.deadline
        if deadline is not None and deadline.time_remaining() <= wait:
            await asyncio.sleep(deadline.time_remaining())
            raise self._deadline_passed()
        if wait:
            await asyncio.sleep(wait)

    def _deadline_passed(self) -> GRPCError:
        assert self._cut is not None
        return GRPCError(
            Status.DEADLINE_EXCEEDED,
            f"deadline of {self._info.timeout} s exceeded while resuming a stream: "
            f"{self._cut.message}",
        )


class _Accumulation:
    """One ``accumulate`` call: a sender and a receiver around the numbers sent and
    not yet answered, carried across the streams of the call."""

    def __init__(self, client: NumberClient, info: _CallInfo, numbers: Numbers) -> None:
        self._client = client
        self._info = info
        self._iterator: Iterator[int] | None = None
        self._async_iterator: AsyncIterator[int] | None = None
        if isinstance(numbers, AsyncIterable):
            self._async_iterator = aiter(numbers)
        else:
            self._iterator = iter(numbers)
        self._pending: list[int] = []  # numbers not answered, from index _offset on
        self._offset = 0  # the index (in the call's numbers) of _pending[0]
        self._read = 0  # numbers taken from the caller's
        self._answered = 0  # of them, answered
        self._base = 0  # the last sum received
        self._done = False  # every number is taken from the caller's
        self._sent = 0  # messages sent, on every stream
        self._leg: _Leg | None = None
        self._wake = asyncio.Event()  # for the sender: a new stream, or an answer
        self._inbox: asyncio.Queue[int | BaseException | None] = asyncio.Queue(_READ_AHEAD)

    async def sums(self) -> AsyncGenerator[int, None]:
        receiver = asyncio.create_task(self._receive_all())
        sender = asyncio.create_task(self._send_all())
        try:
            while (item := await self._inbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)

    async def _send_all(self) -> None:
        """Take each number from the caller's and send it on the live stream; at the
        end, half-close it. A failing ``numbers`` is reported through the inbox."""
        while True:
            self._wake.clear()
            leg = self._leg
            if leg is None or leg.broken or leg.ending:
                await self._wake.wait()  # for the next stream
                continue
            async with leg.lock:
                await self._catch_up(leg)
                # Then each new number as it comes, while this stream lasts. The lock
                # stays held: only this stream's resend task wants it, and what it
                # would send is sent already.
                while not (leg.broken or leg.ending or self._done) and leg is self._leg:
                    if self._read - self._answered >= IN_FLIGHT:
                        break
                    try:
                        num = await self._take()
                    except Exception as err:  # the caller's own (or its input's): as is
                        await self._inbox.put(err)
                        return
                    if num is None:
                        self._done = True
                        await self._catch_up(leg)  # the half-close
                        break
                    self._pending.append(num)
                    self._read += 1
                    if leg is self._leg:
                        await self._catch_up(leg)
            if self._read - self._answered >= IN_FLIGHT and leg is self._leg:
                await self._wake.wait()  # for answers

    async def _take(self) -> int | None:
        """The caller's next number, checked; None after the last."""
        if self._iterator is not None:
            num = next(self._iterator, _END)
        else:
            assert self._async_iterator is not None
            num = await anext(self._async_iterator, _END)
        return None if num is _END else check_int32(num)

    async def _catch_up(self, leg: _Leg) -> None:
        """Send on ``leg`` what it lacks: its prefix, every number taken and not yet
        sent on it, and the half-close once every number is taken (the caller holds
        ``leg.lock``). The sender calls it for each new number; the receiver, for a
        new stream, in a task of its own (the sender may be waiting for the caller's
        next number meanwhile). A failed send marks the stream broken: the receiver
        meets the same end and says what it is."""
        try:
            if leg.broken or leg.ending:
                return
            if leg.prefix is not None and not leg.primed:
                leg.primed = True
                await leg.call.send_message(NumberRequest(num=leg.prefix))
            while leg.next < self._read:
                num = self._pending[leg.next - self._offset]
                leg.next += 1
                await leg.call.send_message(NumberRequest(num=num))
                self._sent += 1
                if self._sent % _YIELD_EVERY == 0:
                    # Sends complete without suspending while the peer's window is
                    # open (4 MiB by default): give the receiver its turn.
                    await asyncio.sleep(0)
            if self._done:
                leg.ending = True
                await leg.call.end()
                leg.half_closed = True
        except Exception:
            leg.broken = True

    async def _resend(self, leg: _Leg) -> None:
        """What a new stream is sent first: its prefix and the numbers not answered."""
        async with leg.lock:
            await self._catch_up(leg)

    async def _receive_all(self) -> None:
        """Open streams and read their sums into the inbox, resuming cut streams;
        then None, or the error that ends the call."""
        client, info = self._client, self._info
        resumer = _Resumer(info)
        avoid: Address | None = None
        try:
            while True:
                try:
                    leg = await client._open(info, avoid, self._base or None)
                except _OpenFailedError as failed:
                    await resumer.again(failed.end, fresh=self._answered == 0, opening=True)
                    continue
                leg.next = self._answered
                self._leg = leg
                self._wake.set()
                resend = asyncio.create_task(self._resend(leg))
                try:
                    end = await self._run(leg, resumer)
                finally:
                    resend.cancel()
                    await asyncio.gather(resend, return_exceptions=True)
                if end is None:
                    await self._inbox.put(None)
                    return
                avoid = leg.address
                await resumer.again(end, fresh=self._answered == 0)
        except Exception as err:  # the call's end (a GRPCError), for the caller
            await self._inbox.put(err)

    async def _run(self, leg: _Leg, resumer: _Resumer) -> _End | None:
        """Read ``leg``'s sums to its end; None if the call is done, else how it ended."""
        error: Exception | None = None
        try:
            await self._receive(leg, resumer)
        except asyncio.CancelledError as err:  # the call is over: cancel the stream
            leg.broken = leg.over = True
            await leg.opening.__aexit__(type(err), err, err.__traceback__)
            raise
        except Exception as err:
            error = err
        leg.broken = True
        self._wake.set()
        if error is None and not leg.half_closed:
            error = _ended_early()  # grpclib puts the server's status in its place, if any
        end = await self._client._finish(leg, self._info, error)
        if end is None and not self._finished():  # answers missing, and OK
            end = self._client._end_for(_ended_early(), self._info, leg)
        return end

    async def _receive(self, leg: _Leg, resumer: _Resumer) -> None:
        """Read ``leg``'s answers until its end: the prefix's first, unseen."""
        expect_prefix = leg.prefix is not None
        async for response in leg.call:
            total = response.sum
            if expect_prefix:
                expect_prefix = False
                _check_prefix(total, leg)
                continue
            if self._answered >= self._read:
                raise GRPCError(Status.INTERNAL, "server answered a request never sent")
            self._answered += 1
            if self._answered - self._offset > 1024 and self._answered - self._offset > (
                len(self._pending) // 2
            ):
                del self._pending[: self._answered - self._offset]
                self._offset = self._answered
            self._base = total
            leg.answers += 1
            resumer.progress()
            self._wake.set()
            await self._inbox.put(total)

    def _finished(self) -> bool:
        return self._done and self._answered == self._read


def _check_prefix(total: int, leg: _Leg) -> None:
    """The answer to a resumed stream's first number, the sum so far, must be it."""
    if total != leg.prefix:
        raise GRPCError(
            Status.INTERNAL,
            f"a resumed stream answered {total} to its first number, the sum so far {leg.prefix}",
        )


class Session:
    """A stream driven one number at a time; made by :meth:`NumberClient.session`."""

    def __init__(self, client: NumberClient, info: _CallInfo) -> None:
        self._client = client
        self._info = info
        self._leg: _Leg | None = None
        self._base = 0  # the last sum received
        self._answered = 0
        self._closed = False
        self._ended: GRPCError | None = None  # the stream's end, once add() has raised it
        self._resumer = _Resumer(info)

    async def _start(self) -> None:
        try:
            self._leg = await self._client._open(self._info, None, None)
        except _OpenFailedError as failed:
            raise failed.end.error from failed

    async def add(self, num: int) -> int:
        """Send ``num`` and wait for the running sum that answers it.

        Raises GRPCError when the stream has ended and could not be resumed: the
        server's status and message (OUT_OF_RANGE when the sum would leave int32),
        or UNAVAILABLE, DEADLINE_EXCEEDED; later calls raise RuntimeError.
        """
        check_int32(num)
        if self._closed:
            raise RuntimeError("session is closed")
        while True:
            leg = self._leg
            assert leg is not None
            try:
                if leg.prefix is not None and not leg.primed:
                    leg.primed = True
                    await leg.call.send_message(NumberRequest(num=leg.prefix))
                    answer = await leg.call.recv_message()
                    if answer is None:
                        raise _ended_early()
                    _check_prefix(answer.sum, leg)
                await leg.call.send_message(NumberRequest(num=num))
                response = await leg.call.recv_message()
                if response is None:
                    raise _ended_early()
            except Exception as err:
                try:
                    await self._resume(leg, err)
                except GRPCError as final:
                    self._closed = True
                    self._ended = final
                    raise final from err
                continue
            self._base = response.sum
            self._answered += 1
            leg.answers += 1
            self._resumer.progress()
            return response.sum

    async def _resume(self, leg: _Leg, err: Exception) -> None:
        """Close the cut ``leg`` and open a new stream for it, within the budget;
        raise the error that ends the session if it cannot be resumed."""
        end = await self._client._finish(leg, self._info, err)
        assert end is not None
        await self._resumer.again(end, fresh=self._answered == 0)
        while True:
            try:
                self._leg = await self._client._open(self._info, leg.address, self._base or None)
                return
            except _OpenFailedError as failed:
                await self._resumer.again(failed.end, fresh=self._answered == 0, opening=True)

    async def close(self) -> None:
        """Half-close the stream and wait for the server's final status.

        A stream cut with every number answered ends quietly: nothing is lost.
        """
        if self._ended is not None:
            raise _AlreadyRaisedError
        if self._closed:
            return
        self._closed = True
        leg = self._leg
        assert leg is not None
        error: Exception | None = None
        try:
            await leg.call.end()
            # Also reads the response headers, which a stream with no add() lacks.
            if await leg.call.recv_message() is not None:
                raise GRPCError(Status.INTERNAL, "server answered a request never sent")
        except Exception as err:
            error = err
        end = await self._client._finish(leg, self._info, error)
        if end is not None and not (end.resumable and self._info.resume is not None):
            raise end.error

    async def _abandon(self, err: BaseException) -> None:
        """The caller's block raised ``err``: cancel the stream, say nothing more."""
        self._closed = True
        leg = self._leg
        if leg is not None and not leg.over:
            leg.over = True
            with suppress(Exception):  # a status read behind a reset: the caller's error stands
                await leg.opening.__aexit__(type(err), err, err.__traceback__)


class _AlreadyRaisedError(Exception):
    """Leaves a session's block quietly: add() has raised the stream's end already,
    so there is no status left to wait for (grpclib would wait for trailers again)."""


_END: Any = object()  # what the caller's numbers give after the last

# grpclib's reasons for ending every stream of a connection (grpclib.protocol).
_LOST = "Connection lost"
_CONNECTION_ENDS = (_LOST, "Received GOAWAY frame", "the server closed the connection")


def _ended_early() -> StreamTerminatedError:
    """The server ended the stream before the client finished; grpclib then replaces
    it with the server's status, if that is not OK."""
    return StreamTerminatedError("server ended the stream before the client finished")
