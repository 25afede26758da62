"""``serve --workers N``: real worker processes sharing a port, supervised by a parent.

Which worker served a stream is read from the stream's initial metadata
(``number-service-worker``); worker pids from the parent's ``worker I started: pid P``
lines. SO_REUSEPORT spreads connections by their 4-tuple, so streams on separate
connections (separate source ports) land on both workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from grpclib.client import Stream
from grpclib.const import Cardinality
from grpclib.exceptions import StreamTerminatedError
from polling import eventually
from processes import (
    EXE,
    EXIT_TIMEOUT,
    HOST,
    READY_LINE,
    READY_TIMEOUT,
    RUN_TIMEOUT,
    Lines,
    ServerProcess,
    assert_one_error_line,
    env_without_buffering,
    reap,
    run,
    start_server,
)
from scraping import Scraped, scrape

from number_service import NumberClient
from number_service.codec import NumberCodec
from number_service.service import ACCUMULATE_NUMBERS
from number_service.serving import supervisor
from number_service.serving.grpclib_ext.client import make_channel
from number_service.serving.supervisor import (
    cpu_count,
    make_metrics_dir,
    parse_cpu_max,
    remove_stale_metrics_dirs,
)
from number_service_gen.tutorial import NumberRequest, NumberResponse

TIMEOUT = 20.0  # seconds for any one wait on a server
WORKER_HEADER = "number-service-worker"  # initial metadata: the worker that served
METRICS_DIR_PREFIX = "number-service-metrics-"  # then the parent's pid and a random part
WORKER_LINE = re.compile(r"worker (\d+) (?:started|restarted): pid (\d+)")
ANY_READY_LINE = re.compile(r"listening on \[::\]:(\d+)")
METRICS_LINE = re.compile(r"metrics of all workers on http://127\.0\.0\.1:(\d+)/metrics")
Start = Callable[..., ServerProcess]


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker index to pid, from the parent's log lines read so far (latest wins)."""
    pids: dict[int, int] = {}
    for line in server.stderr.seen:
        if match := WORKER_LINE.search(line):
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def wait_for_all(server: ServerProcess, *needles: str) -> None:
    """Read the server's stderr until a line with each needle has passed (any order)."""
    left = set(needles)
    for line in server.stderr.seen:
        left -= {needle for needle in left if needle in line}
    while left:
        line = server.stderr.wait_for("")
        left -= {needle for needle in left if needle in line}


def alive(pid: int) -> bool:
    """The process exists and has not ended (a zombie left to an init that does not
    reap, as in some containers, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def serve_workers() -> Iterator[Start]:
    """Start ``serve --port 0 ARGS``; at the end, kill what is left, workers too."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_server(0, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        reap(server.proc)
        server.stderr.rest(timeout=0)
        for pid in worker_pids(server).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def open_stream(port: int) -> AsyncIterator[Stream[NumberRequest, NumberResponse]]:
    """One AccumulateNumbers stream on a connection of its own. grpclib's client with
    ``grpclib_ext``'s connections: grpclib's own fails every stream of a connection
    that receives a GOAWAY, the drain's too."""
    channel = make_channel(HOST, port, codec=NumberCodec())
    try:
        async with channel.request(
            ACCUMULATE_NUMBERS,
            Cardinality.STREAM_STREAM,
            NumberRequest,
            NumberResponse,
            timeout=TIMEOUT,
        ) as stream:
            await stream.send_request()
            yield stream
    finally:
        channel.close()


async def add(stream: Stream[NumberRequest, NumberResponse], num: int) -> int:
    await stream.send_message(NumberRequest(num=num))
    reply = await stream.recv_message()
    assert reply is not None
    return reply.sum


def worker_of(stream: Stream[NumberRequest, NumberResponse]) -> int:
    """The worker that serves ``stream`` (known once a response has arrived)."""
    assert stream.initial_metadata is not None
    return int(str(stream.initial_metadata[WORKER_HEADER]))


async def finish(stream: Stream[NumberRequest, NumberResponse]) -> None:
    """Half-close and check the stream ends with OK (recv_trailing_metadata raises if not)."""
    await stream.end()
    assert await stream.recv_message() is None
    await stream.recv_trailing_metadata()


async def one_stream(port: int, numbers: list[int]) -> tuple[int, list[int]]:
    """Run a whole stream on a fresh connection: (the worker that served it, its sums)."""
    async with open_stream(port) as stream:
        sums = [await add(stream, num) for num in numbers]
        worker = worker_of(stream)
        await finish(stream)
    return worker, sums


async def stream_on(
    stack: contextlib.AsyncExitStack, port: int, worker: int
) -> Stream[NumberRequest, NumberResponse]:
    """A stream in flight (one number sent: 1) on ``worker``; other tries are closed."""
    for _ in range(200):
        attempt = contextlib.AsyncExitStack()
        stream = await attempt.enter_async_context(open_stream(port))
        assert await add(stream, 1) == 1
        if worker_of(stream) == worker:
            stack.push_async_exit(attempt)
            return stream
        await finish(stream)
        await attempt.aclose()
    pytest.fail(f"no connection landed on worker {worker} in 200 tries")


async def streams_on_each(
    stack: contextlib.AsyncExitStack, port: int, workers: int, each: int
) -> dict[int, list[Stream[NumberRequest, NumberResponse]]]:
    """Streams in flight (one number sent: 1), at least ``each`` on every one of
    ``workers``, each on a connection of its own, all kept open: connections go to
    the worker that holds fewest, so a stream on one worker takes one on the others."""
    held: dict[int, list[Stream[NumberRequest, NumberResponse]]] = {}
    for _ in range(200):
        if len(held) == workers and min(len(streams) for streams in held.values()) >= each:
            return held
        stream = await stack.enter_async_context(open_stream(port))
        assert await add(stream, 1) == 1
        held.setdefault(worker_of(stream), []).append(stream)
    pytest.fail(f"not {each} stream(s) on each of {workers} workers in 200 tries: {held}")


async def scrape_until(port: int, done: Callable[[Scraped], bool]) -> Scraped:
    """Scrape until ``done(metrics)``: workers write their files in their own time."""
    latest: Scraped = {}

    async def check() -> bool:
        latest.clear()
        latest.update(await asyncio.to_thread(scrape, port))
        return done(latest)

    async with asyncio.timeout(TIMEOUT):
        while True:
            if await check():
                return latest
            await asyncio.sleep(0.05)


async def test_streams_from_separate_connections_are_served_by_both_workers(
    serve_workers: Start,
) -> None:
    server = serve_workers("--workers", "2", "--log-format", "json")
    assert set(worker_pids(server)) == {0, 1}
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(
            *(one_stream(server.port, list(range(k, k + 5))) for k in range(20))
        )
    for k, (_, sums) in enumerate(results):
        assert sums == [sum(range(k, k + n)) for n in range(1, 6)]
    served = [worker for worker, _ in results]
    assert set(served) == {0, 1}, served

    pids = worker_pids(server)
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.stderr.rest().splitlines()]
    ended = [line for line in lines if line["message"] == "stream ended"]
    assert len(ended) == 20
    for line in ended:  # each names its worker and that worker's pid
        assert line["pid"] == pids[line["worker"]], line
    assert sorted(line["worker"] for line in ended) == sorted(served)


async def test_a_killed_worker_is_restarted_and_the_other_keeps_its_streams(
    serve_workers: Start,
) -> None:
    server = serve_workers("--workers", "2")
    async with asyncio.timeout(TIMEOUT), contextlib.AsyncExitStack() as stack:
        survivor = await stream_on(stack, server.port, 0)
        old_pid = worker_pids(server)[1]
        os.kill(old_pid, signal.SIGKILL)

        warning = await asyncio.to_thread(server.stderr.wait_for, "was killed by SIGKILL")
        assert f"worker 1 (pid {old_pid})" in warning
        for num in range(2, 101):  # the stream on worker 0 goes on as if nothing happened
            assert await add(survivor, num) == sum(range(1, num + 1))
        await finish(survivor)

        restarted = await asyncio.to_thread(server.stderr.wait_for, "worker 1 restarted")
        new_pid = int(restarted.rsplit("pid ", 1)[1].split()[0])
        assert new_pid != old_pid
        assert not alive(old_pid)
        fresh = await stream_on(stack, server.port, 1)  # the new worker 1 serves
        assert await add(fresh, 41) == 42
        await finish(fresh)
    assert server.proc.poll() is None
    assert server.stop() == 0


async def test_sigterm_drains_every_worker_and_leaves_no_process(serve_workers: Start) -> None:
    server = serve_workers("--workers", "2", "--grace", "30")
    pids = worker_pids(server)
    async with asyncio.timeout(TIMEOUT), contextlib.AsyncExitStack() as stack:
        streams = [await stream_on(stack, server.port, worker) for worker in (0, 1)]
        server.proc.send_signal(signal.SIGTERM)
        draining = [f"for 1 stream(s) worker={worker}" for worker in (0, 1)]
        await asyncio.to_thread(wait_for_all, server, *draining)
        for stream in streams:  # both go on through the drain and end OK
            assert await add(stream, 2) == 3
            assert await add(stream, 3) == 6
            await finish(stream)
    assert await asyncio.to_thread(server.proc.wait, EXIT_TIMEOUT) == 0
    assert not any(alive(pid) for pid in pids.values())
    text = server.stderr.rest()
    assert "Traceback" not in text
    assert "WARNING" not in text, text


async def test_metrics_of_both_workers_add_up_on_the_parents_endpoint(
    serve_workers: Start,
) -> None:
    server = serve_workers("--workers", "2", "--metrics-port", "0")
    port = next(
        int(match.group(1)) for line in server.stderr.seen if (match := METRICS_LINE.search(line))
    )
    labels = frozenset(
        {
            ("grpc_type", "bidi_stream"),
            ("grpc_service", "tutorial.NumberService"),
            ("grpc_method", "AccumulateNumbers"),
        }
    )

    def value(metrics: Scraped, name: str) -> float:
        return metrics.get((name, labels), 0.0)

    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*(one_stream(server.port, [1] * (k + 1)) for k in range(20)))
        assert {worker for worker, _ in results} == {0, 1}
        async with contextlib.AsyncExitStack() as stack:
            open_streams = [await stream_on(stack, server.port, worker) for worker in (0, 1)]
            # Probes that stream_on closed may still count for a moment: wait for 2.
            await scrape_until(port, lambda m: value(m, "grpc_server_streams_in_flight") == 2)
            for stream in open_streams:
                await finish(stream)
        # A stream's end is counted just after its trailers go out: wait for the last.
        metrics = await scrape_until(port, lambda m: value(m, "grpc_server_streams_in_flight") == 0)
    # The probes stream_on closed on its way count too: reckon from the total.
    started = value(metrics, "grpc_server_started_total")
    assert started >= 22
    handled_ok = metrics[("grpc_server_handled_total", labels | {("grpc_code", "OK")})]
    assert handled_ok == started
    received = sum(range(1, 21)) + (started - 20)  # every probe sent one number
    assert value(metrics, "grpc_server_msg_received_total") == received
    assert value(metrics, "grpc_server_msg_sent_total") == received
    assert value(metrics, "grpc_server_streams_in_flight") == 0
    assert server.stop() == 0


async def test_streams_of_a_killed_worker_are_counted_as_handled_unavailable(
    serve_workers: Start,
) -> None:
    """kill -9 leaves a worker no chance to count the end of its streams: the parent
    counts them, as grpc_code Unavailable (what their clients saw), so that started
    == handled + in flight holds and error-rate dashboards see the crash."""
    server = serve_workers("--workers", "2", "--metrics-port", "0")
    port = next(
        int(match.group(1)) for line in server.stderr.seen if (match := METRICS_LINE.search(line))
    )
    labels = frozenset(
        {
            ("grpc_type", "bidi_stream"),
            ("grpc_service", "tutorial.NumberService"),
            ("grpc_method", "AccumulateNumbers"),
        }
    )

    def value(metrics: Scraped, name: str) -> float:
        return metrics.get((name, labels), 0.0)

    def handled(metrics: Scraped, code: str | None = None) -> float:
        return sum(
            value
            for (name, keys), value in metrics.items()
            if name == "grpc_server_handled_total"
            and labels <= keys
            and (code is None or ("grpc_code", code) in keys)
        )

    def balanced(metrics: Scraped) -> bool:
        started = value(metrics, "grpc_server_started_total")
        return started == handled(metrics) + value(metrics, "grpc_server_streams_in_flight")

    async with asyncio.timeout(TIMEOUT), contextlib.AsyncExitStack() as stack:
        held = await streams_on_each(stack, server.port, 2, 3)  # 3 and 3: exact balance
        doomed, survivors = held[1], held[0]
        assert (len(doomed), len(survivors)) == (3, 3)
        in_flight = "grpc_server_streams_in_flight"
        await scrape_until(port, lambda m: value(m, in_flight) == 6 and balanced(m))
        os.kill(worker_pids(server)[1], signal.SIGKILL)
        await asyncio.to_thread(server.stderr.wait_for, "was killed by SIGKILL")
        metrics = await scrape_until(
            port, lambda m: value(m, in_flight) == 3 and handled(m, "Unavailable") == 3
        )
        assert balanced(metrics), metrics
        for stream in doomed:  # their clients saw the connection go
            with pytest.raises(StreamTerminatedError):
                await add(stream, 1)
        for survivor in survivors:
            assert await add(survivor, 2) == 3
            await finish(survivor)
    metrics = await scrape_until(port, lambda m: value(m, in_flight) == 0 and balanced(m))
    assert handled(metrics, "Unavailable") == 3
    assert handled(metrics, "OK") == value(metrics, "grpc_server_started_total") - 3
    assert server.stop() == 0


@pytest.mark.parametrize("how", [["--workers", "auto"], ["--workers", "0"], []])
def test_auto_starts_one_worker_per_core(serve_workers: Start, how: list[str]) -> None:
    env = {} if how else {"NUMBER_SERVICE_WORKERS": "auto"}
    server = serve_workers(*how, env=env)
    cores = cpu_count()
    ready = server.stderr.seen[-1]
    if cores > 1:
        assert f"({cores} workers)" in ready
        assert f"starting {cores} workers on" in server.stderr.text()
        assert "(auto: cores usable: " in server.stderr.text()
        assert sorted(worker_pids(server)) == list(range(cores))
    else:  # one core: one worker is the plain single process
        assert "workers" not in ready
    assert server.stop() == 0


@pytest.mark.parametrize("value", ["-1", "many", "1.5", ""])
def test_a_bad_worker_count_is_a_usage_error(value: str) -> None:
    result = run("serve", "--port", "0", "--workers", value)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--workers")


def popen_serve(*args: str) -> subprocess.Popen[str]:
    """``number-service serve ARGS``, its stderr a pipe, on whatever address ARGS name."""
    return subprocess.Popen(
        [str(EXE), "serve", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_buffering(),
    )


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serving_on_all_interfaces_takes_ipv4_and_ipv6_clients(workers: str) -> None:
    """``--host ::`` is all interfaces, as ``serve --help`` says, with or without
    workers: a client of 127.0.0.1 is served as well as one of ::1."""
    proc = popen_serve("--host", "::", "--port", "0", "--workers", workers)
    try:
        assert proc.stderr is not None
        stderr = Lines(proc.stderr)
        match = ANY_READY_LINE.search(stderr.wait_for("listening on", READY_TIMEOUT))
        assert match is not None, stderr.text()
        server = ServerProcess(proc, stderr, int(match.group(1)))
        async with asyncio.timeout(TIMEOUT):
            for host in (HOST, "::1"):
                async with NumberClient(host, server.port, timeout=TIMEOUT) as client:
                    assert [s async for s in client.accumulate([1, 2])] == [1, 3], host
        assert server.stop() == 0
    finally:
        reap(proc)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_all_interfaces_is_refused_when_the_ipv4_port_is_in_use(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--host", "::", "--port", str(port), "--workers", workers)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"[::]:{port}", "in use")


def test_a_port_in_use_stops_the_parent_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), "--workers", "2")
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"{HOST}:{port}", "in use")


# --- signals to the whole group, and workers that cannot start ---------------------------


def popen_own_group(*args: str) -> subprocess.Popen[str]:
    """``number-service ARGS`` in a process group of its own, as a terminal's job is."""
    return subprocess.Popen(
        [str(EXE), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_buffering(),
        start_new_session=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_whole_group_drains_without_cutting_the_grace(
    sig: signal.Signals,
) -> None:
    """Ctrl-C in a terminal sends SIGINT to every process of the group, and systemd's
    default stop sends SIGTERM to every process of the unit: each worker then gets the
    signal directly and the parent's forwarded SIGTERM. That must still be one drain
    with its full grace period, not a second signal that cuts it short."""
    proc = popen_own_group(
        "serve", "--host", HOST, "--port", "0", "--workers", "2", "--grace", "30"
    )
    try:
        assert proc.stderr is not None
        server = ServerProcess(proc, Lines(proc.stderr), 0)
        match = READY_LINE.search(server.stderr.wait_for("listening on", READY_TIMEOUT))
        assert match is not None
        server.port = int(match.group(1))
        async with asyncio.timeout(TIMEOUT), contextlib.AsyncExitStack() as stack:
            streams = [await stream_on(stack, server.port, worker) for worker in (0, 1)]
            os.killpg(proc.pid, sig)
            draining = [f"for 1 stream(s) worker={worker}" for worker in (0, 1)]
            await asyncio.to_thread(wait_for_all, server, "stopping", *draining)
            await asyncio.sleep(0.5)  # time for the forwarded SIGTERM to arrive
            for stream in streams:
                assert await add(stream, 2) == 3
                await finish(stream)
        assert await asyncio.to_thread(proc.wait, EXIT_TIMEOUT) == 0
        text = server.stderr.rest()
        assert "grace period over" not in text
        assert "WARNING" not in text, text
    finally:
        reap(proc)
        with contextlib.suppress(ProcessLookupError):  # nothing of the group may be left
            os.killpg(proc.pid, signal.SIGKILL)


FAIL_WORKERS = """
import os
if os.environ.get("NUMBER_SERVICE_WORKER_INDEX") and os.path.exists(os.environ["FAIL_MARKER"]):
    os._exit(3)
"""


def failing_workers(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose workers exit with code 3 at start while ``marker`` exists."""
    (tmp_path / "sitecustomize.py").write_text(FAIL_WORKERS)
    marker = tmp_path / "fail"
    env = {"PYTHONPATH": str(tmp_path), "FAIL_MARKER": str(marker)}
    return env, marker


def test_a_worker_that_cannot_start_stops_the_parent(tmp_path: Path) -> None:
    env, marker = failing_workers(tmp_path)
    marker.touch()
    result = run("serve", "--port", "0", "--workers", "2", env=env)
    assert result.returncode == 1
    assert "exited with code 3 before it was listening; stopped all workers" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_that_keeps_failing_after_a_crash_stops_the_parent(
    serve_workers: Start, tmp_path: Path
) -> None:
    env, marker = failing_workers(tmp_path)
    server = serve_workers("--workers", "2", env=env)
    marker.touch()  # from now on, a new worker exits at once
    os.kill(worker_pids(server)[1], signal.SIGKILL)
    assert server.proc.wait(RUN_TIMEOUT) == 1
    text = server.stderr.rest()
    delays = re.findall(r"worker 1 \(pid \d+\) .*; restarting it in ([0-9.]+) s", text)
    # The SIGKILL, then four failed starts; the fifth gives up.
    assert [float(d) for d in delays] == [0.1, 0.2, 0.4, 0.8, 1.6], text
    assert "worker 1 exited with code 3 before it was listening, 5 times in a row" in text
    assert "Traceback" not in text


async def test_workers_whose_parent_is_killed_drain_and_exit(serve_workers: Start) -> None:
    server = serve_workers("--workers", "2")
    pids = worker_pids(server)
    server.proc.kill()  # no SIGTERM forwarded: the workers see their stdin pipe close
    assert server.proc.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    async with asyncio.timeout(TIMEOUT):
        await asyncio.to_thread(wait_for_all, server, "supervisor gone: draining")
        await eventually(lambda: not any(alive(pid) for pid in pids.values()), TIMEOUT)


HANGING_WORKERS = """
import os, time
if os.environ.get("NUMBER_SERVICE_WORKER_INDEX"):
    time.sleep(3600)  # never gets as far as listening
else:
    import number_service.serving.supervisor
    number_service.serving.supervisor.READY_TIMEOUT = 1.0
"""


def test_a_worker_that_never_gets_ready_is_killed_and_stops_the_parent(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(HANGING_WORKERS)
    result = run("serve", "--port", "0", "--workers", "2", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert re.search(r"worker \d \(pid \d+\) not listening after 1 s; killing it", result.stderr)
    assert "was killed by SIGKILL before it was listening; stopped all workers" in result.stderr
    assert "Traceback" not in result.stderr


CHATTY_WORKERS = """
import os, threading
from number_service.serving import worker

def chatter(marker):
    for _ in range(64):  # 4 MiB, far more than a pipe holds
        os.write(1, b"x" * 65535 + b"\\n")
    open(marker, "w").close()

ready = worker.Worker.ready

def ready_then_chatter(self, address):
    ready(self, address)
    marker = os.path.join(os.environ["CHATTER_DIR"], f"done-{self.index}")
    threading.Thread(target=chatter, args=(marker,), daemon=True).start()

worker.Worker.ready = ready_then_chatter
"""


async def test_a_worker_that_prints_after_it_is_ready_is_not_blocked(
    serve_workers: Start, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(CHATTY_WORKERS)
    env = {"PYTHONPATH": str(tmp_path), "CHATTER_DIR": str(tmp_path)}
    server = serve_workers("--workers", "2", env=env)
    async with asyncio.timeout(TIMEOUT):
        await eventually(lambda: {p.name for p in tmp_path.glob("done-*")} == {"done-0", "done-1"})
        _, sums = await one_stream(server.port, [1, 2, 3])
    assert sums == [1, 3, 6]
    assert server.stop() == 0


def test_only_unlocked_metrics_dirs_are_removed(tmp_path: Path) -> None:
    in_use, in_use_lock = make_metrics_dir_in(tmp_path)
    _, stale_lock = make_metrics_dir_in(tmp_path)
    os.close(stale_lock)  # what the end of its parent does, SIGKILL or not
    unlocked = tmp_path / f"{METRICS_DIR_PREFIX}1-new"  # being made: no lock file yet
    unlocked.mkdir()
    other = tmp_path / "something-else"
    other.mkdir()
    try:
        remove_stale_metrics_dirs(str(tmp_path), METRICS_DIR_PREFIX)
        left = {path.name for path in tmp_path.iterdir()}
        assert left == {Path(in_use).name, unlocked.name, other.name}
    finally:
        os.close(in_use_lock)


def make_metrics_dir_in(where: Path) -> tuple[str, int]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(where))
        path, lock = make_metrics_dir(METRICS_DIR_PREFIX)
    (Path(path) / "counter_1.db").write_bytes(b"x")
    return path, lock


def metrics_dirs(where: Path) -> list[Path]:
    return list(where.glob(f"{METRICS_DIR_PREFIX}*"))


async def test_the_metrics_dir_of_a_killed_parent_is_removed_by_the_next(
    serve_workers: Start, tmp_path: Path
) -> None:
    env = {"TMPDIR": str(tmp_path)}
    first = serve_workers("--workers", "2", "--metrics-port", "0", env=env)
    (left,) = metrics_dirs(tmp_path)
    pids = worker_pids(first)
    first.proc.kill()
    first.proc.wait(EXIT_TIMEOUT)
    async with asyncio.timeout(TIMEOUT):  # its workers drain and exit by themselves
        await eventually(lambda: not any(alive(pid) for pid in pids.values()), TIMEOUT)
    assert metrics_dirs(tmp_path) == [left]  # nobody could remove it
    second = serve_workers("--workers", "2", "--metrics-port", "0", env=env)
    (now,) = metrics_dirs(tmp_path)
    assert now != left
    assert second.stop() == 0
    assert metrics_dirs(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # a part of a CPU still needs a worker: rounded up
        ("50000 100000", 1),
        ("100000 100000", 1),
        ("", None),
        ("garbage", None),
        ("0 100000", None),
        ("1 x", None),
    ],
)
def test_cgroup_cpu_max_is_read_as_whole_cpus(text: str, cpus: int | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(("quota", "expected"), [(None, 4), (2, 2), (8, 4)])
def test_auto_is_the_fewer_of_usable_cores_and_the_cpu_quota(
    monkeypatch: pytest.MonkeyPatch, quota: int | None, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(supervisor, "cgroup_cpu_quota", lambda: quota)
    count, why = supervisor.auto_workers()
    assert count == expected
    assert "cores usable: 4" in why
    assert ("no cgroup CPU quota" in why) == (quota is None)
