"""OpenTelemetry traces (serving/tracing.py, serving/otel.py) through real processes.

Servers and clients are ``number-service`` processes configured only through the
SDK's OTEL_* variables; the spans are received by real OTLP receivers in the test
(the official opentelemetry-proto trace service served by grpcio, and an OTLP/HTTP
one on http.server), both on 127.0.0.1. The reference for what a span holds is
opentelemetry-instrumentation-grpc's own spans of a grpcio client and server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpcio_peer import Grpcio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext, server_interceptor
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from polling import eventually
from processes import (
    HOST,
    RUN_TIMEOUT,
    ServerProcess,
    env_without_buffering,
    reap,
    run,
    start_server,
)
from test_workers import WORKER_HEADER, serve_workers, worker_pids

from number_service.codec import NumberCodec
from number_service.server import services
from number_service.service import ACCUMULATE_NUMBERS
from number_service.serving import Serving, bind, grpclib_ext, logs, tracing
from number_service.serving.otel import MESSAGES_RECEIVED, MESSAGES_SENT
from number_service_gen.tutorial import NumberRequest, NumberResponse

__all__ = ["serve_workers"]  # a fixture of test_workers, used here too

TIMEOUT = 20.0  # seconds for spans to arrive, a call to end, a process to stop
SPAN_NAME = "tutorial.NumberService/AccumulateNumbers"
# What our SERVER spans carry beyond grpcio's (see serving/otel.py).
OURS_ONLY = {"net.host.ip", "net.host.port", MESSAGES_RECEIVED, MESSAGES_SENT}
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
UNSET, ERROR = trace_pb2.Status.STATUS_CODE_UNSET, trace_pb2.Status.STATUS_CODE_ERROR
TRACED_CALLS = Path(__file__).resolve().parent / "traced_calls.py"


# --- OTLP receivers -----------------------------------------------------------------


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Received:
    """One span as an OTLP receiver got it, with its resource's attributes."""

    resource: dict[str, Any]
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return str(self.span.name)

    @property
    def kind(self) -> int:
        return int(self.span.kind)

    @property
    def trace_id(self) -> str:
        return bytes(self.span.trace_id).hex()

    @property
    def span_id(self) -> str:
        return bytes(self.span.span_id).hex()

    @property
    def parent_id(self) -> str:
        return bytes(self.span.parent_span_id).hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return _attributes(self.span.attributes)

    @property
    def status(self) -> int:
        return int(self.span.status.code)


class Collector:
    """The spans of every ExportTraceServiceRequest received, in arrival order."""

    def __init__(self) -> None:
        self._spans: list[Received] = []
        self._lock = threading.Lock()
        self.endpoint = ""

    def add(self, request: Any) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self._spans.append(Received(resource, span))

    def spans(self) -> list[Received]:
        with self._lock:
            return list(self._spans)

    def wait(
        self, want: Callable[[list[Received]], bool], timeout: float = TIMEOUT
    ) -> list[Received]:
        """The spans once ``want(spans)``; fails the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not want(spans := self.spans()):
            if time.monotonic() > deadline:
                pytest.fail(f"spans never came as wanted within {timeout} s; got {spans}")
            time.sleep(0.05)
        return spans

    def of_trace(self, trace_id: str, count: int) -> list[Received]:
        """The spans of ``trace_id``, once ``count`` have come."""

        def of(spans: list[Received]) -> list[Received]:
            return [span for span in spans if span.trace_id == trace_id]

        return of(self.wait(lambda spans: len(of(spans)) >= count))


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.collector.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_grpc() -> Iterator[Collector]:
    """A real OTLP/gRPC trace receiver on 127.0.0.1: opentelemetry-proto's service on grpcio."""
    collector = Collector()
    executor = ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor)
    service = _TraceService(collector)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    collector.endpoint = f"http://{HOST}:{port}"
    yield collector
    server.stop(grace=None).wait(TIMEOUT)
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def otlp_http() -> Iterator[Collector]:
    """A real OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces, binary protobuf."""
    collector = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces" or "protobuf" not in self.headers["Content-Type"]:
                self.send_error(404)
                return
            collector.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    collector.endpoint = f"http://{HOST}:{server.server_address[1]}"
    yield collector
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


def otel_env(collector: Collector, protocol: str = "grpc", **more: str) -> dict[str, str]:
    """The standard SDK variables, and nothing else, that send traces to ``collector``."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_SERVICE_NAME": "traced-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: spans come within the test's waits
        **more,
    }


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``serve`` processes (``start_server``'s arguments); all reaped afterwards."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_server(0, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        reap(server.proc)
        server.stderr.rest(timeout=0)


def stream_lines(server: ServerProcess, count: int) -> list[str]:
    """The server's next ``count`` "stream ended" lines of AccumulateNumbers."""
    lines: list[str] = []
    while len(lines) < count:
        line = server.stderr.wait_for("stream ended", TIMEOUT)
        if "AccumulateNumbers" in line:
            lines.append(line)
    return lines


def text_fields(line: str) -> dict[str, str]:
    """The key=value fields of a text log line."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


# --- a grpcio client and server, instrumented by opentelemetry-instrumentation-grpc --


def memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider of this test alone (never the global one): spans in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


class SumServicer:
    """NumberService on grpcio: the running sum, OUT_OF_RANGE past int32."""

    def __init__(self, pb2: ModuleType) -> None:
        self.pb2 = pb2

    def AccumulateNumbers(  # noqa: N802 - grpcio's generated name
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        total = 0
        for request in requests:
            total += request.num
            if not -(2**31) <= total < 2**31:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "sum leaves int32")
            yield self.pb2.NumberResponse(sum=total)


@contextlib.contextmanager
def grpcio_server(gen: Grpcio, provider: TracerProvider) -> Iterator[int]:
    """A grpcio NumberService on 127.0.0.1 with the instrumentation's server interceptor."""
    executor = ThreadPoolExecutor(max_workers=4)
    traced = server_interceptor(tracer_provider=provider)  # type: ignore[no-untyped-call]
    server = grpc.server(executor, interceptors=[traced])
    gen.pb2_grpc.add_NumberServiceServicer_to_server(SumServicer(gen.pb2), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(TIMEOUT)
        executor.shutdown(wait=True, cancel_futures=True)


def grpcio_call(gen: Grpcio, port: int, provider: TracerProvider, numbers: list[int]) -> Any:
    """AccumulateNumbers from a grpcio client with the instrumentation's client
    interceptor: the sums, or the RpcError."""
    with grpc.insecure_channel(f"{HOST}:{port}") as plain:
        # As the instrumentation's GrpcInstrumentorClient wraps every channel it makes.
        traced = client_interceptor(tracer_provider=provider)  # type: ignore[no-untyped-call]
        channel = grpcext.intercept_channel(plain, traced)  # type: ignore[no-untyped-call]
        stub = gen.pb2_grpc.NumberServiceStub(channel)
        requests = iter([gen.pb2.NumberRequest(num=num) for num in numbers])
        try:
            return [reply.sum for reply in stub.AccumulateNumbers(requests, timeout=TIMEOUT)]
        except grpc.RpcError as err:
            return err


def only(spans: Any, kind: Any) -> ReadableSpan:
    (span,) = [span for span in spans if span.kind == kind]
    return span  # type: ignore[no-any-return]


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


# --- the tests ----------------------------------------------------------------------


def test_a_grpcio_client_parents_our_server_span_which_holds_what_grpcios_does(
    otlp_grpc: Collector, servers: Callable[..., ServerProcess], grpcio_gen: Grpcio
) -> None:
    """An instrumented grpcio client calls our server (configured by OTEL_* alone, spans
    over OTLP/gRPC) and an instrumented grpcio server, the same way. Our SERVER span is
    a child of the client's span, in its trace; it is named and holds what grpcio's
    server span holds (plus our extras), value for value; the stream's log line
    carries its ids."""
    from opentelemetry.trace import SpanKind

    server = servers(env=otel_env(otlp_grpc))
    for numbers, want in (([1, 2, 3], [1, 3, 6]), ([2**31 - 1, 1], grpc.StatusCode.OUT_OF_RANGE)):
        client_provider, client_spans = memory_provider()
        reference_provider, reference_spans = memory_provider()
        got = grpcio_call(grpcio_gen, server.port, client_provider, numbers)
        with grpcio_server(grpcio_gen, reference_provider) as port:
            reference = grpcio_call(grpcio_gen, port, client_provider, numbers)
        if isinstance(want, list):
            assert got == reference == want
        else:
            assert got.code() is reference.code() is want
        ours_client, reference_client = client_spans.get_finished_spans()
        trace_id, span_id = hex_ids(ours_client)
        (ours,) = otlp_grpc.of_trace(trace_id, 1)
        theirs = only(reference_spans.get_finished_spans(), SpanKind.SERVER)

        assert ours.kind == SERVER
        assert ours.parent_id == span_id
        assert ours.name == SPAN_NAME == theirs.name.lstrip("/")
        assert ours.resource["service.name"] == "traced-test"
        assert theirs.attributes is not None
        expected = dict(theirs.attributes)
        mine = ours.attributes
        assert set(mine) - OURS_ONLY == set(expected)
        for key, value in expected.items():
            assert type(mine[key]) is type(value), key
            if key != "net.peer.port":  # each call came from a port of its own
                assert mine[key] == value, key
        assert mine["net.host.ip"] == HOST
        assert mine["net.host.port"] == server.port
        assert mine[MESSAGES_RECEIVED] == len(numbers)
        assert mine[MESSAGES_SENT] == (3 if isinstance(want, list) else 1)
        # Semantic conventions: neither OK nor OUT_OF_RANGE is a server error.
        assert ours.status == UNSET
        assert theirs.status.is_unset
        assert reference_client.parent is None  # its own trace, not ours

        (line,) = stream_lines(server, 1)
        fields = text_fields(line)
        assert (fields["trace_id"], fields["span_id"]) == (ours.trace_id, ours.span_id), line


def test_our_client_and_server_make_one_trace_per_call_with_its_status(
    otlp_grpc: Collector, servers: Callable[..., ServerProcess]
) -> None:
    """NumberClient calls (a process of its own, OTEL_* alone) to a ``serve`` process:
    each call is one trace of a CLIENT span and its child SERVER span, whose
    ``rpc.grpc.status_code`` and span status follow the semantic conventions (ERROR
    for every status but OK on the client, for server errors only on the server);
    every JSON "stream ended" line carries its SERVER span's ids."""
    env = otel_env(otlp_grpc)
    server = servers("--log-format", "json", env=env)
    done = subprocess.run(
        [sys.executable, str(TRACED_CALLS), str(server.port)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**env_without_buffering(), **env, "OTEL_SERVICE_NAME": "traced-client"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = dict(line.split() for line in done.stdout.splitlines())
    assert said == {
        "ok": "OK",
        "out_of_range": "OUT_OF_RANGE",
        "cancelled": "closed",
        "deadline_exceeded": "DEADLINE_EXCEEDED",
        "internal": "INTERNAL",
    }, done.stdout
    spans = otlp_grpc.wait(lambda spans: len(spans) >= 10)
    clients = [span for span in spans if span.kind == CLIENT]
    by_trace = {span.trace_id: span for span in spans if span.kind == SERVER}
    assert len(clients) == 5
    assert len(by_trace) == 5
    # status -> (CLIENT span status, SERVER span status)
    expected = {
        Status.OK: (UNSET, UNSET),
        Status.OUT_OF_RANGE: (ERROR, UNSET),
        Status.CANCELLED: (ERROR, UNSET),
        Status.DEADLINE_EXCEEDED: (ERROR, ERROR),
        Status.INTERNAL: (ERROR, ERROR),
    }
    seen = {}
    for client in clients:
        served = by_trace[client.trace_id]
        assert served.parent_id == client.span_id
        assert client.name == served.name == SPAN_NAME
        assert client.resource["service.name"] == "traced-client"
        assert served.resource["service.name"] == "traced-test"
        assert client.attributes == {
            "rpc.system": "grpc",
            "rpc.service": "tutorial.NumberService",
            "rpc.method": "AccumulateNumbers",
            "rpc.grpc.status_code": client.attributes["rpc.grpc.status_code"],
        }
        status = Status(client.attributes["rpc.grpc.status_code"])
        assert served.attributes["rpc.grpc.status_code"] == status.value, (status, served)
        seen[status] = (client.status, served.status)
    assert seen == expected

    lines = [json.loads(line) for line in stream_lines(server, 5)]
    assert {(line["trace_id"], line["span_id"]) for line in lines} == {
        (span.trace_id, span.span_id) for span in by_trace.values()
    }
    for line in lines:
        assert (
            Status[line["status"]].value
            == by_trace[line["trace_id"]].attributes["rpc.grpc.status_code"]
        )


def test_the_cli_and_the_server_export_over_otlp_http(
    otlp_http: Collector, servers: Callable[..., ServerProcess]
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: ``serve`` and ``number-service
    accumulate`` send their spans to an OTLP/HTTP receiver; one trace, CLIENT and
    SERVER, the CLI's exported before it exits. Health checks, excluded as the grpcio
    instrumentation's variable says, have none."""
    excluded = "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES"
    env = otel_env(otlp_http, "http/protobuf")
    server = servers(env={**env, excluded: "grpc.health.v1.Health, other.Service"})
    checked = run("health", "--port", str(server.port), env=env)
    assert checked.returncode == 0, checked.stderr
    done = run("accumulate", "--port", str(server.port), "5", "6", env=env)
    assert (done.returncode, done.stdout) == (0, "5\n11\n"), done.stderr
    stream_lines(server, 1)  # the health check's stream ended before this one
    time.sleep(0.5)  # ten times OTEL_BSP_SCHEDULE_DELAY: a health span would have come
    spans = otlp_http.wait(lambda spans: len(spans) >= 2)
    assert len(spans) == 2, spans
    client = only_received(spans, CLIENT)
    served = only_received(spans, SERVER)
    assert (served.trace_id, served.parent_id) == (client.trace_id, client.span_id)
    assert served.attributes[MESSAGES_RECEIVED] == served.attributes[MESSAGES_SENT] == 2


def only_received(spans: list[Received], kind: int) -> Received:
    (span,) = [span for span in spans if span.kind == kind]
    return span


async def test_every_worker_exports_its_own_spans(
    otlp_grpc: Collector, serve_workers: Callable[..., ServerProcess]
) -> None:
    """``serve --workers 2``: the spans of the streams each worker served come from that
    worker's own process (the resource's process.pid, a detector the SDK's
    OTEL_EXPERIMENTAL_RESOURCE_DETECTORS turns on), each with the caller's trace id."""
    env = otel_env(otlp_grpc, OTEL_EXPERIMENTAL_RESOURCE_DETECTORS="process")
    server = serve_workers("--workers", "2", env=env)
    pids = worker_pids(server)
    assert set(pids) == {0, 1}
    served: dict[str, int] = {}  # trace id -> worker
    for attempt in range(200):
        trace_id = f"{attempt + 1:032x}"
        served[trace_id] = await _one_stream(server.port, trace_id)
        if set(served.values()) == {0, 1} and len(served) >= 4:
            break
    assert set(served.values()) == {0, 1}, "every connection landed on one worker"
    spans = otlp_grpc.wait(lambda spans: {s.trace_id for s in spans} >= set(served))
    for span in spans:
        if span.trace_id in served:
            assert span.kind == SERVER
            assert span.resource["process.pid"] == pids[served[span.trace_id]], span


async def test_the_parent_comes_through_the_configured_propagators(
    otlp_grpc: Collector, servers: Callable[..., ServerProcess]
) -> None:
    """OTEL_PROPAGATORS picks how the caller's context is read: with ``baggage`` alone,
    a ``traceparent`` is not read, and the SERVER span starts a trace of its own."""
    server = servers(env=otel_env(otlp_grpc, OTEL_PROPAGATORS="baggage"))
    sent = f"{12345:032x}"
    await _one_stream(server.port, sent, worker=False)
    (span,) = otlp_grpc.wait(lambda spans: len(spans) >= 1)
    assert span.kind == SERVER
    assert span.trace_id != sent
    assert span.parent_id == ""


async def _one_stream(port: int, trace_id: str, *, worker: bool = True) -> int:
    """One stream, on a connection of its own, in trace ``trace_id``: its worker."""
    channel = Channel(HOST, port, codec=NumberCodec())
    parent = f"00-{trace_id}-{'1' * 16}-01"
    try:
        async with channel.request(
            ACCUMULATE_NUMBERS,
            Cardinality.STREAM_STREAM,
            NumberRequest,
            NumberResponse,
            timeout=TIMEOUT,
            metadata={"traceparent": parent},
        ) as stream:
            await stream.send_message(NumberRequest(num=1), end=True)
            assert [reply.sum async for reply in stream] == [1]
            assert stream.initial_metadata is not None
            return int(str(stream.initial_metadata[WORKER_HEADER])) if worker else 0
    finally:
        channel.close()


def test_without_the_otel_packages_serve_says_so_in_one_line_and_serves(
    otlp_grpc: Collector, tmp_path: Path
) -> None:
    """The variables ask for traces, but OpenTelemetry cannot be imported: one warning
    line naming the variable, then the server serves as it does without tracing."""
    # A process in which `import opentelemetry...` fails, as without the extra.
    script = (
        "import sys; sys.modules['opentelemetry'] = None; "
        "from number_service.cli import run; sys.argv[0] = 'number-service'; run()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--host", HOST, "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**env_without_buffering(), **otel_env(otlp_grpc)},
    )
    try:
        assert proc.stderr is not None
        from processes import Lines

        server = ServerProcess(proc, Lines(proc.stderr), 0)
        ready = server.stderr.wait_for("listening on", TIMEOUT)
        server.port = int(ready.rsplit(":", 1)[1])
        done = run("accumulate", "--port", str(server.port), "4", "5")
        assert (done.returncode, done.stdout) == (0, "4\n9\n"), done.stderr
        (line,) = stream_lines(server, 1)
        assert "trace_id" not in line
        assert server.stop() == 0
        text = server.stderr.rest()
    finally:
        reap(proc)
    mentions = [line for line in text.splitlines() if "OTEL" in line or "OpenTelemetry" in line]
    assert len(mentions) == 1, text
    assert "OTEL_TRACES_EXPORTER=otlp asks for traces" in mentions[0]
    assert "not installed" in mentions[0]
    assert "Traceback" not in text
    assert otlp_grpc.spans() == []


def test_off_imports_nothing_of_opentelemetry_and_adds_no_listener() -> None:
    """With no OTEL_* variable, building a server imports no OpenTelemetry module and
    attaches no tracing listener: "off" costs nothing per stream or message."""
    script = (
        "import sys\n"
        "from grpclib import events\n"
        "from number_service.server import build_server\n"
        "built = build_server()\n"
        # grpclib's private list of listeners: the one way to count them.
        "listeners = built.server.__dispatch__._listeners\n"
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))\n"
        "print(len(listeners[events.RecvRequest]), len(listeners[events.SendTrailingMetadata]))\n"
    )
    env = {k: v for k, v in env_without_buffering().items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported, counts = done.stdout.splitlines()
    assert imported == "[]"
    assert counts == "1 1"  # Streams' own, and nothing else


@pytest.mark.parametrize(
    ("environ", "asks"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "OTEL_TRACES_EXPORTER=otlp"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"}, "OTEL_EXPORTER_OTLP_ENDPOINT=http://x:1"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:1/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://x:1/v1/traces",
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, None),
    ],
)
def test_which_variables_turn_tracing_on(environ: dict[str, str], asks: str | None) -> None:
    assert tracing.asked_for(environ) == asks


@pytest.mark.parametrize(
    ("value", "asked"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_message_events_are_asked_for_by_the_apps_variable(value: str, asked: bool) -> None:
    assert tracing.messages_env("number-service") == "NUMBER_SERVICE_TRACE_MESSAGES"
    environ = {"NUMBER_SERVICE_TRACE_MESSAGES": value}
    assert tracing.messages_asked("number-service", environ) is asked


# --- in-process: what a provider given to Serving.build gets --------------------------


async def _served(built: Serving) -> tuple[Channel, int]:
    sock = bind(HOST, 0)
    port = sock.getsockname()[1]
    await built.start(sock)
    return Channel(HOST, port, codec=NumberCodec()), port


async def test_message_events_only_when_asked() -> None:
    """``trace_messages``: one ``message`` event per message, numbered each way; without
    it, the counts alone."""
    for asked in (False, True):
        provider, exporter = memory_provider()
        built = Serving.build(
            services(), codec=NumberCodec(), tracer_provider=provider, trace_messages=asked
        )
        channel, _ = await _served(built)
        try:
            async with channel.request(
                ACCUMULATE_NUMBERS,
                Cardinality.STREAM_STREAM,
                NumberRequest,
                NumberResponse,
                timeout=TIMEOUT,
            ) as stream:
                for num in (1, 2, 3):
                    await stream.send_message(NumberRequest(num=num))
                    assert await stream.recv_message() is not None
                await stream.end()
                assert await stream.recv_message() is None
        finally:
            channel.close()
            await built.shutdown(grace=1)
        (span,) = exporter.get_finished_spans()
        assert span.attributes is not None
        assert (span.attributes[MESSAGES_RECEIVED], span.attributes[MESSAGES_SENT]) == (3, 3)
        events = [
            (event.attributes["rpc.message.type"], event.attributes["rpc.message.id"])
            for event in span.events
            if event.attributes is not None
        ]
        if asked:
            assert sorted(events) == [("RECEIVED", n) for n in (1, 2, 3)] + [
                ("SENT", n) for n in (1, 2, 3)
            ]
        else:
            assert events == []


async def test_a_stream_refused_by_the_drain_has_its_span_too(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under plain grpclib (the fallback for other grpclib or h2 releases), a stream
    that arrives while the server drains is refused (UNAVAILABLE) before any stream
    record exists: its SERVER span still ends, with ERROR; and the in-flight stream's
    "stream ended" line, written from a done callback, carries its span's ids.
    (grpclib_ext's connections refuse such a stream with REFUSED_STREAM before grpclib
    sees it: never processed, it has no span, and the client tries it elsewhere.)"""
    monkeypatch.setattr(grpclib_ext, "mismatch", lambda: "h2 0.0 (written for 4.4.1)")
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(logs.TraceIds())
    saved = logs.span_ids
    from number_service.serving.otel import span_ids

    logs.span_ids = span_ids
    provider, exporter = memory_provider()
    built = Serving.build(services(), codec=NumberCodec(), tracer_provider=provider)
    assert not isinstance(built.server, grpclib_ext.Server)
    channel, _ = await _served(built)
    try:
        async with channel.request(
            ACCUMULATE_NUMBERS,
            Cardinality.STREAM_STREAM,
            NumberRequest,
            NumberResponse,
            timeout=TIMEOUT,
        ) as first:
            await first.send_message(NumberRequest(num=1))
            assert await first.recv_message() is not None
            drain = asyncio.create_task(built.shutdown(grace=TIMEOUT))
            await eventually(lambda: built.streams.draining, TIMEOUT)
            with pytest.raises(GRPCError) as refused:
                async with channel.request(
                    ACCUMULATE_NUMBERS,
                    Cardinality.STREAM_STREAM,
                    NumberRequest,
                    NumberResponse,
                    timeout=TIMEOUT,
                ) as second:
                    await second.send_message(NumberRequest(num=1), end=True)
                    await second.recv_message()
            assert refused.value.status is Status.UNAVAILABLE
            await first.end()
            assert await first.recv_message() is None
        # Plain grpclib's close() leaves connections to their clients, and from Python
        # 3.12.1 the drain's wait_closed() waits for them: this client goes first.
        channel.close()
        await asyncio.wait_for(drain, TIMEOUT)
    finally:
        channel.close()
        logs.span_ids = saved
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    statuses = sorted(
        (span.attributes["rpc.grpc.status_code"], span.status.is_ok or span.status.is_unset)
        for span in spans
        if span.attributes is not None
    )
    assert statuses == [(Status.OK.value, True), (Status.UNAVAILABLE.value, False)]
    ok = next(s for s in spans if s.attributes and s.attributes["rpc.grpc.status_code"] == 0)
    (line,) = [r for r in caplog.records if r.getMessage() == "stream ended"]
    assert (getattr(line, "trace_id", None), getattr(line, "span_id", None)) == hex_ids(ok)
    assert os.environ.get("OTEL_TRACES_EXPORTER") is None  # nothing here set the env
