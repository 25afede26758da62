"""The spans: one SERVER span per stream, one CLIENT span per call, as grpcio's are made.

Imported by :mod:`.tracing` only once tracing is on (it needs the ``otel`` extra).

A SERVER span is what ``opentelemetry-instrumentation-grpc`` makes for a grpcio
server: named ``package.Service/Method``, kind SERVER, with ``rpc.system=grpc``,
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code`` (int), ``rpc.user_agent``,
the peer (``net.peer.ip``, ``net.peer.port``, and ``net.peer.name=localhost`` for a
loopback peer, each written as that instrumentation writes it), and its parent from
the request metadata through the configured propagators (W3C ``traceparent`` and
``tracestate`` by default). Beyond those it carries the server's address on the
connection (``net.host.ip``, ``net.host.port``) and the messages counted each way
(``serving.messages.received``, ``serving.messages.sent``); with ``message_events``,
one ``message`` event per message too (``rpc.message.type`` SENT or RECEIVED,
``rpc.message.id``), up to the SDK's event limit per span. Its status is left unset
but for the codes the semantic conventions call server errors (UNKNOWN,
DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS): ERROR, with the
status message. Services named in ``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES`` (comma
separated, the grpcio instrumentation's variable; ``grpc.health.v1.Health`` for the
probes, say) get no spans.

The span is current in the stream's task from the request on, so every log line
the handler writes carries its ids; and so does the "stream ended" line, written
from the task's done callback, which runs in the context the task had when
``Streams`` added it, just after this module's listener made the span current.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from grpclib import events
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline
from grpclib.server import Server
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk._configuration import _initialize_components
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.trace import Span, SpanKind, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from .grpclib_ext.peer import local_address
from .streams import StreamRecord, Streams, peer_address

SCOPE = "number_service.serving"  # the instrumentation scope of every span made here
MESSAGES_RECEIVED = "serving.messages.received"
MESSAGES_SENT = "serving.messages.sent"
# The semantic conventions' gRPC server errors; every other status leaves a SERVER
# span's status unset (a CLIENT span's is ERROR for every status but OK).
SERVER_ERRORS = frozenset(
    {
        Status.UNKNOWN,
        Status.DEADLINE_EXCEEDED,
        Status.UNIMPLEMENTED,
        Status.INTERNAL,
        Status.UNAVAILABLE,
        Status.DATA_LOSS,
    }
)
_LOOPBACK = ("127.0.0.1", "[::1]")  # net.peer.name=localhost, as grpcio's spans say
_UNKNOWN_SERVICE = "unknown_service"  # the SDK's service.name when none is given
EXCLUDED_ENV = "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES"  # the grpcio instrumentation's

_Send = TypeVar("_Send")
_Recv = TypeVar("_Recv")
_Metadata = Mapping[str, str | bytes] | Collection[tuple[str, str | bytes]]

# The SERVER span of the stream whose task this is: set by the request listener,
# read by the listeners that run in the same task (user code cannot change it,
# unlike the current span).
_SERVER_SPAN: ContextVar[Span | None] = ContextVar("serving_server_span", default=None)


def configure(service_name: str | None = None) -> TracerProvider:
    """Configure the SDK from the environment with its own auto-configuration (what
    ``opentelemetry-instrument`` runs) and return the global tracer provider it set.

    Only the defaults are ours: the exporter is ``otlp`` when only an OTLP endpoint
    is given (opentelemetry-distro sets the same default), and ``service.name`` is
    ``service_name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES``
    gives one. The SDK raises RuntimeError for an exporter or protocol it does not know.
    """
    os.environ.setdefault("OTEL_TRACES_EXPORTER", "otlp")
    attributes: dict[str, AttributeValue] = {}
    named = str(Resource.create().attributes.get(SERVICE_NAME, ""))
    if service_name and named.startswith(_UNKNOWN_SERVICE):
        attributes[SERVICE_NAME] = service_name
    # The SDK's auto-configuration has no public entry point but this one (the
    # distros' configurators call it); it reads every OTEL_* variable itself.
    _initialize_components(resource_attributes=attributes)
    return trace.get_tracer_provider()


def shutdown(provider: TracerProvider, timeout: float) -> None:
    """Export the spans left within ``timeout`` seconds, then stop ``provider``'s exporters."""
    flush = getattr(provider, "force_flush", None)
    if flush is not None and not flush(int(timeout * 1000)):
        from .tracing import log

        log.warning("tracing: spans not all exported within %g s; stopping without them", timeout)
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()


def span_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id in hex, or None (for ``logs.TraceIds``)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _names(method_name: str) -> tuple[str, str, str]:
    """Span name, service and method of ``/package.Service/Method``."""
    name = method_name.lstrip("/")
    service, _, method = name.partition("/")
    return name, service, method


class ServerSpans:
    """A SERVER span per stream of one server, ended with the stream's record.

    Its request listener must be attached before ``Streams``' (construct this
    first, then :meth:`follow` the ``Streams``): grpclib runs listeners in order, so
    the span is current when ``Streams`` adds its done callback, and the callback
    (with the "stream ended" log line) runs with the span current.
    """

    def __init__(
        self, server: Server, tracer_provider: TracerProvider, *, message_events: bool = False
    ) -> None:
        self._tracer = tracer_provider.get_tracer(SCOPE)
        self._message_events = message_events
        self._spans: dict[int, Span] = {}  # id(record) -> span, from start to end
        self._streams: Streams | None = None
        self._excluded = frozenset(
            name.strip() for name in os.environ.get(EXCLUDED_ENV, "").split(",") if name.strip()
        )
        events.listen(server, events.RecvRequest, self._recv_request)
        events.listen(server, events.SendTrailingMetadata, self._send_trailers)

    def follow(self, streams: Streams) -> None:
        """End each span with the record ``streams`` keeps of its stream."""
        self._streams = streams
        streams.on_start.append(self._start)
        if self._message_events:
            streams.on_messages.append(self._messages)
        streams.on_end.append(self._end)

    async def _recv_request(self, event: events.RecvRequest) -> None:
        name, service, method = _names(event.method_name)
        if service in self._excluded:
            return
        parent = propagate.extract(event.metadata)
        attributes: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": Status.OK.value,
        }
        if event.user_agent:
            attributes["rpc.user_agent"] = event.user_agent
        if addr := event.peer.addr():
            ip, _, port = peer_address(addr).rpartition(":")
            attributes["net.peer.ip"] = ip
            attributes["net.peer.port"] = port  # a string, as grpcio's spans have it
            if ip in _LOOPBACK:
                attributes["net.peer.name"] = "localhost"
        if local := local_address(event.peer):
            host, port_number = local
            attributes["net.host.ip"] = peer_address((host, port_number)).rpartition(":")[0]
            attributes["net.host.port"] = port_number
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        _SERVER_SPAN.set(span)
        # Never detached: the context is the stream task's, and ends with it.
        otel_context.attach(trace.set_span_in_context(span, parent))

    def _start(self, record: StreamRecord) -> None:
        if span := _SERVER_SPAN.get():
            self._spans[id(record)] = span

    def _messages(self, record: StreamRecord) -> None:
        span = self._spans.get(id(record))
        if span is None or not span.is_recording():
            return
        for kind, total, now in (
            ("RECEIVED", record.received, record.received_now),
            ("SENT", record.sent, record.sent_now),
        ):
            for number in range(total - now + 1, total + 1):
                span.add_event("message", {"rpc.message.type": kind, "rpc.message.id": number})

    def _end(self, record: StreamRecord) -> None:
        span = self._spans.pop(id(record), None)
        if span is not None:
            span.set_attribute(MESSAGES_RECEIVED, record.received)
            span.set_attribute(MESSAGES_SENT, record.sent)
            _end_server_span(span, record.status or Status.UNKNOWN, record.message)

    async def _send_trailers(self, event: events.SendTrailingMetadata) -> None:
        # A stream refused before Streams made its record (a drain refuses new
        # streams in its request listener) never reaches _end: it ends here.
        span = _SERVER_SPAN.get()
        if span is not None and self._streams is not None and self._streams.current() is None:
            _SERVER_SPAN.set(None)
            _end_server_span(span, event.status, event.status_message)


def _end_server_span(span: Span, status: Status, message: str | None) -> None:
    span.set_attribute("rpc.grpc.status_code", status.value)
    if status in SERVER_ERRORS:
        span.set_status(StatusCode.ERROR, message or status.name)
    span.end()


@asynccontextmanager
async def traced_request(
    tracer_provider: TracerProvider,
    channel: Channel,
    name: str,
    cardinality: Cardinality,
    request_type: type[_Send],
    reply_type: type[_Recv],
    *,
    deadline: Deadline | None = None,
    metadata: _Metadata | None = None,
) -> AsyncIterator[Stream[_Send, _Recv]]:
    """``channel.request(...)`` in a CLIENT span whose context goes in the metadata.

    The span ends with the call: ``rpc.grpc.status_code`` is the server's status,
    DEADLINE_EXCEEDED for the deadline, CANCELLED for a call the caller left (an
    exception of its own, or the generator closed), UNAVAILABLE for a lost
    connection; its status is ERROR for all but OK, as the conventions say of clients.
    """
    span_name, service, method = _names(name)
    span = tracer_provider.get_tracer(SCOPE).start_span(
        span_name,
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": Status.OK.value,
        },
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    sent = [*_pairs(metadata), *carrier.items()]
    status, message = Status.OK, None
    try:
        async with channel.request(
            name, cardinality, request_type, reply_type, deadline=deadline, metadata=sent
        ) as call:
            yield call
    except GRPCError as err:
        status, message = err.status, err.message
        raise
    except TimeoutError:
        status, message = Status.DEADLINE_EXCEEDED, "deadline exceeded"
        raise
    except (StreamTerminatedError, OSError) as err:
        status, message = Status.UNAVAILABLE, str(err)
        raise
    except BaseException as err:  # the caller's own error, a cancel, a closed generator
        status, message = Status.CANCELLED, f"{type(err).__name__}: {err}".rstrip(": ")
        raise
    finally:
        span.set_attribute("rpc.grpc.status_code", status.value)
        if status is not Status.OK:
            span.set_status(StatusCode.ERROR, message or status.name)
        span.end()


def _pairs(metadata: _Metadata | None) -> list[tuple[str, Any]]:
    """Metadata as grpclib takes it (a mapping or pairs) as a list of pairs."""
    if metadata is None:
        return []
    if isinstance(metadata, Mapping):
        return list(metadata.items())
    return list(metadata)
