"""What an operator relies on: health, reflection, metrics, logs, drain and configuration.

Health and reflection are checked with grpcio's own clients (grpcio-health-checking,
grpcio-reflection) as foreign peers in a process of their own (tests/grpcio_probe.py);
signals and configuration against a real ``number-service serve`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from polling import eventually
from processes import (
    HOST,
    assert_one_error_line,
    free_port,
    reap,
    run,
    start_server,
)
from scraping import scrape

from number_service import INT32_MAX, NumberClient, build_server, healthcheck
from number_service.pytest_plugin import RunningServer
from number_service.serving.metrics import MAX_CONNECTIONS, MetricsEndpoint
from number_service.serving.run import address_of, bind

SERVICE = "tutorial.NumberService"
TIMEOUT = 10.0
PROBE = Path(__file__).with_name("grpcio_probe.py")


async def probe(server: RunningServer, *args: str) -> str:
    """Run grpcio_probe.py against ``server``; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        args[0],
        f"{server.host}:{server.port}",
        *args[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 3 * TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return out.decode()


# --- health (grpcio-health-checking as the client) ---------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_serving(number_server: RunningServer, service: str) -> None:
    assert await probe(number_server, "check", service) == "SERVING\n"


async def test_health_unknown_service_is_not_found(number_server: RunningServer) -> None:
    assert await probe(number_server, "check", "no.such.Service") == "NOT_FOUND\n"


async def test_health_not_serving_while_draining(
    number_server: RunningServer, number_server_client: NumberClient
) -> None:
    """Watch sees SERVING then NOT_SERVING, while a stream in flight finishes and new
    streams are refused."""
    watcher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        "watch",
        f"{number_server.host}:{number_server.port}",
        SERVICE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert watcher.stdout is not None
    try:
        line = await asyncio.wait_for(watcher.stdout.readline(), TIMEOUT)
        assert line == b"SERVING\n"
        async with number_server_client.session() as session:
            assert await session.add(1) == 1
            drain = asyncio.create_task(number_server.instance.shutdown(grace=TIMEOUT))
            line = await asyncio.wait_for(watcher.stdout.readline(), TIMEOUT)
            assert line == b"NOT_SERVING\n"
            with pytest.raises(GRPCError) as refused:  # a new stream, same connection
                async for _ in number_server_client.accumulate([1]):
                    pass
            assert refused.value.status is Status.UNAVAILABLE
            assert await session.add(2) == 3  # the stream in flight carries on
        await asyncio.wait_for(drain, TIMEOUT)  # the drain ends as soon as it is done
    finally:
        if watcher.returncode is None:
            watcher.kill()
        await watcher.wait()


async def test_health_check_answers_not_serving_during_the_drain(
    number_server: RunningServer,
) -> None:
    number_server.instance.streams.draining = True  # what shutdown() sets first
    number_server.instance.health.set(False)
    assert await probe(number_server, "check", SERVICE) == "NOT_SERVING\n"
    assert await probe(number_server, "check", "") == "NOT_SERVING\n"


# --- reflection (grpcio-reflection as the client) ---------------------------------------


async def test_reflection_describes_the_service(number_server: RunningServer) -> None:
    described = json.loads(await probe(number_server, "describe"))
    assert SERVICE in described["services"]
    assert "grpc.health.v1.Health" in described["services"]
    assert described["client_streaming"] is True
    assert described["server_streaming"] is True
    assert described["input"] == "tutorial.NumberRequest"
    assert described["output"] == "tutorial.NumberResponse"
    int32 = 5  # FieldDescriptor.TYPE_INT32
    assert described["messages"] == {
        "tutorial.NumberRequest": [["num", 1, int32]],
        "tutorial.NumberResponse": [["sum", 1, int32]],
    }


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_services_on_both_versions(
    number_server: RunningServer, version: str
) -> None:
    listed = (await probe(number_server, "list", version)).split()
    assert SERVICE in listed
    assert "grpc.health.v1.Health" in listed


# --- metrics ----------------------------------------------------------------------------


@pytest.fixture
async def metrics_port(number_server: RunningServer) -> AsyncIterator[int]:
    endpoint = await MetricsEndpoint.start(number_server.instance.metrics, "127.0.0.1", 0)
    yield endpoint.port
    await endpoint.close()


async def test_half_sent_metrics_requests_take_no_thread_and_do_not_block_scrapes(
    number_server_client: NumberClient, metrics_port: int
) -> None:
    """500 connections each sending half a request and waiting: prometheus-client's
    own server started a thread for each (2 -> 502 threads). The endpoint runs on the
    event loop: no thread is started, at most MAX_CONNECTIONS stay open (each new
    one closes the oldest), and a scrape in the middle of it is answered."""
    assert [s async for s in number_server_client.accumulate([1])] == [1]
    threads = threading.active_count()
    held = []
    try:
        for _ in range(500):
            reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
            writer.write(b"GET /metr")
            held.append((reader, writer))
        await asyncio.sleep(0.2)
        assert threading.active_count() == threads
        metrics = await asyncio.to_thread(scrape, metrics_port)
        assert any(name == "grpc_server_started_total" for name, _ in metrics), metrics
        open_now = 0
        for reader, _ in held:
            with contextlib.suppress(TimeoutError, ConnectionError):
                if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                    continue  # closed by the server
            open_now += 1
        assert open_now <= MAX_CONNECTIONS, open_now
    finally:
        for _, writer in held:
            writer.transport.abort()


async def test_a_metrics_request_head_over_8_kib_is_refused(metrics_port: int) -> None:
    """A request head that goes on past MAX_REQUEST_HEAD gets a 4xx and the close,
    instead of being buffered without end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000)
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
    finally:
        writer.close()


async def test_metrics_count_a_known_workload(
    number_server: RunningServer, number_server_client: NumberClient, metrics_port: int
) -> None:
    client = number_server_client
    assert [s async for s in client.accumulate([1, 2, 3])] == [1, 3, 6]  # OK, 3 in 3 out
    assert [s async for s in client.accumulate([])] == []  # OK, 0 in 0 out
    with pytest.raises(GRPCError):  # OUT_OF_RANGE, 2 in 1 out
        async for _ in client.accumulate([INT32_MAX, 1]):
            pass
    with pytest.raises(LookupError):  # CANCELLED by the client, 2 in 2 out
        async with client.session() as session:
            assert await session.add(1) == 1
            assert await session.add(1) == 2
            raise LookupError("the caller gives up")
    await eventually(lambda: not number_server.instance.streams.live())

    metrics = await asyncio.to_thread(scrape, metrics_port)
    labels = {
        ("grpc_type", "bidi_stream"),
        ("grpc_service", SERVICE),
        ("grpc_method", "AccumulateNumbers"),
    }

    def value(name: str, **extra: str) -> float:
        return metrics.get((name, frozenset(labels | set(extra.items()))), 0.0)

    assert value("grpc_server_started_total") == 4
    assert value("grpc_server_handled_total", grpc_code="OK") == 2
    assert value("grpc_server_handled_total", grpc_code="OutOfRange") == 1
    assert value("grpc_server_handled_total", grpc_code="Canceled") == 1
    assert value("grpc_server_handling_seconds_count") == 4
    assert value("grpc_server_handling_seconds_bucket", le="+Inf") == 4
    assert value("grpc_server_streams_in_flight") == 0
    assert value("grpc_server_msg_received_total") == 3 + 0 + 2 + 2
    assert value("grpc_server_msg_sent_total") == 3 + 0 + 1 + 2


async def test_metrics_show_streams_in_flight(
    number_server_client: NumberClient, metrics_port: int
) -> None:
    async with number_server_client.session() as a, number_server_client.session() as b:
        assert await a.add(1) == 1
        assert await b.add(1) == 1
        metrics = await asyncio.to_thread(scrape, metrics_port)
        key = frozenset(
            {
                ("grpc_type", "bidi_stream"),
                ("grpc_service", SERVICE),
                ("grpc_method", "AccumulateNumbers"),
            }
        )
        assert metrics[("grpc_server_streams_in_flight", key)] == 2
        assert metrics[("grpc_server_msg_received_total", key)] == 2


async def test_an_open_streams_messages_reach_the_registry_without_a_scrape(
    number_server: RunningServer, number_server_client: NumberClient
) -> None:
    """Message counters are folded in per stream (not per message), but an open
    stream's messages still reach the registry within a few seconds when nothing
    scrapes our endpoint: what a worker's multiprocess files (read by the supervisor)
    and any other exposition of the registry see."""
    registry = number_server.instance.metrics.registry
    labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": SERVICE,
        "grpc_method": "AccumulateNumbers",
    }

    def value(name: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    async with number_server_client.session() as session:
        assert [await session.add(n) for n in (1, 2, 3)] == [1, 3, 6]
        await eventually(lambda: value("grpc_server_msg_received_total") == 3, timeout=TIMEOUT)
        assert value("grpc_server_msg_sent_total") == 3
        assert await session.add(4) == 10
    await eventually(lambda: not number_server.instance.streams.live())
    assert value("grpc_server_msg_received_total") == 4  # the rest folded in at its end
    assert value("grpc_server_msg_sent_total") == 4


# --- logs -------------------------------------------------------------------------------


def stream_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "number_service.serving.streams"]


async def wait_for_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    await eventually(lambda: len(stream_lines(caplog)) >= count)
    return stream_lines(caplog)


async def test_one_log_line_per_stream(
    number_server: RunningServer,
    number_server_client: NumberClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    assert [s async for s in number_server_client.accumulate([5, 6])] == [5, 11]
    (line,) = await wait_for_lines(caplog, 1)
    assert line.levelno == logging.INFO
    assert line.__dict__["method"] == "/tutorial.NumberService/AccumulateNumbers"
    assert line.__dict__["peer"].startswith("127.0.0.1:")
    assert line.__dict__["status"] == "OK"
    assert (line.__dict__["received"], line.__dict__["sent"]) == (2, 2)
    assert line.__dict__["duration_ms"] >= 0


@pytest.mark.parametrize(
    ("client_host", "peer"),
    [("::1", r"\[::1\]:\d+"), ("127.0.0.1", r"127\.0\.0\.1:\d+")],
    ids=["ipv6", "ipv4-on-dual-stack"],
)
async def test_the_log_line_names_the_peer_as_host_port(
    caplog: pytest.LogCaptureFixture, client_host: str, peer: str
) -> None:
    """``[::1]:40818``, not the ambiguous ``::1:40818``; an IPv4 client of a
    dual-stack socket is ``127.0.0.1:40818``, not ``[::ffff:127.0.0.1]:40818``."""
    caplog.set_level(logging.INFO)
    sock = bind("::", 0)
    built = build_server()
    await built.start(sock)
    try:
        async with NumberClient(client_host, address_of(sock)[1], timeout=TIMEOUT) as client:
            assert [s async for s in client.accumulate([1])] == [1]
        (line,) = await wait_for_lines(caplog, 1)
    finally:
        await built.shutdown(grace=0)
    assert re.fullmatch(peer, line.__dict__["peer"]), line.__dict__["peer"]


async def test_health_probes_log_at_debug_only(
    number_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A probe every few seconds must not fill an info-level log.
    caplog.set_level(logging.DEBUG)
    await healthcheck.check(number_server.host, number_server.port)
    (line,) = await wait_for_lines(caplog, 1)
    assert line.__dict__["method"] == "/grpc.health.v1.Health/Check"
    assert (line.levelno, line.__dict__["status"]) == (logging.DEBUG, "OK")


async def test_client_cancel_and_deadline_are_info_lines_without_traceback(
    number_server_client: NumberClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async for _ in number_server_client.accumulate(range(10**6)):
        break  # the client cancels
    with pytest.raises(GRPCError):
        async with number_server_client.session(timeout=0.2) as session:
            await session.add(1)
            await asyncio.sleep(0.6)
            await session.add(1)
    lines = await wait_for_lines(caplog, 2)
    assert sorted(line.__dict__["status"] for line in lines) == [
        "CANCELLED",
        "DEADLINE_EXCEEDED",
    ]
    assert all(line.levelno == logging.INFO for line in lines)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_json_log_lines_and_no_traceback_on_disconnect() -> None:
    srv = start_server(0, "--log-format", "json")
    try:
        with socket.create_connection((HOST, srv.port), timeout=TIMEOUT) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # then just hang up
        result = run("accumulate", "--port", str(srv.port), "1", "2")
        assert result.returncode == 0, result.stderr
        assert srv.stop(signal.SIGTERM) == 0
        lines = [json.loads(line) for line in srv.stderr.rest().splitlines()]
    finally:
        reap(srv.proc)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    (stream,) = [line for line in lines if line["message"] == "stream ended"]
    assert stream["status"] == "OK"
    assert (stream["received"], stream["sent"]) == (2, 2)
    assert stream["method"] == "/tutorial.NumberService/AccumulateNumbers"
    assert not [line for line in lines if line.get("exc_info") or line["level"] == "ERROR"]


# --- graceful shutdown on a signal, for real --------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_streams(sig: signal.Signals) -> None:
    grace = 2.0
    srv = start_server(0, "--grace", str(grace))
    try:
        async with (  # not resumed: the drain's own UNAVAILABLE is what is looked at
            NumberClient(HOST, srv.port, timeout=TIMEOUT, resume=False) as finisher,
            NumberClient(HOST, srv.port, timeout=TIMEOUT, resume=False) as lingerer,
            finisher.session() as done_in_time,
        ):
            assert await done_in_time.add(1) == 1
            with pytest.raises(GRPCError) as cut:
                async with lingerer.session() as too_slow:
                    assert await too_slow.add(10) == 10
                    signalled = time.monotonic()
                    srv.proc.send_signal(sig)
                    await asyncio.to_thread(srv.stderr.wait_for, "draining")
                    with pytest.raises(ConnectionRefusedError):  # no new connections
                        socket.create_connection((HOST, srv.port), timeout=TIMEOUT).close()
                    # The stream in flight completes, with all its sums and OK.
                    assert await done_in_time.add(2) == 3
                    assert await done_in_time.add(3) == 6
                    await done_in_time.close()
                    await asyncio.sleep(grace + 0.5)  # outlive the grace period
                    await too_slow.add(1)
            assert cut.value.status is Status.UNAVAILABLE
            assert "shut down" in (cut.value.message or "")
        code = await asyncio.to_thread(srv.proc.wait, grace + 1)
        assert code == 0
        assert time.monotonic() - signalled < grace + 1
        assert "Traceback" not in srv.stderr.rest()
    finally:
        reap(srv.proc)


@pytest.mark.parametrize("client", ["grpclib-after-a-call", "tcp-only"])
async def test_sigterm_exits_while_a_client_holds_an_idle_connection(client: str) -> None:
    """A client that keeps its connection open (no stream on it) must not hold the
    drain: from Python 3.12.1 asyncio's Server.wait_closed() waits for every
    connection, and such a server never exited, not even on a second signal."""
    srv = start_server(0)
    try:
        async with contextlib.AsyncExitStack() as held:
            if client == "tcp-only":  # never says a word, not even the HTTP/2 preface
                held.enter_context(socket.create_connection((HOST, srv.port), timeout=TIMEOUT))
            else:
                idle = await held.enter_async_context(NumberClient(HOST, srv.port, timeout=TIMEOUT))
                assert [s async for s in idle.accumulate([1, 2])] == [1, 3]
            await asyncio.sleep(0.2)  # the server has the connection, not just the kernel
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(wait_or_none, srv.proc, EXIT_IN)
            took = time.monotonic() - signalled
        assert code == 0, f"serve still running {EXIT_IN} s after SIGTERM: {srv.stderr.rest()!r}"
        assert took < EXIT_IN
        log = srv.stderr.rest()
        assert "stopped" in log
        assert "Traceback" not in log
    finally:
        reap(srv.proc)


EXIT_IN = 5.0  # seconds for serve to exit on SIGTERM with no stream open (it takes ~0.1)


def wait_or_none(proc: subprocess.Popen[str], timeout: float) -> int | None:
    """The process's exit code, or None if it is still running after ``timeout`` s."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


# --- configuration ----------------------------------------------------------------------


def test_environment_configures_serve_and_flags_win() -> None:
    env_port, flag_port = free_port(), free_port()
    srv = start_server(flag_port, env={"NUMBER_SERVICE_PORT": str(env_port)})
    try:
        assert srv.port == flag_port  # the flag wins over the environment
    finally:
        srv.stop(signal.SIGTERM)
        reap(srv.proc)
    srv = start_server(
        flag_port, env={"NUMBER_SERVICE_METRICS_PORT": "0", "NUMBER_SERVICE_LOG_FORMAT": "json"}
    )
    try:
        lines = [json.loads(line) for line in srv.stderr.seen]  # JSON, from the environment
        assert any(line["message"].startswith("metrics on http://") for line in lines)
    finally:
        srv.stop(signal.SIGTERM)
        reap(srv.proc)


@pytest.mark.parametrize(
    ("args", "env", "code", "needles"),
    [
        (["--port", "x"], {}, 2, ["--port", "'x'"]),
        ([], {"NUMBER_SERVICE_PORT": "99999"}, 2, ["NUMBER_SERVICE_PORT", "99999"]),
        (["--port", "0", "--grace", "-1"], {}, 2, ["--grace"]),
        (["--port", "0", "--log-format", "xml"], {}, 2, ["--log-format", "xml"]),
    ],
    ids=["bad-flag", "bad-env", "negative-grace", "bad-choice"],
)
def test_bad_configuration_is_one_clear_line(
    args: list[str], env: dict[str, str], code: int, needles: list[str]
) -> None:
    result = run("serve", *args, env=env)
    assert result.returncode == code
    assert_one_error_line(result.stderr, *needles)


def test_metrics_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", "0", "--metrics-port", str(port))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "metrics", f"{HOST}:{port}", "in use")


async def test_client_disconnect_is_an_info_line_without_traceback(
    number_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = NumberClient(number_server.host, number_server.port)
    with pytest.raises(GRPCError) as caught:
        async with client.session() as session:
            assert await session.add(1) == 1
            client.close()  # the connection goes, mid-stream, with no goodbye for the stream
            await session.add(1)
    assert caught.value.status is Status.UNAVAILABLE
    await eventually(lambda: not number_server.instance.streams.live())
    (line,) = await wait_for_lines(caplog, 1)
    assert line.__dict__["status"] == "CANCELLED"
    assert line.levelno == logging.INFO
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
