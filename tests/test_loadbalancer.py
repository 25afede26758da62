"""Replicas behind a real L7 gRPC load balancer: nginx ``grpc_pass`` in front of two
``number-service serve`` processes, all on 127.0.0.1.

One client connection to nginx carries many streams; nginx balances each stream
(an HTTP/2 request) across the replicas, so they spread although the client holds a
single connection. State is per stream, so no affinity is needed. Stopping a replica
gracefully (SIGTERM) loses no stream: the ones it serves finish, and nginx sends new
ones to the other replica (its connection to the stopped one is refused, which
``grpc_next_upstream``'s default ``error timeout`` retries on the next server).

Which replica served a stream is read from the replicas' own JSON logs: every stream
here sends a different number of requests, and each replica logs ``received`` for
each stream it ends.

nginx runs the README's example configuration (its ``nginx`` block), with the
replicas' ports filled in. The tests skip only when no nginx binary exists;
``.ci/run`` installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import EXIT_TIMEOUT, HOST, ServerProcess, free_port, reap, start_server

from number_service import NumberClient

TIMEOUT = 30.0  # seconds for any one wait in these tests
ACCUMULATE = "/tutorial.NumberService/AccumulateNumbers"

README = Path(__file__).resolve().parent.parent / "README.md"

# Everything but the http block's servers: a foreground nginx whose files all live in
# the test's tmp_path. The servers are the README's example, so the documented
# configuration is the tested one.
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{example}
}}
"""


def readme_example(upstream_ports: list[int], port: int) -> str:
    """The README's nginx block, its upstream servers and listen address made local."""
    (block,) = re.findall(r"```nginx\n(.*?)```", README.read_text(), flags=re.DOTALL)
    servers = re.findall(r"^ *server [^ ;]+;\n", block, flags=re.MULTILINE)
    assert len(servers) == 2, block
    local = "".join(f"    server {HOST}:{p};\n" for p in upstream_ports)
    block = block.replace("".join(servers), local)
    assert "grpc_pass grpc://" in block, block
    listen = re.compile(r"listen \d+ http2;")
    assert listen.search(block), block
    return listen.sub(f"listen {HOST}:{port} http2;", block)


@pytest.fixture
def nginx_binary() -> str:
    """The nginx binary, or skip the test (before any replica starts) saying what is
    missing and how to get it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip(
            "nginx is not installed (not on PATH, /usr/sbin or /usr/local/sbin): "
            "the load-balancer tests need it; `apt-get install nginx` (.ci/run does)"
        )
    return found


def wait_listening(port: int, proc: subprocess.Popen[bytes], error_log: Path) -> None:
    """Return once something accepts on HOST:port; fail if nginx exits or never does."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited ({proc.returncode}): {error_log.read_text()!r}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    pytest.fail(f"nginx did not listen on {HOST}:{port} within {TIMEOUT} s")


@contextlib.contextmanager
def nginx(binary: str, tmp: Path, upstream_ports: list[int]) -> Iterator[int]:
    """nginx balancing gRPC over ``upstream_ports``; yields the port it listens on and
    is killed on the way out, whatever happened."""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, example=readme_example(upstream_ports, port)))
    error_log = tmp / "error.log"
    # -e: the error log before the configuration is read (else /var/log/nginx).
    proc = subprocess.Popen(
        [binary, "-p", str(tmp), "-e", str(error_log), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc, error_log)
        yield port
    finally:
        proc.kill()
        proc.wait(EXIT_TIMEOUT)


@contextlib.contextmanager
def replicas(count: int, *args: str) -> Iterator[list[ServerProcess]]:
    """``count`` ``number-service serve`` processes with JSON logs; reaped afterwards."""
    started: list[ServerProcess] = []
    try:
        for _ in range(count):
            started.append(start_server(0, "--log-format", "json", *args))
        yield started
    finally:
        for replica in started:
            reap(replica.proc)


def served(replica: ServerProcess) -> list[int]:
    """``received`` of every AccumulateNumbers stream the (exited) replica ended OK.

    Fails the test on any other status or on a warning or traceback in its log.
    """
    counts = []
    for line in replica.stderr.rest().splitlines():
        record = json.loads(line)  # a traceback would not be JSON
        assert record["level"] == "INFO", line
        if record["message"] == "stream ended" and record["method"] == ACCUMULATE:
            assert record["status"] == "OK", line
            counts.append(record["received"])
    return counts


def numbers(count: int) -> list[int]:
    return [random.randint(-1000, 1000) for _ in range(count)]


async def test_streams_from_one_connection_spread_across_replicas(
    nginx_binary: str, tmp_path: Path
) -> None:
    lengths = list(range(5, 17))  # 12 streams, each a different number of requests
    with (
        replicas(2) as (first, second),
        nginx(nginx_binary, tmp_path, [first.port, second.port]) as port,
    ):
        async with NumberClient(HOST, port, timeout=TIMEOUT) as client:

            async def stream(length: int) -> None:
                sent = numbers(length)
                assert [s async for s in client.accumulate(sent)] == list(
                    itertools.accumulate(sent)
                )

            # Half one after another, half at once: both over the one connection.
            for length in lengths[:6]:
                await stream(length)
            await asyncio.gather(*(stream(length) for length in lengths[6:]))
        assert first.stop() == 0
        assert second.stop() == 0
        on_first, on_second = served(first), served(second)
    assert sorted(on_first + on_second) == lengths  # each stream served once, all OK
    assert len(on_first) >= 3, (on_first, on_second)  # round robin: about half each
    assert len(on_second) >= 3, (on_first, on_second)


async def test_stopping_a_replica_loses_no_stream(nginx_binary: str, tmp_path: Path) -> None:
    """SIGTERM one replica while streams through nginx are in flight on both: every
    stream finishes with all its sums and OK, and new streams go to the other."""
    in_flight, after = 6, 6
    with (
        replicas(2, "--grace", "20") as (stopped, kept),
        nginx(nginx_binary, tmp_path, [stopped.port, kept.port]) as port,
    ):
        async with NumberClient(HOST, port, timeout=TIMEOUT) as client:
            opened = asyncio.Event()
            stop_sent = asyncio.Event()
            ready = 0

            async def long_stream(index: int) -> None:
                """Lock-step adds before and after the stop; 1 + 10 + index requests."""
                nonlocal ready
                total = 0
                async with client.session() as session:
                    total += 1
                    assert await session.add(1) == total  # open on its replica
                    ready += 1
                    if ready == in_flight:
                        opened.set()
                    await stop_sent.wait()
                    for num in numbers(10 + index):
                        total += num
                        assert await session.add(num) == total
                        await asyncio.sleep(0.01)

            streams = [asyncio.create_task(long_stream(i)) for i in range(in_flight)]
            try:
                await asyncio.wait_for(opened.wait(), TIMEOUT)
                stopped.proc.send_signal(signal.SIGTERM)
                draining = await asyncio.to_thread(stopped.stderr.wait_for, "draining")
                stop_sent.set()
                await asyncio.wait_for(asyncio.gather(*streams), TIMEOUT)
            finally:
                for task in streams:
                    task.cancel()
            assert await asyncio.to_thread(stopped.proc.wait, TIMEOUT) == 0

            # The stopped replica refuses connections now; nginx retries on the other.
            for index in range(after):
                sent = numbers(100 + index)
                assert [s async for s in client.accumulate(sent)] == list(
                    itertools.accumulate(sent)
                )
        assert kept.stop() == 0
        on_stopped, on_kept = served(stopped), served(kept)

    # nginx did try the stopped replica, was refused, and passed the stream on.
    assert (
        "connect() failed (111: Connection refused) while connecting to upstream"
        in (tmp_path / "error.log").read_text()
    )
    drained = json.loads(draining)["message"]
    assert on_stopped, f"no stream was in flight on the stopped replica: {drained}"
    assert f"for {len(on_stopped)} stream(s)" in drained  # all were open at the SIGTERM
    assert all(count < 100 for count in on_stopped)  # nothing new went to it
    assert sorted(on_stopped + on_kept) == sorted(
        [11 + i for i in range(in_flight)] + [100 + i for i in range(after)]
    )
