"""``serve --workers N`` spreads open connections exactly: each worker holds floor(C/N)
or ceil(C/N) of C, as Envoy's ``exact_balance`` does, where SO_REUSEPORT's hash of
the 4-tuple would not (4 connections over 2 workers land 3/1 or 4/0 more often than
2/2).

Real server processes on 127.0.0.1. Which worker holds a connection is read from
the initial metadata of the stream on it (``number-service-worker``); the parent's
own count per worker, ``grpc_server_worker_connections`` on its metrics endpoint,
tells when it has seen a connection close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
from collections import Counter

import pytest
from grpclib.client import Stream
from processes import HOST
from scraping import Scraped, scrape
from test_drain import assert_refused_not_reset, connect_late
from test_workers import (
    METRICS_LINE,
    TIMEOUT,
    Start,
    add,
    finish,
    one_stream,
    open_stream,
    serve_workers,
    worker_of,
    worker_pids,
)

from number_service import server
from number_service.serving import supervisor
from number_service.serving.balance import Balancer
from number_service_gen.tutorial import NumberRequest, NumberResponse

__all__ = ["serve_workers"]  # a fixture of test_workers, used here too

GAUGE = "grpc_server_worker_connections"


class Held:
    """Connections held open, one stream on each, by the worker serving it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stack = contextlib.AsyncExitStack()
        self.by_worker: dict[int, list[contextlib.AsyncExitStack]] = {}

    async def open(self) -> int:
        """One more connection (and stream); the worker that took it."""
        one = contextlib.AsyncExitStack()
        stream: Stream[NumberRequest, NumberResponse] = await one.enter_async_context(
            open_stream(self.port)
        )
        assert await add(stream, 7) == 7
        worker = worker_of(stream)
        one.push_async_callback(finish, stream)
        self.by_worker.setdefault(worker, []).append(one)
        return worker

    async def close(self, worker: int, count: int) -> None:
        """Close ``count`` of the connections ``worker`` holds (their streams end OK)."""
        for _ in range(count):
            await self.by_worker[worker].pop().aclose()

    def counts(self, workers: int) -> list[int]:
        return [len(self.by_worker.get(index, [])) for index in range(workers)]

    async def aclose(self) -> None:
        for held in self.by_worker.values():
            for one in held:
                await one.aclose()


def assert_exact(counts: list[int]) -> None:
    """Every worker holds floor(C/N) or ceil(C/N) of the C connections."""
    total, workers = sum(counts), len(counts)
    allowed = {total // workers, -(-total // workers)}
    assert set(counts) <= allowed, f"{total} connections over {workers} workers: {counts}"


def filled(counts: list[int], more: int) -> list[int]:
    """The counts, sorted, after ``more`` connections, each to a least-loaded worker."""
    counts = sorted(counts)
    for _ in range(more):
        counts[0] += 1
        counts.sort()
    return counts


def gauge(metrics: Scraped, workers: int) -> list[int]:
    return [int(metrics.get((GAUGE, frozenset({("worker", str(i))})), -1)) for i in range(workers)]


async def parent_sees(metrics_port: int, counts: list[int]) -> None:
    """Wait until the parent counts ``counts`` open connections per worker."""
    latest: list[int] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                latest = gauge(await asyncio.to_thread(scrape, metrics_port), len(counts))
                if latest == counts:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"the parent counts {latest} connections per worker, not {counts}")


@pytest.mark.parametrize("workers", [2, 3])
async def test_connections_opened_one_after_another_are_spread_exactly(
    serve_workers: Start, workers: int
) -> None:
    """Checked at 2, 4, 5, 7, 10 and 16 connections: under SO_REUSEPORT's hash
    all six hold together about 1 time in 50 with 2 workers, less with 3."""
    server = serve_workers("--workers", str(workers))
    held = Held(server.port)
    try:
        async with asyncio.timeout(TIMEOUT * 2):
            for total in (2, 4, 5, 7, 10, 16):
                while sum(held.counts(workers)) < total:
                    await held.open()
                assert_exact(held.counts(workers))
    finally:
        await held.aclose()
    assert server.stop() == 0


@pytest.mark.parametrize("workers", [2, 3])
async def test_a_closed_connection_frees_its_slot(serve_workers: Start, workers: int) -> None:
    """New connections go to the workers that hold the fewest *open* ones: after every
    connection of one worker closes, the next ones all go to it."""
    server = serve_workers("--workers", str(workers), "--metrics-port", "0")
    metrics_port = next(
        int(match.group(1)) for line in server.stderr.seen if (match := METRICS_LINE.search(line))
    )
    held = Held(server.port)
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            for _ in range(7):
                await held.open()
            counts = held.counts(workers)
            assert_exact(counts)
            await parent_sees(metrics_port, counts)

            fullest = counts.index(max(counts))
            emptied = counts[fullest]
            await held.close(fullest, emptied)
            before = held.counts(workers)
            await parent_sees(metrics_port, before)
            landed = [await held.open() for _ in range(emptied)]
            # Until it holds as many as the next least loaded, every one goes to it.
            behind = min(count for index, count in enumerate(before) if index != fullest)
            assert landed[:behind] == [fullest] * behind, (before, landed)
            assert sorted(held.counts(workers)) == filled(before, emptied), (before, landed)
            assert_exact(held.counts(workers))

            # Close some here and there, open a few: each goes to a least-loaded one.
            await held.close(0, 2)
            await held.close(workers - 1, 1)
            before = held.counts(workers)
            await parent_sees(metrics_port, before)
            for _ in range(4):
                await held.open()
            assert sorted(held.counts(workers)) == filled(before, 4), (before, held.counts(workers))
            await parent_sees(metrics_port, held.counts(workers))
    finally:
        await held.aclose()
    await parent_sees(metrics_port, [0] * workers)
    assert server.stop() == 0


async def test_a_draining_worker_gets_none_and_a_restarted_one_fills_up(
    serve_workers: Start,
) -> None:
    """A worker told to stop by itself (SIGTERM to it alone) takes no new connections
    while it drains; restarted, it holds none, and takes every new one until even."""
    server = serve_workers("--workers", "2", "--grace", "30", "--metrics-port", "0")
    metrics_port = next(
        int(match.group(1)) for line in server.stderr.seen if (match := METRICS_LINE.search(line))
    )
    held = Held(server.port)
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            assert sorted([await held.open(), await held.open()]) == [0, 1]
            os.kill(worker_pids(server)[1], signal.SIGTERM)
            await asyncio.to_thread(server.stderr.wait_for, "for 1 stream(s) worker=1")
            landed = [await held.open() for _ in range(3)]
            assert landed == [0, 0, 0], landed
            await held.close(1, 1)  # its drain is over: it ends, and is restarted
            await asyncio.to_thread(server.stderr.wait_for, "worker 1 restarted")
            await parent_sees(metrics_port, [4, 0])
            landed = [await held.open() for _ in range(4)]
            assert landed == [1, 1, 1, 1], landed
            await parent_sees(metrics_port, [4, 4])
    finally:
        await held.aclose()
    assert server.stop() == 0


async def test_a_parent_out_of_descriptors_says_so_once_and_accepts_again(
    serve_workers: Start,
) -> None:
    """accept() failing (EMFILE here: the parent's descriptor limit lowered to its
    lowest free descriptor) is one warning, not a busy loop nor one line per try; the
    connection waits in the backlog and is served once descriptors are there again."""
    server = serve_workers("--workers", "2")
    pid = server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        async with asyncio.timeout(TIMEOUT):
            # A new descriptor is the lowest free number, and must be below the limit.
            used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
            lowest_free = min(set(range(len(used) + 1)) - used)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
            waiting = asyncio.create_task(one_stream(server.port, [1, 2, 3]))
            line = await asyncio.to_thread(server.stderr.wait_for, "cannot accept connections")
            assert "Too many open files" in line, line
            await asyncio.sleep(0.5)  # five more tries at least
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            _, sums = await waiting
            assert sums == [1, 3, 6]
            await asyncio.to_thread(server.stderr.wait_for, "accepting connections again")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert server.stop() == 0
    assert server.stderr.text().count("cannot accept connections") == 1


async def test_short_connections_one_after_another_take_turns(serve_workers: Start) -> None:
    """Ties go round: connections opened and closed one at a time are served by every
    worker in turn, not all by the first. (In turn exactly when the parent has seen each
    close before the next connection; a close it has not seen yet sends the next one
    on: so at least 2 of 9 each, not 3.)"""
    server = serve_workers("--workers", "3")
    served = []
    async with asyncio.timeout(TIMEOUT):
        for _ in range(9):
            async with open_stream(server.port) as stream:
                assert await add(stream, 1) == 1
                served.append(worker_of(stream))
                await finish(stream)
    assert sorted(Counter(served)) == [0, 1, 2], served
    assert min(Counter(served).values()) >= 2, served
    assert server.stop() == 0


# --- the balancer alone ------------------------------------------------------------------


def test_the_balancer_picks_a_least_loaded_worker_and_ties_go_round() -> None:
    balancer = Balancer(3)
    for index in range(3):
        balancer.up(index)
    assert [balancer.pick() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert balancer.open == [3, 2, 2]
    balancer.closed(0)
    balancer.closed(0)
    balancer.closed(0)
    assert balancer.open == [0, 2, 2]
    assert [balancer.pick() for _ in range(3)] == [0, 0, 1]
    assert balancer.open == [2, 3, 2]


def test_the_balancer_skips_workers_that_are_down_or_draining() -> None:
    balancer = Balancer(3)
    assert balancer.pick() is None  # none is up yet
    balancer.up(1)
    assert [balancer.pick() for _ in range(2)] == [1, 1]
    balancer.up(0)
    balancer.up(2)
    assert [balancer.pick() for _ in range(4)] == [2, 0, 2, 0]
    assert balancer.open == [2, 2, 2]
    balancer.gone(2)  # died: its connections went with it
    assert balancer.open == [2, 2, 0]
    assert [balancer.pick() for _ in range(2)] == [1, 0]
    balancer.draining(0)  # takes no more; what it holds still closes
    assert [balancer.pick() for _ in range(2)] == [1, 1]
    balancer.closed(0)
    assert balancer.open == [2, 5, 0]
    balancer.up(2)  # restarted
    assert [balancer.pick() for _ in range(3)] == [2, 2, 2]
    assert balancer.taking() == [1, 2]


def test_the_balancer_counts_no_close_below_zero() -> None:
    """A close reported for a worker already counted gone (its report was on the way)
    must not make it look less loaded than empty."""
    balancer = Balancer(2)
    balancer.up(0)
    balancer.up(1)
    assert balancer.pick() == 0
    balancer.gone(0)
    balancer.closed(0)
    assert balancer.open == [0, 0]


async def test_a_connection_made_as_the_parent_stops_listening_is_refused_not_reset() -> None:
    """The parent of ``--workers`` closes its listening socket when told to stop: a
    connection the kernel completed just before would be reset, its request already
    sent (nginx then answers 502). As a single server's drain does (listening.py),
    the parent has the kernel start no new handshake, hands out what completes, and
    only then closes: such a client is refused, and tries elsewhere.

    Deterministic: the client connects from inside the parent's close."""
    config = server.ServeConfig(host=HOST, port=0, workers=2, grace=5)  # number-service's
    command = [sys.executable, "-m", "number_service", "serve", "--host", HOST]
    parent = supervisor.Supervisor(config, command)
    assert parent.handing  # the parent accepts (the plain-grpclib fallback would not)
    real_stop = parent._stop_accepting
    late = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    late.setblocking(False)
    sent: list[bool] = []

    def stop_with_a_late_connection() -> None:
        parent._stop_accepting = real_stop  # type: ignore[method-assign]
        if parent._listener is not None:
            sent.append(connect_late(late, parent._listener.getsockname()))
        real_stop()

    parent._stop_accepting = stop_with_a_late_connection  # type: ignore[method-assign]
    running = asyncio.create_task(parent.run())
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            while not parent._listening:
                assert not running.done(), f"the parent stopped: {parent.failure}"
                await asyncio.sleep(0.05)
        parent._on_signal()
        assert await asyncio.wait_for(running, TIMEOUT * 3) == 0
        assert len(sent) == 1, "the listening socket was not closed"
        await assert_refused_not_reset(late, sent[0])
    finally:
        late.close()
        if not running.done():
            parent._stop.set()
            await asyncio.wait_for(running, TIMEOUT * 3)
