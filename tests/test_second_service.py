"""The serving layer is generic: MaxEcho, a second service defined only under tests/
(tests/proto/maxecho/, tests/maxecho_service.py), served as its author would serve
it, through the layer's public API (``Serving.build``, ``serve``), gets what
NumberService gets: batched answers on the wire, the graceful drain, health,
reflection, metrics and stream-end log lines of its own, and the message-size
limit; grpclib's generated stub, grpcio and grpcurl are its clients.

Every server here is real, on an ephemeral 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpcio_peer import Grpcio, grpcio_modules
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Server
from grpclib.testing import ChannelFor
from grpcurl_peer import grpcurl, json_values
from h2.events import DataReceived
from maxecho_service import ECHO, REFUSED, RUNNING_MAX, SERVICE, MaxEcho
from polling import eventually
from processes import EXIT_TIMEOUT, READY_TIMEOUT, Lines, reap
from rawh2 import H2Client, Reply, grpc_message
from scraping import scrape

from maxecho_gen.testing.maxecho import EchoReply, EchoRequest, Max, MaxEchoStub, Value
from number_service.serving import Limits, Serving, address_of, bind, options
from number_service.serving.grpclib_ext import BATCH

# grpclib's client with grpclib_ext's connections: grpclib's own fails every stream of
# a connection that receives a GOAWAY, a drain's too.
from number_service.serving.grpclib_ext.client import make_channel
from number_service.serving.metrics import MetricsEndpoint
from number_service.serving.streams import SHUTDOWN_MESSAGE

HOST = "127.0.0.1"
TIMEOUT = 10.0
VALUES = [3, 1, 4, 1, 5, -9, 2**62]
MAXIMA = list(itertools.accumulate(VALUES, max))
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Running:
    """A started MaxEcho server, where it listens, and its metrics endpoint's port."""

    serving: Serving
    port: int
    metrics_port: int


@asynccontextmanager
async def running(limits: Limits | None = None) -> AsyncIterator[Running]:
    """MaxEcho served by ``Serving.build`` with a metrics endpoint, as a user would."""
    built = Serving.build([MaxEcho()], limits=limits)
    sock = bind(HOST, 0)
    await built.start(sock)
    endpoint = await MetricsEndpoint.start(built.metrics, HOST, 0)
    try:
        yield Running(built, address_of(sock)[1], endpoint.port)
    finally:
        await endpoint.close()
        await built.shutdown(grace=0)


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    async with running() as started:
        yield started


def values(*numbers: int) -> bytes:
    """RunningMax requests, gRPC-framed back to back (to go in one DATA frame)."""
    return b"".join(grpc_message(bytes(Value(value=n))) for n in numbers)


def maxima(reply: Reply) -> list[int]:
    return [Max.parse(message).max for message in reply.messages]


# --- clients: the generated stub (in-process and over TCP), grpcio -------------------------


async def check_both_methods(stub: MaxEchoStub) -> None:
    answers = stub.running_max([Value(value=v) for v in VALUES], timeout=TIMEOUT)
    assert [answer.max async for answer in answers] == MAXIMA
    assert await stub.echo(EchoRequest(text="héllo"), timeout=TIMEOUT) == EchoReply(text="héllo")
    with pytest.raises(GRPCError) as refused:
        await stub.echo(EchoRequest(text=REFUSED), timeout=TIMEOUT)
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert refused.value.message == f"text {REFUSED!r} is refused; send another"


async def test_the_generated_stub_over_tcp(server: Running) -> None:
    async with make_channel(HOST, server.port) as channel:
        await check_both_methods(MaxEchoStub(channel))


async def test_the_generated_stub_in_process() -> None:
    async with ChannelFor([MaxEcho()]) as channel:
        await check_both_methods(MaxEchoStub(channel))


@pytest.fixture(scope="module")
def maxecho_grpcio(tmp_path_factory: pytest.TempPathFactory) -> Grpcio:
    """grpcio's messages and stub for maxecho.proto, generated for this run."""
    out = tmp_path_factory.mktemp("maxecho_grpcio")
    return grpcio_modules(out, HERE / "proto", "maxecho/maxecho.proto")


def _grpcio_calls(port: int, gen: Grpcio) -> tuple[list[int], str, grpc.RpcError]:
    channel = grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = gen.pb2_grpc.MaxEchoStub(channel)
        requests = (gen.pb2.Value(value=v) for v in VALUES)
        found = [answer.max for answer in stub.RunningMax(requests, timeout=TIMEOUT)]
        echoed = stub.Echo(gen.pb2.EchoRequest(text="grpcio"), timeout=TIMEOUT).text
        try:
            stub.Echo(gen.pb2.EchoRequest(text=REFUSED), timeout=TIMEOUT)
        except grpc.RpcError as err:
            return found, echoed, err
        raise AssertionError("the refused echo was answered")
    finally:
        channel.close()


async def test_a_grpcio_client(server: Running, maxecho_grpcio: Grpcio) -> None:
    found, echoed, err = await asyncio.to_thread(_grpcio_calls, server.port, maxecho_grpcio)
    assert found == MAXIMA
    assert echoed == "grpcio"
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"text {REFUSED!r} is refused; send another"


# --- batched answers, seen on the wire ----------------------------------------------------


async def call_counting_frames(port: int, path: str, data: bytes) -> tuple[Reply, int]:
    """Send ``data`` on a new stream as one DATA frame with END_STREAM; the reply and
    how many DATA frames (with a payload) it came in."""
    async with await H2Client.connect(port) as h2:
        stream_id = h2.open_stream(path)
        h2.send_data(stream_id, data, end_stream=True)
        reply = h2.replies[stream_id]
        frames = 0
        while not (reply.ended or reply.reset is not None or h2.closed):
            for event in await h2.receive(TIMEOUT):
                if isinstance(event, DataReceived) and event.stream_id == stream_id and event.data:
                    frames += 1
    return reply, frames


async def test_requests_in_one_data_frame_are_answered_in_one(server: Running) -> None:
    """A whole batch of requests in one DATA frame: the answers come in one too, where
    plain grpclib, serving the same service, writes one frame per answer."""
    numbers = [(-1) ** n * n * 1000 for n in range(BATCH)]
    reply, frames = await call_counting_frames(server.port, RUNNING_MAX, values(*numbers))
    assert reply.grpc_status == Status.OK.value, reply
    assert maxima(reply) == list(itertools.accumulate(numbers, max))
    assert frames == 1

    plain = Server([MaxEcho()])
    sock = bind(HOST, 0)
    await plain.start(sock=sock)
    try:
        reply, frames = await call_counting_frames(
            address_of(sock)[1], RUNNING_MAX, values(*numbers)
        )
    finally:
        plain.close()
        await plain.wait_closed()
    assert maxima(reply) == list(itertools.accumulate(numbers, max))
    assert frames == BATCH


async def test_a_lock_step_client_gets_each_answer_before_it_sends_the_next(
    server: Running,
) -> None:
    async with await H2Client.connect(server.port) as h2:
        stream_id = h2.open_stream(RUNNING_MAX)
        reply = h2.replies[stream_id]
        for count, value in enumerate(VALUES, 1):
            h2.send_data(stream_id, values(value))
            await h2.read_until(lambda: len(reply.messages) == count, TIMEOUT)  # noqa: B023
        assert maxima(reply) == MAXIMA
        h2.conn.end_stream(stream_id)
        await h2.reply(stream_id, TIMEOUT)
    assert reply.grpc_status == Status.OK.value


# --- the graceful drain -------------------------------------------------------------------


async def health_status(channel: Channel, service: str) -> Any:
    reply = await HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=TIMEOUT)
    return reply.status


async def test_the_drain_lets_a_stream_in_flight_finish_and_says_not_serving() -> None:
    """shutdown(grace=5) with a RunningMax stream open: health (watched from before)
    says NOT_SERVING, a new call finds the server no longer listening (its
    connection got the drain's GOAWAY, so the call needs a new one), the stream in
    flight carries on to its end, and the drain is over as soon as it has ended, well
    within the grace."""
    built = Serving.build([MaxEcho()])
    sock = bind(HOST, 0)
    await built.start(sock)
    loop = asyncio.get_running_loop()
    shutdown: asyncio.Task[None] | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            channel = await stack.enter_async_context(make_channel(*address_of(sock)))
            watches = []
            for service in ("", SERVICE):
                watch = await stack.enter_async_context(HealthStub(channel).Watch.open())
                await watch.send_message(HealthCheckRequest(service=service), end=True)
                first = await watch.recv_message()
                assert first is not None
                assert first.status == HealthCheckResponse.SERVING
                watches.append(watch)
            call = await stack.enter_async_context(
                channel.request(RUNNING_MAX, Cardinality.STREAM_STREAM, Value, Max)
            )
            await call.send_message(Value(value=4))
            assert await call.recv_message() == Max(max=4)

            started = loop.time()
            shutdown = asyncio.create_task(built.shutdown(grace=5))
            for watch in watches:
                now = await watch.recv_message()
                assert now is not None
                assert now.status == HealthCheckResponse.NOT_SERVING
            await eventually(lambda: built.streams.draining)
            with pytest.raises(ConnectionRefusedError):
                await MaxEchoStub(channel).echo(EchoRequest(text="late"), timeout=TIMEOUT)

            await call.send_message(Value(value=9))  # in flight: it goes on
            assert await call.recv_message() == Max(max=9)
            await call.send_message(Value(value=2))
            assert await call.recv_message() == Max(max=9)
            await call.end()
            assert await call.recv_message() is None  # and status OK: else it raises
            await asyncio.wait_for(shutdown, TIMEOUT)
            assert loop.time() - started < 4, "the drain waited past the stream's end"
    finally:
        if shutdown is None:
            await built.shutdown(grace=0)


async def test_a_stream_still_open_after_the_grace_ends_with_unavailable() -> None:
    built = Serving.build([MaxEcho()])
    sock = bind(HOST, 0)
    await built.start(sock)
    async with make_channel(*address_of(sock)) as channel:
        with pytest.raises(GRPCError) as cut:
            async with channel.request(RUNNING_MAX, Cardinality.STREAM_STREAM, Value, Max) as call:
                await call.send_message(Value(value=-3))
                assert await call.recv_message() == Max(max=-3)
                await asyncio.wait_for(built.shutdown(grace=0.3), TIMEOUT)
                await call.recv_message()
    assert cut.value.status is Status.UNAVAILABLE
    assert cut.value.message == SHUTDOWN_MESSAGE  # the serving layer's own, generic


# --- health and reflection ----------------------------------------------------------------


async def test_health_serving_for_the_server_and_the_service(server: Running) -> None:
    async with make_channel(HOST, server.port) as channel:
        for service in ("", SERVICE):
            assert await health_status(channel, service) == HealthCheckResponse.SERVING
        with pytest.raises(GRPCError) as unknown:
            await health_status(channel, "tutorial.NumberService")
        assert unknown.value.status is Status.NOT_FOUND


async def test_reflection_lists_describes_and_calls_through_grpcurl(server: Running) -> None:
    code, out = await grpcurl(HOST, server.port, "list")
    assert code == 0, out
    assert SERVICE in out.split()
    assert "tutorial.NumberService" not in out

    code, out = await grpcurl(HOST, server.port, "describe", SERVICE)
    assert code == 0, out
    assert (
        "rpc RunningMax ( stream .testing.maxecho.Value ) returns ( stream .testing.maxecho.Max );"
    ) in out
    assert (
        "rpc Echo ( .testing.maxecho.EchoRequest ) returns ( .testing.maxecho.EchoReply );" in out
    )
    code, out = await grpcurl(HOST, server.port, "describe", "testing.maxecho.Value")
    assert code == 0, out
    assert "sint64 value = 1;" in out

    code, out = await grpcurl(HOST, server.port, f"{SERVICE}/Echo", data='{"text": "via Go"}')
    assert code == 0, out
    assert json_values(out) == [{"text": "via Go"}]
    data = " ".join(f'{{"value": {v}}}' for v in VALUES)
    code, out = await grpcurl(HOST, server.port, f"{SERVICE}/RunningMax", data=data)
    assert code == 0, out
    # proto3 JSON writes a 64-bit integer as a string, and leaves out a zero
    assert [int(answer.get("max", 0)) for answer in json_values(out)] == MAXIMA
    code, out = await grpcurl(HOST, server.port, f"{SERVICE}/Echo", data=f'{{"text": "{REFUSED}"}}')
    assert code != 0
    assert "Code: InvalidArgument" in out


# --- metrics and logs ---------------------------------------------------------------------


async def a_known_workload(port: int) -> None:
    """RunningMax: 3 in, 3 out, OK. Echo: 1 in, 1 out, OK; 1 in, 0 out, INVALID_ARGUMENT."""
    async with make_channel(HOST, port) as channel:
        stub = MaxEchoStub(channel)
        answers = stub.running_max([Value(value=v) for v in (7, 2, 8)], timeout=TIMEOUT)
        assert [answer.max async for answer in answers] == [7, 7, 8]
        assert (await stub.echo(EchoRequest(text="a"), timeout=TIMEOUT)).text == "a"
        with pytest.raises(GRPCError):
            await stub.echo(EchoRequest(text=REFUSED), timeout=TIMEOUT)


async def test_metrics_with_the_services_own_labels(server: Running) -> None:
    await a_known_workload(server.port)
    await eventually(lambda: not server.serving.streams.live())
    metrics = await asyncio.to_thread(scrape, server.metrics_port)

    def value(name: str, method: str, grpc_type: str, **extra: str) -> float:
        labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": grpc_type}
        return metrics.get((name, frozenset({**labels, **extra}.items())), 0.0)

    bidi = ("RunningMax", "bidi_stream")
    unary = ("Echo", "unary")
    assert value("grpc_server_started_total", *bidi) == 1
    assert value("grpc_server_handled_total", *bidi, grpc_code="OK") == 1
    assert value("grpc_server_msg_received_total", *bidi) == 3
    assert value("grpc_server_msg_sent_total", *bidi) == 3
    assert value("grpc_server_handling_seconds_count", *bidi) == 1
    assert value("grpc_server_started_total", *unary) == 2
    assert value("grpc_server_handled_total", *unary, grpc_code="OK") == 1
    assert value("grpc_server_handled_total", *unary, grpc_code="InvalidArgument") == 1
    assert value("grpc_server_msg_received_total", *unary) == 2
    assert value("grpc_server_msg_sent_total", *unary) == 1
    assert value("grpc_server_streams_in_flight", *unary) == 0
    services = {dict(labels).get("grpc_service") for _, labels in metrics}
    assert services <= {None, SERVICE}, services  # no one else's labels (nor health's)


def stream_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "number_service.serving.streams"]


async def test_one_log_line_per_finished_stream(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await a_known_workload(server.port)
    await eventually(lambda: len(stream_lines(caplog)) >= 3)
    lines = {(r.method, r.status): r for r in stream_lines(caplog)}  # type: ignore[attr-defined]
    assert set(lines) == {
        (RUNNING_MAX, "OK"),
        (ECHO, "OK"),
        (ECHO, "INVALID_ARGUMENT"),
    }
    bidi = lines[RUNNING_MAX, "OK"]
    assert bidi.getMessage() == "stream ended"
    assert (bidi.received, bidi.sent) == (3, 3)  # type: ignore[attr-defined]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", bidi.peer)  # type: ignore[attr-defined]
    refused = lines[ECHO, "INVALID_ARGUMENT"]
    assert (refused.received, refused.sent) == (1, 0)  # type: ignore[attr-defined]
    assert refused.error == f"text {REFUSED!r} is refused; send another"  # type: ignore[attr-defined]
    assert refused.levelno == logging.INFO
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


# --- the message-size limit ---------------------------------------------------------------


async def echo_64_and_65_bytes(port: int) -> GRPCError:
    """Echo a 64-byte request (answered) and a 65-byte one: its RESOURCE_EXHAUSTED."""
    async with make_channel(HOST, port) as channel:
        stub = MaxEchoStub(channel)
        at_limit = EchoRequest(text="x" * 62)
        assert len(bytes(at_limit)) == 64
        assert (await stub.echo(at_limit, timeout=TIMEOUT)).text == at_limit.text
        with pytest.raises(GRPCError) as over:
            await stub.echo(EchoRequest(text="x" * 63), timeout=TIMEOUT)
    assert over.value.status is Status.RESOURCE_EXHAUSTED
    return over.value


async def test_the_message_size_limit_is_decided_from_the_prefix() -> None:
    """With a 64-byte limit: a request of 64 bytes is answered, 65 are refused with
    RESOURCE_EXHAUSTED; a prefix alone that claims 1 GiB is refused at once, on the
    unary method and mid-stream on the bidi one (after the answers before it)."""
    async with running(Limits(max_message_size=64)) as server:
        over = await echo_64_and_65_bytes(server.port)
        assert "65 bytes" in str(over.message)
        assert "64 bytes" in str(over.message)

        async with await H2Client.connect(server.port) as h2:
            unary = h2.open_stream(ECHO)
            h2.send_data(unary, grpc_message(b"", length=2**30))  # the prefix alone, no end
            reply = await h2.reply(unary, TIMEOUT)
            assert reply.grpc_status == Status.RESOURCE_EXHAUSTED.value, reply
            assert "1073741824 bytes" in str(reply.grpc_message)

            bidi = h2.open_stream(RUNNING_MAX)
            h2.send_data(bidi, values(5, 6) + grpc_message(b"", length=2**30))
            reply = await h2.reply(bidi, TIMEOUT)
            assert maxima(reply) == [5, 6]
            assert reply.grpc_status == Status.RESOURCE_EXHAUSTED.value, reply


# --- what a unary method needs that a bidi one does not --------------------------------------


@pytest.mark.parametrize(
    "path", [ECHO, "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]
)
async def test_a_call_without_its_one_request_is_internal_without_a_traceback(
    server: Running, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """The client half-closes a unary (or server-streaming) call before sending its
    one request: the handlers, betterproto2's generated ones and grpclib's health,
    would fail an assert (a traceback, and UNKNOWN "Internal Server Error"); the
    serving layer answers INTERNAL, saying what was missing."""
    caplog.set_level(logging.DEBUG)
    async with await H2Client.connect(server.port) as h2:
        reply = await h2.call(path=path)  # headers, then END_STREAM, no message
    assert reply.grpc_status == Status.INTERNAL.value, reply
    assert reply.grpc_message == (
        "no request message: the client ended the stream before sending the one "
        f"request that {path} takes"
    )
    await eventually(lambda: len(stream_lines(caplog)) >= 1)
    assert not [r for r in caplog.records if r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- serve(): the layer's own run loop, in a process of its own -----------------------------


Served = tuple[subprocess.Popen[str], Lines, int, int]
MAXECHO_SERVE = [sys.executable, str(HERE / "maxecho_serve.py")]


@contextlib.contextmanager
def maxecho_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """tests/maxecho_serve.py running with ``args`` (and metrics on), with its port and
    its metrics port."""
    proc = subprocess.Popen(
        [*MAXECHO_SERVE, "--port", "0", "--metrics-port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        assert proc.stderr is not None
        stderr = Lines(proc.stderr)
        metrics = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", stderr.wait_for("metrics on"))
        listening = re.search(
            r"listening on 127\.0\.0\.1:(\d+)", stderr.wait_for("listening on", READY_TIMEOUT)
        )
        assert metrics is not None
        assert listening is not None
        yield proc, stderr, int(listening.group(1)), int(metrics.group(1))
    finally:
        reap(proc)


@pytest.fixture
def served() -> Iterator[Served]:
    with maxecho_serve("--grace", "5") as started:
        yield started


async def test_serve_runs_it_until_sigterm_then_drains(served: Served) -> None:
    proc, stderr, port, metrics_port = served
    async with (
        make_channel(HOST, port) as channel,
        channel.request(RUNNING_MAX, Cardinality.STREAM_STREAM, Value, Max) as call,
    ):
        await call.send_message(Value(value=1))
        assert await call.recv_message() == Max(max=1)
        metrics = await asyncio.to_thread(scrape, metrics_port)
        labels = {"grpc_service": SERVICE, "grpc_method": "RunningMax"}
        in_flight = frozenset({**labels, "grpc_type": "bidi_stream"}.items())
        assert metrics[("grpc_server_streams_in_flight", in_flight)] == 1

        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(stderr.wait_for, "draining")
        await call.send_message(Value(value=0))  # in flight: it goes on
        assert await call.recv_message() == Max(max=1)
        await call.end()
        assert await call.recv_message() is None
    code = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT)
    assert code == 0
    text = stderr.rest()
    assert "Traceback" not in text
    (line,) = [line for line in text.splitlines() if "stream ended" in line]
    assert f"method={RUNNING_MAX}" in line
    assert "status=OK received=2 sent=2" in line


# --- the serving layer's options, on MaxEcho's own command ----------------------------------


def test_maxecho_serve_takes_the_layers_serve_options() -> None:
    """Its --help lists the layer's options (``options.serve_options``) with its own
    environment variables, and not --workers, which it leaves out."""
    usage = subprocess.run(
        [*MAXECHO_SERVE, "--help"], capture_output=True, text=True, timeout=TIMEOUT, check=True
    ).stdout
    for option in options.OPTIONS:
        if option.setting != "workers":
            assert option.flag in usage.split()
            assert options.env_var("MAXECHO_", option.setting) in usage
    assert "--workers" not in usage
    assert "NUMBER_SERVICE" not in usage


@pytest.fixture(params=["flag", "environment"])
def limited(request: pytest.FixtureRequest) -> Iterator[Served]:
    """maxecho_serve.py with a 64-byte message limit, set by its flag or its variable."""
    name = options.flag("max_message_size")
    if request.param == "flag":
        started = maxecho_serve(name, "64")
    else:
        started = maxecho_serve(env={options.env_var("MAXECHO_", "max_message_size"): "64"})
    with started as running:
        yield running


async def test_a_serve_option_of_the_layer_takes_effect_and_its_status_names_it(
    limited: Served,
) -> None:
    """``--max-message-size 64`` (or MAXECHO_MAX_MESSAGE_SIZE=64) on MaxEcho's command:
    a 64-byte request is answered, a 65-byte one is RESOURCE_EXHAUSTED (under the
    layer's default of 4 MiB it would be answered), and the status names the flag to
    raise, one that this command has."""
    over = await echo_64_and_65_bytes(limited[2])
    assert over.message == (
        "request message of 65 bytes is larger than the server's limit of 64 bytes; "
        f"send smaller messages or raise {options.flag('max_message_size')}"
    )
    assert options.flag("max_message_size") == "--max-message-size"
