"""``number-service health``: what a Docker HEALTHCHECK runs, against real servers.

Exit 0 and ``SERVING`` while the server serves; exit 1 with one line saying why
otherwise: nothing listening, an unknown service, NOT_SERVING, a drain under way.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest
from processes import EXE, assert_one_error_line, free_port, reap, run, start_server

from number_service import NumberClient
from number_service.pytest_plugin import RunningServer

SERVICE = "tutorial.NumberService"
TIMEOUT = 30.0


async def health(*args: str) -> tuple[int, str, str]:
    """Run ``number-service health ARGS`` without blocking the loop an in-process
    server runs on; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(EXE),
        "health",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_serving_exits_0(number_server: RunningServer, service: str) -> None:
    code, out, err = await health("--port", str(number_server.port), "--service", service)
    assert (code, out, err) == (0, "SERVING\n", "")


async def test_port_from_the_environment_like_serve() -> None:
    """In a container NUMBER_SERVICE_PORT moves both the server and its health check."""
    server = start_server()
    try:
        result = run("health", env={"NUMBER_SERVICE_PORT": str(server.port)})
        assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")
    finally:
        reap(server.proc)


def test_nothing_listening_exits_1_at_once() -> None:
    port = free_port()
    started = time.monotonic()
    result = run("health", "--port", str(port))
    took = time.monotonic() - started
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_error_line(result.stderr, f"127.0.0.1:{port}", "cannot connect", "refused")
    assert took < 5.0  # refused is an answer: no waiting for the 5 s timeout


def test_silent_peer_exits_1_after_the_timeout() -> None:
    """Something accepts the connection but never speaks HTTP/2: --timeout bounds it."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; no one reads
        port = silent.getsockname()[1]
        result = run("health", "--port", str(port), "--timeout", "0.5")
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"127.0.0.1:{port}", "no answer within 0.5 s")


async def test_unknown_service_exits_1(number_server: RunningServer) -> None:
    code, out, err = await health("--port", str(number_server.port), "--service", "no.Such")
    assert (code, out) == (1, "")
    assert_one_error_line(err, "does not know service 'no.Such'")


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_not_serving_exits_1(number_server: RunningServer, service: str) -> None:
    number_server.instance.health.set(False)  # what a drain sets first
    code, out, err = await health("--port", str(number_server.port), "--service", service)
    assert (code, out) == (1, "")
    assert_one_error_line(err, "is NOT_SERVING")


async def test_draining_server_exits_1_while_its_stream_finishes() -> None:
    """A real `serve` draining after SIGTERM: no longer listening, so the check fails
    (and a load balancer or orchestrator stops sending it work) while the stream in
    flight still completes."""
    server = start_server(0, "--grace", "20")
    try:
        client = NumberClient("127.0.0.1", server.port, timeout=TIMEOUT)
        async with client, client.session() as session:
            assert await session.add(1) == 1
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.stderr.wait_for, "draining")
            code, out, err = await health("--port", str(server.port))
            assert (code, out) == (1, "")
            assert_one_error_line(err, "cannot connect")
            assert await session.add(2) == 3
        assert await asyncio.to_thread(server.proc.wait, TIMEOUT) == 0
    finally:
        reap(server.proc)


def test_bad_timeout_is_a_usage_error() -> None:
    result = run("health", "--timeout", "0")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--timeout")
