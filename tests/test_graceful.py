"""Rolling restarts fail no call of a standard gRPC client.

Two ``serve`` replicas on fixed ports; clients make short AccumulateNumbers calls
(three numbers, their sums checked) from several threads without pause while each
replica in turn gets SIGTERM, exits, and is started again on the same port; the next
one is stopped only once the restarted one serves calls again (as a Deployment waits
for readiness). The drain's GOAWAYs take the replica out of the client's round
robin, streams that still reach it are refused with REFUSED_STREAM and retried by
the client on the other replica (grpcio's transparent retry), and the calls in
flight finish: not one call fails. Then the same through nginx, with ``--workers 2``,
with grpc-js (node) and with grpc-go (the benchmarks' Go load client, round_robin).
Real processes on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpcio_peer import Grpcio
from processes import EXIT_TIMEOUT, HOST, Lines, ServerProcess, free_port, reap, start_server
from test_loadbalancer import nginx, nginx_binary  # noqa: F401 - nginx_binary is a fixture

import benchmarks.bench as bench_module

THREADS = 6
CALL_TIMEOUT = 20.0  # seconds for one short call (the machine is shared)
SETTLE = 1.0  # seconds of calls before, between and after the restarts
SERVED_TIMEOUT = 30.0  # seconds for a restarted replica to get calls again
GRACE = "10"  # --grace of each replica: short calls never need it


class Replicas:
    """Two ``serve`` processes (with ``args``) on fixed ports, restarted in place."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.ports = [free_port(), free_port()]
        self.servers: list[ServerProcess] = []
        self.logs: list[str] = []  # stderr of every replica that was stopped

    def start(self, index: int) -> ServerProcess:
        server = start_server(self.ports[index], "--grace", GRACE, *self.args)
        if index < len(self.servers):
            self.servers[index] = server
        else:
            self.servers.append(server)
        return server

    def restart(self, index: int, served: float = SERVED_TIMEOUT) -> None:
        """SIGTERM replica ``index``, wait for its exit (0), start it again on its port
        and return once it has served a call."""
        old = self.servers[index]
        assert old.stop(signal.SIGTERM) == 0
        self.logs.append(old.stderr.rest())
        new = self.start(index)
        new.stderr.wait_for("stream ended", timeout=served)

    def roll(self) -> None:
        for index in (0, 1):
            time.sleep(SETTLE)
            self.restart(index)
        time.sleep(SETTLE)

    def close(self) -> None:
        for server in self.servers:
            reap(server.proc)

    def check_logs(self) -> None:
        """No replica cut a stream at the end of its grace or logged a traceback."""
        for text in self.logs:
            assert "Traceback" not in text, text
            assert "grace period over" not in text, text
            assert "WARNING" not in text, text


@contextlib.contextmanager
def replicas(*args: str) -> Iterator[Replicas]:
    pair = Replicas(*args)
    try:
        for index in (0, 1):
            pair.start(index)
        yield pair
    finally:
        pair.close()


class Calls:
    """Short calls from ``THREADS`` threads until stopped; counts and failures."""

    def __init__(self, stub: Any, pb2: ModuleType) -> None:
        self.stub, self.pb2 = stub, pb2
        self.ok = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(THREADS)]

    def _one(self, k: int) -> None:
        numbers = [k % 100 + 1, -7, 3]
        requests = iter([self.pb2.NumberRequest(num=n) for n in numbers])
        sums = [r.sum for r in self.stub.AccumulateNumbers(requests, timeout=CALL_TIMEOUT)]
        assert sums == list(itertools.accumulate(numbers)), sums

    def _run(self, thread: int) -> None:
        for k in itertools.count(thread * 1000):
            if self._stop.is_set():
                return
            try:
                self._one(k)
            except grpc.RpcError as err:
                with self._lock:
                    self.failed.append(f"{err.code().name}: {err.details()}")
            except AssertionError as err:
                with self._lock:
                    self.failed.append(f"wrong sums: {err}")
            else:
                with self._lock:
                    self.ok += 1

    def __enter__(self) -> Calls:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT + 5)


def channel_options() -> list[tuple[str, Any]]:
    """Reconnect soon after a replica is back (grpcio's backoff starts at 1 s and grows)."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]


def roll_under_calls(
    target: str, options: list[tuple[str, Any]], pair: Replicas, gen: Grpcio
) -> None:
    """Calls through a rolling restart: none may fail."""
    with grpc.insecure_channel(target, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        stub = gen.pb2_grpc.NumberServiceStub(channel)
        with Calls(stub, gen.pb2) as calls:
            pair.roll()
        failed = calls.failed
        assert failed == [], f"{len(failed)} of {calls.ok + len(failed)} failed: {failed[:3]}"
        assert calls.ok > 50, calls.ok
    pair.check_logs()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_grpcio_round_robin_over_a_rolling_restart_fails_no_call(
    grpcio_gen: Grpcio, workers: str
) -> None:
    with replicas("--workers", workers) as pair:
        target = "ipv4:" + ",".join(f"{HOST}:{port}" for port in pair.ports)
        options = [("grpc.lb_policy_name", "round_robin"), *channel_options()]
        roll_under_calls(target, options, pair, grpcio_gen)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_grpcio_through_nginx_over_a_rolling_restart_fails_no_call(
    grpcio_gen: Grpcio,
    nginx_binary: str,  # noqa: F811 - the fixture
    tmp_path: Path,
    workers: str,
) -> None:
    """No call fails (nginx makes a connection per call), with the README's nginx
    configuration. Its `keepalive_requests` matters here: with nginx's default,
    each 1000 requests the client's connection gets a GOAWAY, grpcio 1.85 retries
    the stream it had begun on a new connection, and now and then leaves out one of
    that stream's request messages (a packet capture showed grpcio send 50, 3 where
    the call sent 50, -7, 3: README "Rolling restarts")."""
    with replicas("--workers", workers) as pair, nginx(nginx_binary, tmp_path, pair.ports) as port:
        roll_under_calls(f"{HOST}:{port}", channel_options(), pair, grpcio_gen)


NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture
def grpc_js() -> list[str]:
    """The command that runs tests/node/calls.js, or skip (before any replica starts)
    saying what is missing: node, or grpc-js (``./dev test`` and ``.ci/run`` run
    ``npm ci`` in tests/node when npm is there)."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: `apt-get install nodejs npm` (.ci/run does)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("grpc-js is not installed: `npm ci --prefix tests/node` (./dev test does)")
    return [node, str(NODE_DIR / "calls.js")]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_grpc_js_round_robin_over_a_rolling_restart_fails_no_call(
    grpc_js: list[str], workers: str
) -> None:
    with replicas("--workers", workers) as pair:
        target = "ipv4:" + ",".join(f"{HOST}:{port}" for port in pair.ports)
        proc = subprocess.Popen(
            [*grpc_js, target, str(THREADS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            stdout, stderr = Lines(proc.stdout), Lines(proc.stderr)
            assert stdout.get(timeout=SERVED_TIMEOUT) == "ready\n", stderr.rest()
            pair.roll()
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(CALL_TIMEOUT + 10) == 0, stderr.rest()
            result = json.loads(stdout.rest().splitlines()[-1])
        finally:
            reap(proc)
    assert result["failed"] == [], f"{len(result['failed'])} of {result['ok']} failed"
    assert result["ok"] > 50, result
    pair.check_logs()


GO_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "number-service-bench"


@pytest.fixture
def loadgen() -> Path:
    """The Go load client (benchmarks/loadgen, grpc-go), built in the benchmarks' cache,
    or skip (before any replica starts) saying what is missing."""
    binary, why = bench_module.build_loadgen(GO_CACHE)
    if binary is None:
        pytest.skip(f"the Go load client cannot be built: {why} (.ci/run installs go)")
    return binary


def go_load(
    loadgen: Path, *args: str, during: Callable[[subprocess.Popen[str]], None]
) -> dict[str, Any]:
    """Run the Go load client with ``args`` while ``during(its process)`` runs; its
    JSON result, once it has exited 0 reporting no failed stream."""
    proc = subprocess.Popen(
        [str(loadgen), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        during(proc)
        out, err = proc.communicate(timeout=CALL_TIMEOUT + 30)
    finally:
        reap(proc)
    assert proc.returncode == 0, err or out
    result: dict[str, Any] = json.loads(out)
    assert result.get("error") is None, result
    return result


def test_the_go_load_client_sees_both_goaways_and_no_stream_fails(loadgen: Path) -> None:
    """grpc-go streams (2 connections, 8 pipelined streams, every sum checked) through a
    replica's SIGTERM: each connection gets GOAWAY 2^31-1 then its real last stream id,
    and every stream carries on to OK within the grace (the run ends 3 s after it)."""
    server = start_server(0, "--grace", "30")

    def sigterm(load: subprocess.Popen[str]) -> None:
        time.sleep(2.0)  # the streams are open and answering (it dials in ms)
        server.proc.send_signal(signal.SIGTERM)

    try:
        result = go_load(
            loadgen,
            *("-addr", f"{HOST}:{server.port}", "-mode", "concurrent", "-goaways"),
            *("-streams", "8", "-conns", "2", "-inflight", "10"),
            *("-warmup", "1", "-seconds", "4"),
            during=sigterm,
        )
        assert result["verified"] > 0, result
        goaways = result["goaways"]
        assert len(goaways) == 4, goaways  # two per connection
        assert sorted(goaways)[2:] == [2**31 - 1] * 2, goaways
        assert all(0 < last < 2**31 - 1 and last % 2 for last in sorted(goaways)[:2]), goaways
        assert server.proc.wait(EXIT_TIMEOUT) == 0
        log = server.stderr.rest()
        assert "grace period over" not in log, log
        assert "Traceback" not in log, log
        assert log.count("status=OK") >= 8, log
    finally:
        reap(server.proc)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_go_load_client_round_robin_over_a_rolling_restart_fails_no_stream(
    loadgen: Path, workers: str
) -> None:
    """grpc-go (round_robin over both replicas, 2 connections, short lock-step streams
    from THREADS goroutines, every sum and every OK checked) through a rolling restart
    of both: each connection to a draining replica gets GOAWAY 2^31-1, then its real
    last stream id unless grpc-go, with no stream open on it, has closed it first;
    and not one stream fails (the load client stops at its first failure)."""

    def roll(load: subprocess.Popen[str]) -> None:
        pair.roll()
        load.send_signal(signal.SIGINT)  # it ends its measured window and reports

    with replicas("--workers", workers) as pair:
        result = go_load(
            loadgen,
            *("-addr", ",".join(f"{HOST}:{port}" for port in pair.ports)),
            *("-mode", "short", "-goaways", "-per-stream", "3"),
            *("-streams", str(THREADS), "-conns", "2"),
            *("-warmup", "0", "-seconds", "600"),  # until SIGINT
            during=roll,
        )
    assert result["streams_done"] > 50, result
    goaways = result["goaways"]
    first = goaways.count(2**31 - 1)  # one per connection drained: 2 per replica
    real = [last for last in goaways if last != 2**31 - 1]
    assert first >= 4, goaways
    assert 0 < len(real) <= first, goaways
    assert all(0 < last < 2**31 - 1 and last % 2 for last in real), goaways
    pair.check_logs()
