"""Follow every server stream through grpclib's event hooks, for drain, metrics and logs.

One :class:`StreamRecord` per stream, from the request to the end of its handler
task: method, peer, messages each way, final status. The end is the task's done
callback, so a stream that the client cancels or drops (no trailers are sent) is
seen to end too, as CANCELLED.

:class:`Streams` also carries out a graceful shutdown's stream side: refuse new
streams while draining, wait for those in flight, and end what is left with
UNAVAILABLE and a message instead of cutting it off.

Listeners (metrics, logs, ...) run inside the stream's task: one that raises is
logged and counted, never passed on, so it cannot fail the call it watches.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from grpclib import events
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from . import grpclib_ext

log = logging.getLogger(__name__)

_SHUTDOWN = "serving: grace period over"  # the drain's cancel message, told from others
#: UNAVAILABLE's message for a stream still open when a drain's grace period is over.
SHUTDOWN_MESSAGE = "server shut down before this stream finished; start a new stream to continue"
TRAILERS_WAIT = 2.0  # seconds streams ended by a drain get to send their trailers

_TYPES = {
    Cardinality.UNARY_UNARY: "unary",
    Cardinality.UNARY_STREAM: "server_stream",
    Cardinality.STREAM_UNARY: "client_stream",
    Cardinality.STREAM_STREAM: "bidi_stream",
}


@dataclass(slots=True)  # one per open stream: no __dict__ (~100 B less each)
class StreamRecord:
    """What is known of one server stream; ``status`` is None until it ends."""

    method: str  # "/package.Service/Method"
    grpc_type: str  # "unary", "server_stream", "client_stream", "bidi_stream"
    peer: str
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    sent: int = 0
    received_now: int = 0  # of ``received``, those counted by the latest on_messages call
    sent_now: int = 0
    status: Status | None = None
    message: str | None = None
    ended: float | None = None
    cancelled: bool = False  # the handler was cancelled (client went away, or deadline)
    # Of ``received`` and ``sent``, those the metrics' counters hold already (Metrics).
    counted_received: int = 0
    counted_sent: int = 0

    @property
    def service(self) -> str:
        return self.method.split("/")[1]

    @property
    def method_name(self) -> str:
        return self.method.split("/")[2]

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started


Listener = Callable[[StreamRecord], None]


class Listeners(list[Listener]):
    """Listeners of one event, each called under guard: a listener's first failure is
    logged with its traceback, later ones are counted and logged at 10, 100, 1000 ..."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[Listener, int] = {}

    def notify(self, record: StreamRecord) -> None:
        """Call every listener with ``record``; none of their exceptions escapes."""
        for listener in self:
            try:
                listener(record)
            except Exception:
                self._failed(listener)

    def _failed(self, listener: Listener) -> None:
        count = self.failures[listener] = self.failures.get(listener, 0) + 1
        name = getattr(listener, "__qualname__", repr(listener))
        if count == 1:
            log.exception("stream listener %s failed; the stream goes on without it", name)
        elif str(count).rstrip("0") == "1":  # 10, 100, 1000 ...: bounded, still visible
            log.error("stream listener %s has failed %d times", name, count)


class Servable(Protocol):
    """What grpclib serves: generated service bases, Health, ServerReflection."""

    def __mapping__(self) -> Mapping[str, Handler]: ...


class Streams:
    """Stream records of one server, and its drain; attach before it starts."""

    def __init__(
        self,
        server: Server,
        services: Collection[Servable],
        *,
        drained: Collection[str] = (),
        shutdown_message: str = SHUTDOWN_MESSAGE,
        refuse_while_draining: bool = True,
    ) -> None:
        """Follow ``server``, which serves ``services``. ``drained``: method paths whose
        streams a drain waits for; others, such as health Watch streams, never end
        by themselves and are left to ``Server.close()``. ``shutdown_message``: the
        UNAVAILABLE status's message for a drained stream the drain has to end.
        ``refuse_while_draining``: answer new streams of those methods UNAVAILABLE
        while draining; off where the connections refuse them before they start
        (``grpclib_ext``'s GOAWAY and REFUSED_STREAM, which clients retry)."""
        self._types = {
            path: _TYPES[handler.cardinality]
            for service in services
            for path, handler in service.__mapping__().items()
        }
        self._drained = frozenset(drained)
        self.shutdown_message = shutdown_message
        self._live: dict[asyncio.Task[object], StreamRecord] = {}
        self._drained_live = 0  # how many of _live a drain waits for
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._hurry = asyncio.Event()
        self.draining = False
        self._refuse = refuse_while_draining
        self.on_start = Listeners()
        # Each time messages are counted (once per batch the server reports): the
        # record's received_now/sent_now say how many since the last call.
        self.on_messages = Listeners()
        self.on_end = Listeners()
        events.listen(server, events.RecvRequest, self._recv_request)
        grpclib_ext.count_messages(server, self.count)
        events.listen(server, events.SendTrailingMetadata, self._send_trailers)

    def live(self) -> list[StreamRecord]:
        """Records of the streams in flight now."""
        return list(self._live.values())

    def started(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` is a stream's handler that has reached its method (counted)."""
        return task in self._live

    @property
    def drained_in_flight(self) -> int:
        """How many streams in flight a drain would wait for."""
        return self._drained_live

    # grpclib event listeners: each runs inside the stream's handler task.

    async def _recv_request(self, event: events.RecvRequest) -> None:
        if self.draining and self._refuse and event.method_name in self._drained:
            raise GRPCError(
                Status.UNAVAILABLE, "server is shutting down; retry on another connection"
            )
        task = asyncio.current_task()
        assert task is not None
        addr = event.peer.addr()
        record = StreamRecord(
            method=event.method_name,
            grpc_type=self._types.get(event.method_name, "unknown"),
            peer=peer_address(addr) if addr else "unknown",
        )
        self._live[task] = record
        if event.method_name in self._drained:
            self._drained_live += 1
            self._quiet.clear()
        task.add_done_callback(self._task_done)
        event.method_func = _Watched(event.method_func, record, self.shutdown_message)
        self.on_start.notify(record)

    async def _send_trailers(self, event: events.SendTrailingMetadata) -> None:
        if record := self.current():
            if record.cancelled and event.status is Status.UNKNOWN:
                return  # a cancelled stream's would-be trailers; see _Watched
            record.status = event.status
            record.message = event.status_message

    def count(self, received: int, sent: int) -> None:
        """Count messages of the current stream, as the server reports them (in
        batches): the record, and one ``on_messages`` call per report."""
        if record := self.current():
            record.received += received
            record.sent += sent
            if self.on_messages:  # none by default: metrics fold the totals in
                record.received_now = received
                record.sent_now = sent
                self.on_messages.notify(record)

    def current(self) -> StreamRecord | None:
        """The record of the stream whose handler task is running now, if any."""
        task = asyncio.current_task()
        return self._live.get(task) if task is not None else None

    def _task_done(self, task: asyncio.Task[object]) -> None:
        record = self._live.pop(task)
        record.ended = time.monotonic()
        if record.status is None:  # no trailers went out: the client went away
            record.status = Status.CANCELLED
        if record.method in self._drained:
            self._drained_live -= 1
            if not self._drained_live:
                self._quiet.set()
        self.on_end.notify(record)

    def hurry(self) -> None:
        """Cut a drain's grace period short (a second signal, say)."""
        self._hurry.set()

    async def drain(self, grace: float) -> int:
        """Refuse new streams, wait up to ``grace`` s for drained ones in flight,
        then end those left with UNAVAILABLE. Returns how many were ended so."""
        self.draining = True
        waits = [asyncio.ensure_future(event.wait()) for event in (self._quiet, self._hurry)]
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        left = [task for task, record in self._live.items() if record.method in self._drained]
        for task in left:
            task.cancel(_SHUTDOWN)
        if left:
            # Their UNAVAILABLE trailers wait for the client to read; one that does
            # not read would hold the drain forever. After this, Server.close()
            # cancels whatever is still waiting.
            await asyncio.wait(left, timeout=TRAILERS_WAIT)
        return len(left)


class _Watched:
    """The handler, noting a cancellation, and turning the drain's into UNAVAILABLE.

    When a client cancels or disconnects, grpclib cancels the handler and then
    reports trailers of UNKNOWN "Internal Server Error" that never reach the
    client; ``cancelled`` lets the record say CANCELLED instead. A deadline
    cancels the handler too, but its DEADLINE_EXCEEDED is real and kept.

    One per open stream: a slotted object (~56 B), where a closure over the same
    three values was a function and its cells (~216 B, tracemalloc).
    """

    __slots__ = ("method_func", "record", "shutdown_message")

    def __init__(
        self,
        method_func: Callable[[Any], Awaitable[None]],
        record: StreamRecord,
        shutdown_message: str,
    ) -> None:
        self.method_func = method_func
        self.record = record
        self.shutdown_message = shutdown_message

    async def __call__(self, stream: Any) -> None:
        try:
            await self.method_func(stream)
        except asyncio.CancelledError as err:
            task = asyncio.current_task()
            if err.args != (_SHUTDOWN,) or task is None:
                self.record.cancelled = True
                raise
            task.uncancel()
            raise GRPCError(Status.UNAVAILABLE, self.shutdown_message) from None


_MAPPED = "::ffff:"  # how an IPv4 peer of a dual-stack IPv6 socket appears


def peer_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A peer's address from ``getpeername()`` as ``host:port`` (``[::1]:port`` for
    IPv6, as ``run.host_port`` writes it); an IPv4 peer of a dual-stack socket
    (``::ffff:127.0.0.1``) as the IPv4 address it is."""
    host = str(address[0])
    if host.startswith(_MAPPED):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            host = str(mapped)
    port = int(address[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
