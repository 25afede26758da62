"""Prometheus metrics with go-grpc-prometheus's names and labels, so dashboards work.

Fed by :class:`~.streams.Streams`, which listens to grpclib's event hooks once for
all its consumers; kept in a registry of their own (several servers may share a
process, as in tests) and served over HTTP at ``/metrics`` on the event loop
(:class:`MetricsEndpoint`: h11 for HTTP, prometheus-client for the text).

Where values live is the command's choice (:func:`use_values`): in memory in a plain
``serve``, whatever the environment says, and in prometheus-client's multiprocess files
only in a worker whose supervisor collects them. Code that builds a ``Serving``
itself keeps prometheus-client's own rule (``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import h11
from grpclib.const import Status
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from .streams import StreamRecord, Streams

# grpc-go's codes.Code.String(), the grpc_code label values dashboards expect.
GO_CODE_NAMES = {
    Status.OK: "OK",
    Status.CANCELLED: "Canceled",
    Status.UNKNOWN: "Unknown",
    Status.INVALID_ARGUMENT: "InvalidArgument",
    Status.DEADLINE_EXCEEDED: "DeadlineExceeded",
    Status.NOT_FOUND: "NotFound",
    Status.ALREADY_EXISTS: "AlreadyExists",
    Status.PERMISSION_DENIED: "PermissionDenied",
    Status.RESOURCE_EXHAUSTED: "ResourceExhausted",
    Status.FAILED_PRECONDITION: "FailedPrecondition",
    Status.ABORTED: "Aborted",
    Status.OUT_OF_RANGE: "OutOfRange",
    Status.UNIMPLEMENTED: "Unimplemented",
    Status.INTERNAL: "Internal",
    Status.UNAVAILABLE: "Unavailable",
    Status.DATA_LOSS: "DataLoss",
    Status.UNAUTHENTICATED: "Unauthenticated",
}

# prometheus.DefBuckets, which go-grpc-prometheus's handling-time histogram uses.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
IN_FLIGHT = "grpc_server_streams_in_flight"
_UNAVAILABLE = GO_CODE_NAMES[Status.UNAVAILABLE]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
FOLD_INTERVAL = 1.0  # seconds between folds of open streams' messages into the counters


def use_values(multiprocess_dir: str | None) -> None:
    """Keep metric values in memory (None) or in multiprocess files under
    ``multiprocess_dir``; call before any metric is built.

    prometheus-client decides this once, at import, from ``PROMETHEUS_MULTIPROC_DIR``:
    a value inherited from the environment would make every stream write files
    there (and fail the call when the directory is missing). Its ``values.ValueClass``
    is what metrics read when they are built, so setting it overrides that choice.
    """
    if multiprocess_dir is None:
        os.environ.pop(MULTIPROC_ENV, None)
        prometheus_values.ValueClass = prometheus_values.MutexValue
    else:  # the files' directory is read from the environment as they are made
        os.environ[MULTIPROC_ENV] = multiprocess_dir
        prometheus_values.ValueClass = prometheus_values.MultiProcessValue()  # type: ignore[no-untyped-call]


class Metrics:
    """The server-side gRPC metrics of go-grpc-prometheus, plus streams in flight.

    Messages are counted on each stream's record (a plain int, by ``Streams``) and
    folded into the message counters once per stream, at its end, and meanwhile for
    every open stream at each scrape of :class:`MetricsEndpoint` and every
    :data:`FOLD_INTERVAL` seconds (for readers of the registry other than that
    endpoint: a worker's multiprocess files, say). An increment of a
    prometheus-client counter (its lock, its checks, its label lookup) per message
    batch cost ~2% of a short stream's CPU; at a stream's end the counters hold
    exactly what they did when every batch was counted at once.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._children: dict[tuple[str, str], _Children] = {}
        self._streams: Streams | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.registry = CollectorRegistry() if registry is None else registry
        reg = self.registry
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", _LABELS, registry=reg
        )
        self.handled = _handled(reg)
        self.received = Counter(
            "grpc_server_msg_received_total",
            "Stream messages received by the server.",
            _LABELS,
            registry=reg,
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total",
            "Stream messages sent by the server.",
            _LABELS,
            registry=reg,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            _LABELS,
            buckets=GO_DEFAULT_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge(
            IN_FLIGHT,
            "Streams open on the server now.",
            _LABELS,
            registry=reg,
            multiprocess_mode="livesum",  # with workers: summed over the live ones
        )

    def attach(self, streams: Streams) -> None:
        """Count what ``streams`` sees; call before its server starts."""
        self._streams = streams
        streams.on_start.append(self._start)
        streams.on_end.append(self._end)

    def fold(self) -> None:
        """Fold the messages of every open stream into the counters (now, not at
        their end): before a scrape, and every FOLD_INTERVAL seconds."""
        if self._streams is None:
            return
        for record in self._streams.live():
            self._fold(record)

    def _fold(self, record: StreamRecord) -> None:
        """Add the record's messages not counted yet (``counted_*`` say which are)."""
        received = record.received - record.counted_received
        sent = record.sent - record.counted_sent
        if received or sent:
            children = self._of(record)
            if received:
                children.received.inc(received)
                record.counted_received = record.received
            if sent:
                children.sent.inc(sent)
                record.counted_sent = record.sent

    def _of(self, record: StreamRecord) -> _Children:
        """The metrics' children for the record's method, looked up once per method:
        labels() (a lock, label checks) per use cost more than the increment. Only
        served methods have records, so the cache stays small."""
        key = (record.grpc_type, record.method)
        children = self._children.get(key)
        if children is None:
            labels = _values(record)
            children = self._children[key] = _Children(
                started=self.started.labels(*labels),
                in_flight=self.in_flight.labels(*labels),
                received=self.received.labels(*labels),
                sent=self.sent.labels(*labels),
                seconds=self.seconds.labels(*labels),
                handled={},
                labels=labels,
            )
        return children

    def _start(self, record: StreamRecord) -> None:
        children = self._of(record)
        children.started.inc()
        children.in_flight.inc()
        if self._timer is None:  # runs in the stream's task: a loop is running
            self._timer = asyncio.get_running_loop().call_later(FOLD_INTERVAL, self._tick)

    def _tick(self) -> None:
        """Fold, and again in FOLD_INTERVAL seconds while streams are open."""
        self._timer = None
        self.fold()
        if self._streams is not None and self._streams.live():
            self._timer = asyncio.get_running_loop().call_later(FOLD_INTERVAL, self._tick)

    def _end(self, record: StreamRecord) -> None:
        self._fold(record)
        children = self._of(record)
        children.in_flight.dec()
        code = GO_CODE_NAMES[record.status or Status.UNKNOWN]
        handled = children.handled.get(code)
        if handled is None:
            handled = children.handled[code] = self.handled.labels(*children.labels, code)
        handled.inc()
        children.seconds.observe(record.duration)


@dataclass
class _Children:
    """One method's children of each metric (``metric.labels(...)``)."""

    started: Counter
    in_flight: Gauge
    received: Counter
    sent: Counter
    seconds: Histogram
    handled: dict[str, Counter]  # by grpc_code, as they occur
    labels: tuple[str, str, str]


def _values(record: StreamRecord) -> tuple[str, str, str]:
    return record.grpc_type, record.service, record.method_name


def _handled(registry: CollectorRegistry | None) -> Counter:
    return Counter(
        "grpc_server_handled_total",
        "RPCs completed on the server, regardless of success or failure.",
        (*_LABELS, "grpc_code"),
        registry=registry,
    )


WORKER_CONNECTIONS = "grpc_server_worker_connections"


class WorkerConnections:
    """The supervisor's count of open connections per worker (``balance.Balancer``),
    read at each scrape: label ``worker``, the worker's index."""

    def __init__(self, counts: Callable[[], Sequence[int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            WORKER_CONNECTIONS,
            "Open connections the supervisor has handed to each worker.",
            labels=["worker"],
        )
        for index, count in enumerate(self._counts()):
            family.add_metric([str(index)], count)
        yield family


class LostStreams:
    """The supervisor's count of streams that a dead worker had in flight.

    A worker killed (``kill -9``, the OOM killer) never counts the end of its
    streams; their clients saw UNAVAILABLE. Once the worker is gone, its in-flight
    gauge values are read from its multiprocess file and added to
    ``grpc_server_handled_total`` with ``grpc_code="Unavailable"``, in this
    process's own counter file in the same directory, so that started == handled
    + in flight still holds. Call :meth:`count` before ``mark_process_dead``
    removes that file.
    """

    def __init__(self, multiprocess_dir: str) -> None:
        """Count into ``multiprocess_dir``; makes this process's metric values live there."""
        use_values(multiprocess_dir)
        self.directory = multiprocess_dir
        self._handled = _handled(None)  # the directory's collector reads it, no registry

    def count(self, pid: int) -> int:
        """Count the streams worker ``pid`` (ended) left in flight; returns how many."""
        path = os.path.join(self.directory, f"gauge_livesum_{pid}.db")
        if not os.path.exists(path):  # it never started a stream
            return 0
        lost = 0.0
        for family in MultiProcessCollector.merge([path]):  # type: ignore[no-untyped-call]
            for sample in family.samples:
                if sample.name == IN_FLIGHT and sample.value > 0:
                    labels = [sample.labels[name] for name in _LABELS]
                    self._handled.labels(*labels, _UNAVAILABLE).inc(sample.value)
                    lost += sample.value
        return int(lost)


class MetricsEndpoint:
    """``/metrics`` over HTTP/1.1 on the event loop: h11 parses, prometheus-client renders.

    prometheus-client's own server (``start_http_server``) starts a thread per
    connection with no timeout and no cap: 500 half-sent requests made 500 threads.
    Here a connection is a coroutine; at most :data:`MAX_CONNECTIONS` are open (a new
    one closes the oldest), each request must arrive whole within
    :data:`REQUEST_TIMEOUT` seconds and its head within :data:`MAX_REQUEST_HEAD`
    bytes (else 400, or the close), and keep-alive connections are served in turn.
    Any path answers, as prometheus-client's does; ``?name[]=`` selects metrics,
    ``Accept`` chooses OpenMetrics, ``Accept-Encoding: gzip`` compresses.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        server: asyncio.Server,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Serve ``registry``; ``before()`` is called before each rendering."""
        self._registry = registry
        self._server = server
        self._before = before
        self._open: dict[asyncio.Task[None], None] = {}  # open connections, oldest first

    @classmethod
    async def start(
        cls, metrics: Metrics | CollectorRegistry, host: str, port: int
    ) -> MetricsEndpoint:
        """Serve ``metrics`` (or any registry, e.g. the workers' multiprocess one)."""
        registry = metrics.registry if isinstance(metrics, Metrics) else metrics
        endpoint: MetricsEndpoint | None = None

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert endpoint is not None
            endpoint._accept(reader, writer)

        try:
            server = await asyncio.start_server(connected, host, port)
        except OSError as err:
            reason = err.strerror or str(err)
            raise OSError(f"cannot serve metrics on {host}:{port}: {reason}") from None
        # A Metrics' open streams' messages are folded in before each scrape.
        endpoint = cls(registry, server, metrics.fold if isinstance(metrics, Metrics) else None)
        return endpoint

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every open connection."""
        self._server.close()
        tasks = list(self._open)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve a new connection; at the cap, the oldest open one makes room (a
        scraper's request takes milliseconds: the one waiting longest is a client
        that does not finish its request, or a keep-alive one, which reconnects)."""
        if len(self._open) >= MAX_CONNECTIONS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.cancel()
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._open[task] = None
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._open.pop(task, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            while True:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        request = await _next_request(connection, reader)
                except h11.RemoteProtocolError as err:
                    if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        writer.write(_respond(connection, err.error_status_hint, b"bad request\n"))
                        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
                    return
                if request is None:
                    return
                status, headers, body = self._answer(request)
                writer.write(_respond(connection, status, body, headers))
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (TimeoutError, ConnectionError, h11.LocalProtocolError):
            writer.transport.abort()  # a client that does not send, or does not read
        finally:
            writer.close()

    def _answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, [("Allow", "GET, HEAD")], b"method not allowed\n"
        target = urllib.parse.urlsplit(request.target.decode("ascii", "replace"))
        names = urllib.parse.parse_qs(target.query).get("name[]")
        registry = self._registry.restricted_registry(names) if names else self._registry
        fields = {name.lower(): value for name, value in request.headers}
        if self._before is not None:
            self._before()
        encoder, content_type = choose_encoder(fields.get(b"accept", b"").decode("latin-1"))
        body = encoder(registry)
        headers = [("Content-Type", content_type)]
        if b"gzip" in fields.get(b"accept-encoding", b""):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        if request.method == b"HEAD":
            headers.append(("Content-Length", str(len(body))))
            body = b""
        return 200, headers, body


MAX_CONNECTIONS = 16  # metrics connections open at once (a scraper needs one)
REQUEST_TIMEOUT = 10.0  # seconds for a whole request to arrive (and for the answer to go)
MAX_REQUEST_HEAD = 8192  # bytes of request line and headers


async def _next_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> h11.Request | None:
    """The next whole request (its body read and dropped), or None at end of file."""
    request: h11.Request | None = None
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(MAX_REQUEST_HEAD)
            connection.receive_data(data)
            if not data and connection.their_state is h11.IDLE:
                return None
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _respond(
    connection: h11.Connection,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> bytes:
    headers = headers or [("Content-Type", "text/plain; charset=utf-8")]
    if not any(name == "Content-Length" for name, _ in headers):
        headers = [*headers, ("Content-Length", str(len(body)))]
    out = connection.send(h11.Response(status_code=status, headers=headers)) or b""
    if body:
        out += connection.send(h11.Data(data=body)) or b""
    return out + (connection.send(h11.EndOfMessage()) or b"")
