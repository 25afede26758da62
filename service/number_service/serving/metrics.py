"""Prometheus metrics with go-grpc-prometheus's names and labels, so dashboards work.

Fed by :class:`~.streams.Streams`, which listens to grpclib's event hooks once for
all its consumers; kept in a registry of their own (several servers may share a
process, as in tests) and served over HTTP at ``/metrics`` by prometheus-client.

Where values live is the command's choice (:func:`use_values`): in memory in a plain
``serve``, whatever the environment says, and in prometheus-client's multiprocess files
only in a worker whose supervisor collects them. Code that builds a ``Serving``
itself keeps prometheus-client's own rule (``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from wsgiref.simple_server import WSGIServer

from grpclib.const import Status
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import values as prometheus_values
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
    """The server-side gRPC metrics of go-grpc-prometheus, plus streams in flight."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._children: dict[tuple[int, str, str], Counter] = {}
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
        streams.on_start.append(self._start)
        streams.on_messages.append(self._messages)
        streams.on_end.append(self._end)

    def _start(self, record: StreamRecord) -> None:
        self.started.labels(*_values(record)).inc()
        self.in_flight.labels(*_values(record)).inc()

    def _messages(self, record: StreamRecord) -> None:
        if record.received_now:
            self._per_message(self.received, record).inc(record.received_now)
        if record.sent_now:
            self._per_message(self.sent, record).inc(record.sent_now)

    def _per_message(self, counter: Counter, record: StreamRecord) -> Counter:
        """``counter.labels(...)`` for the record's method, looked up once per method:
        labels() (a lock, label checks) cost ~3% of the server's CPU per message batch.
        Only served methods get messages, so the cache stays small."""
        key = (id(counter), record.grpc_type, record.method)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*_values(record))
        return child

    def _end(self, record: StreamRecord) -> None:
        labels = _values(record)
        self.in_flight.labels(*labels).dec()
        code = GO_CODE_NAMES[record.status or Status.UNKNOWN]
        self.handled.labels(*labels, code).inc()
        self.seconds.labels(*labels).observe(record.duration)


def _values(record: StreamRecord) -> tuple[str, str, str]:
    return record.grpc_type, record.service, record.method_name


def _handled(registry: CollectorRegistry | None) -> Counter:
    return Counter(
        "grpc_server_handled_total",
        "RPCs completed on the server, regardless of success or failure.",
        (*_LABELS, "grpc_code"),
        registry=registry,
    )


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
    """``/metrics`` over HTTP on a thread of its own, as prometheus-client serves it."""

    def __init__(self, metrics: Metrics | CollectorRegistry, host: str, port: int) -> None:
        """Serve ``metrics`` (or any registry, e.g. the workers' multiprocess one)."""
        registry = metrics.registry if isinstance(metrics, Metrics) else metrics
        self._httpd: WSGIServer
        self._thread: threading.Thread
        try:
            self._httpd, self._thread = start_http_server(port, host, registry)
        except OSError as err:
            reason = err.strerror or str(err)
            raise OSError(f"cannot serve metrics on {host}:{port}: {reason}") from None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    async def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        await asyncio.to_thread(self._thread.join, 5)
