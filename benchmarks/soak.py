"""A bounded soak of NumberService: mixed traffic against a real ``number-service serve``.

    python benchmarks/soak.py                  # 60 s after a warm-up; --seconds to change
    python benchmarks/soak.py --open-streams 10000

It starts the server itself (``python -m number_service serve`` on 127.0.0.1, a free
port, JSON logs), then runs workers over a few shared connections, each picking
one kind of stream at a time:

- pipelined: up to 300 numbers streamed, every sum checked;
- lock-step: a session of up to 20 adds, each sum checked as it comes;
- cancelled: a stream the client stops reading and closes (CANCELLED);
- overflow: sums run past int32; every valid sum, then OUT_OF_RANGE;
- deadline: a session that outlives its 100 ms deadline (DEADLINE_EXCEEDED);
- disconnect: a connection of its own, dropped mid-stream.

Every interval it prints streams and sums per second and the server's RSS. It
fails (exit 1) if any sum or status is wrong, the server logs a warning, an
error or a traceback, the server's count of ended streams does not match the
streams opened, a fresh stream after the soak is wrong, the server does not stop
cleanly on SIGTERM, or the server's RSS grows after the warm-up by more than
``--rss-tolerance`` MiB. The default is 4 MiB plus 5% of the RSS after warm-up
(allocator slack), plus what h2 keeps by design: each connection remembers the
ids of the last 1,024 closed streams (connections.CLOSED_STREAMS_KEPT; h2's own
cap, 65,536, is lowered), ~112 B each, so RSS rises by ~112 B per stream on a
long-lived connection until that cap, ~112 KiB per connection. Beyond that, growth
in steady state means a leak.

``--open-streams N`` instead opens N streams at once over as few connections as
the server's SETTINGS_MAX_CONCURRENT_STREAMS allows, checks every stream's sums,
and prints the server's RSS per open stream.

Only 127.0.0.1 is used; every wait is bounded; the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from number_service import INT32_MAX, INT32_MIN, NumberClient
from number_service.serving.grpclib_ext.connections import CLOSED_STREAMS_KEPT

HOST = "127.0.0.1"
MiB = 1 << 20
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
READY_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0  # deadline of every stream that is not meant to time out
H2_MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT  # per connection (h2's own 65,536, lowered)
H2_CLOSED_STREAM_BYTES = 128  # an OrderedDict entry and an int: ~112 B measured


class SoakError(Exception):
    """A wrong sum or status: the soak fails."""


# --- the server under test --------------------------------------------------------------


class Server:
    """``number-service serve`` in a subprocess, its JSON log lines read on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "number_service", "serve"),
                *("--host", HOST, "--port", "0", "--log-format", "json", *args),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ended: Counter[str] = Counter()  # "stream ended" lines by status
        self.problems: list[str] = []  # lines at warning or above, tracebacks, non-JSON
        self.expired_on_arrival = 0  # grpclib's ERROR for a deadline over on arrival
        self._port = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._port.wait(READY_TIMEOUT):
            self.kill()
            raise RuntimeError(f"serve was not ready in {READY_TIMEOUT} s: {self.problems}")
        if not self.port:
            self.kill()
            raise RuntimeError(f"serve exited before it was ready: {self.problems}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self._take(line)
        finally:
            self._port.set()

    def _take(self, line: str) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            self.problems.append(line.rstrip())
            return
        message = entry.get("message", "")
        if not self.port and (match := READY.search(message)):
            self.port = int(match.group(1))
            self._port.set()
        if message == "stream ended":
            self.ended[entry.get("status", "?")] += 1
        if entry.get("logger") == "grpclib.server" and message == "Timeout occurred":
            # Known grpclib 0.4.9 bug (utils.py:103, server.py:457): a request whose
            # deadline is over before its handler starts is logged as an ERROR with a
            # traceback (and answered UNKNOWN). Our short-deadline streams hit it on a
            # busy machine; tests/test_faults.py has it as a strict xfail.
            self.expired_on_arrival += 1
        elif entry.get("level") not in ("DEBUG", "INFO") or entry.get("exc_info"):
            self.problems.append(line.rstrip())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """The server's resident set size in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, and its exit code; None (and killed) if it did not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


async def steady_rss(server: Server, settle: float = 0.2, timeout: float = 10.0) -> int:
    """The server's RSS once two readings ``settle`` s apart agree within 64 KiB."""
    deadline = time.monotonic() + timeout
    before = server.rss()
    while True:
        await asyncio.sleep(settle)
        now = server.rss()
        if abs(now - before) < 64 * 1024 or time.monotonic() > deadline:
            return now
        before = now


async def eventually(done: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``done()``, at most ``timeout`` s; whether it came true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def check_fresh_stream(port: int) -> None:
    async with NumberClient(HOST, port, timeout=CALL_TIMEOUT) as client:
        got = [s async for s in client.accumulate(range(1, 101))]
        if got != list(itertools.accumulate(range(1, 101))):
            raise SoakError(f"fresh stream after the soak: wrong sums {got[:5]}...")


# --- traffic ----------------------------------------------------------------------------

KINDS = ("pipelined", "lock-step", "cancelled", "overflow", "deadline", "disconnect")
WEIGHTS = (40, 30, 15, 8, 4, 3)
SERVER_STATUS = {  # what the server's log line should say for each kind
    "pipelined": {"OK"},
    "lock-step": {"OK"},
    "cancelled": {"CANCELLED"},
    "overflow": {"OUT_OF_RANGE"},
    "deadline": {"DEADLINE_EXCEEDED", "CANCELLED"},  # whichever side sees it first
    "disconnect": {"CANCELLED"},
}


@dataclass
class Stats:
    streams: Counter[str] = field(default_factory=Counter)
    sums: int = 0  # sums received and checked
    unseen: int = 0  # deadline streams that may have expired before reaching the server
    failures: list[str] = field(default_factory=list)


class Traffic:
    """Workers issuing streams of every kind over shared connections until stopped."""

    def __init__(self, port: int, connections: int, seed: int) -> None:
        self.port = port
        self.clients = [NumberClient(HOST, port, timeout=CALL_TIMEOUT) for _ in range(connections)]
        self.stats = Stats()
        self.seed = seed
        self.stopping = False

    def close(self) -> None:
        for client in self.clients:
            client.close()

    async def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self.stopping:
            (kind,) = rng.choices(KINDS, WEIGHTS)
            client = self.clients[rng.randrange(len(self.clients))]
            try:
                sums = await getattr(self, kind.replace("-", "_"))(client, rng)
                self.stats.sums += sums  # not `+= await`: that would read the total first
            except Exception as err:
                self.stats.failures.append(f"{kind}: {type(err).__name__}: {err}")
            self.stats.streams[kind] += 1

    async def pipelined(self, client: NumberClient, rng: random.Random) -> int:
        nums = [rng.randint(-1000, 1000) for _ in range(rng.randint(1, 300))]
        got = [s async for s in client.accumulate(nums)]
        expect(got, list(itertools.accumulate(nums)))
        return len(got)

    async def lock_step(self, client: NumberClient, rng: random.Random) -> int:
        total = 0
        count = rng.randint(0, 20)
        async with client.session() as session:
            for _ in range(count):
                num = rng.randint(-(10**6), 10**6)
                total += num
                expect([await session.add(num)], [total])
        return count

    async def cancelled(self, client: NumberClient, rng: random.Random) -> int:
        wanted = rng.randint(1, 50)

        async def endless() -> AsyncIterator[int]:
            for num in itertools.count(1):
                yield num % 100
                if num % 16 == 0:
                    await asyncio.sleep(0)

        got = []
        async with contextlib.aclosing(client.accumulate(endless())) as sums:
            async for total in sums:
                got.append(total)
                if len(got) == wanted:
                    break  # the client gives up: aclosing cancels the call
        expect(got, list(itertools.accumulate(n % 100 for n in range(1, wanted + 1))))
        return len(got)

    async def overflow(self, client: NumberClient, rng: random.Random) -> int:
        sign = rng.choice((1, -1))
        edge = INT32_MAX if sign > 0 else INT32_MIN
        # Ten steps of over 100 from at most 1000 short of the edge: past it for sure.
        nums = [edge - sign * rng.randint(0, 1000)] + [sign * rng.randint(101, 400)] * 10
        valid = list(
            itertools.takewhile(lambda s: INT32_MIN <= s <= INT32_MAX, itertools.accumulate(nums))
        )
        got: list[int] = []
        try:
            async for total in client.accumulate(nums):
                got.append(total)
        except GRPCError as err:
            if err.status is not Status.OUT_OF_RANGE:
                raise
        else:
            raise SoakError(f"overflow of {nums} ended without OUT_OF_RANGE")
        expect(got, valid)
        return len(got)

    async def deadline(self, client: NumberClient, rng: random.Random) -> int:
        answered = False
        try:
            async with client.session(timeout=0.1) as session:
                expect([await session.add(7)], [7])
                answered = True
                await asyncio.sleep(0.15)
                await session.add(1)
        except GRPCError as err:
            if err.status is not Status.DEADLINE_EXCEEDED:
                raise
            if not answered:  # on a busy machine it can expire before the server sees it
                self.stats.unseen += 1
        else:
            raise SoakError("a session outlived its deadline")
        return 1

    async def disconnect(self, client: NumberClient, rng: random.Random) -> int:
        own = NumberClient(HOST, self.port, timeout=CALL_TIMEOUT)
        try:
            async with own.session() as session:
                expect([await session.add(3), await session.add(4)], [3, 7])
                own.close()  # the connection goes, mid-stream
                await session.add(5)
        except GRPCError as err:
            if err.status is not Status.UNAVAILABLE:
                raise
        else:
            raise SoakError("a session went on after its connection closed")
        finally:
            own.close()
        return 2


def expect(got: list[int], want: list[int]) -> None:
    if got != want:
        raise SoakError(f"wrong sums: got {got[:8]}..., want {want[:8]}...")


# --- the soak ---------------------------------------------------------------------------


def line(text: str) -> None:
    print(text, flush=True)


async def soak(args: argparse.Namespace) -> bool:
    server = Server("--grace", "5")
    traffic: Traffic | None = None
    ok = False
    try:
        line(
            f"soak: server pid {server.pid} on {HOST}:{server.port}; {args.connections} "
            f"connections, {args.workers} workers; warm-up {args.warmup:g} s, "
            f"then {args.seconds:g} s"
        )
        traffic = Traffic(server.port, args.connections, args.seed)
        workers = [asyncio.create_task(traffic.worker(i)) for i in range(args.workers)]
        stats = traffic.stats
        started = time.monotonic()
        warm_until = started + args.warmup
        stop_at = warm_until + args.seconds
        rss_start: int | None = None
        rss_samples: list[int] = []
        last_streams, last_sums, last_t = 0, 0, started
        measured_streams, measured_sums = 0, 0
        tick = started
        while tick < stop_at:
            # Report every interval, and at the end of the warm-up and of the soak.
            tick = min(tick + args.interval, warm_until if tick < warm_until else stop_at, stop_at)
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            now = time.monotonic()
            if server.proc.poll() is not None:
                stats.failures.append(f"server exited with {server.proc.returncode}")
                break
            rss = server.rss()
            total = sum(stats.streams.values())
            dt = now - last_t
            streams_rate = (total - last_streams) / dt
            sums_rate = (stats.sums - last_sums) / dt
            phase = "warm-up" if tick <= warm_until else "soak"
            if phase == "warm-up":
                rss_start = rss  # the last reading of the warm-up is the start
            else:
                measured_streams += total - last_streams
                measured_sums += stats.sums - last_sums
            rss_samples.append(rss)
            line(
                f"  {now - started:6.1f} s {phase:7}  streams/s {streams_rate:7.0f}  "
                f"sums/s {sums_rate:8.0f}  server RSS {rss / MiB:6.1f} MiB  "
                f"failures {len(stats.failures)}"
            )
            last_streams, last_sums, last_t = total, stats.sums, now
        soaked = time.monotonic() - warm_until
        traffic.stopping = True
        _, pending = await asyncio.wait(workers, timeout=2 * CALL_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            stats.failures.append(f"{len(pending)} worker(s) did not finish within the deadline")
        rss_end = rss_samples[-1] if rss_samples else server.rss()
        if rss_start is None:
            rss_start = rss_end

        # Every stream the clients opened has ended on the server too (one log line each).
        opened = sum(stats.streams.values())
        seen = opened - stats.unseen
        if not await eventually(lambda: sum(server.ended.values()) >= opened, 3):
            await eventually(lambda: sum(server.ended.values()) >= seen, 7)
        expected: Counter[str] = Counter()
        for kind, count in stats.streams.items():
            if len(SERVER_STATUS[kind]) == 1:
                (status,) = SERVER_STATUS[kind]
                expected[status] += count
        if not seen <= sum(server.ended.values()) <= opened:
            stats.failures.append(
                f"server logged {sum(server.ended.values())} ended streams, clients opened "
                f"{opened} ({stats.unseen} of them perhaps never reached it)"
            )
        for status, count in expected.items():
            if server.ended[status] < count:
                stats.failures.append(
                    f"server logged {server.ended[status]} {status}, expected at least {count}"
                )
        try:
            await check_fresh_stream(server.port)
        except Exception as err:
            stats.failures.append(f"a fresh stream after the soak failed: {err!r}")
        traffic.close()
        traffic = None

        h2_allowance = H2_CLOSED_STREAM_BYTES * min(
            measured_streams, H2_MAX_CLOSED_STREAMS * args.connections
        )
        tolerance = (
            args.rss_tolerance * MiB
            if args.rss_tolerance is not None
            else 4 * MiB + rss_start / 20 + h2_allowance
        )
        growth = rss_end - rss_start
        line(
            f"soak: {opened} streams ({', '.join(f'{k} {stats.streams[k]}' for k in KINDS)}), "
            f"{stats.sums} sums checked"
        )
        line(
            f"soak: throughput after warm-up {measured_streams / soaked:.0f} streams/s, "
            f"{measured_sums / soaked:.0f} sums/s over {soaked:.1f} s"
        )
        line(f"soak: server streams ended by status {dict(sorted(server.ended.items()))}")
        if server.expired_on_arrival:
            line(
                f"soak: known grpclib bug: {server.expired_on_arrival} deadline(s) over on "
                "arrival logged as ERROR 'Timeout occurred' (not counted as a failure)"
            )
        line(
            f"soak: server RSS start {rss_start / MiB:.1f} MiB (after warm-up), end "
            f"{rss_end / MiB:.1f} MiB, max {max(rss_samples, default=rss_end) / MiB:.1f} MiB, "
            f"growth {growth / MiB:+.1f} MiB (tolerance {tolerance / MiB:.1f} MiB, of which "
            f"{h2_allowance / MiB:.1f} MiB for h2's closed-stream ids)"
        )
        if growth > tolerance:
            stats.failures.append(
                f"server RSS grew {growth / MiB:.1f} MiB after warm-up (> {tolerance / MiB:.1f})"
            )
        code = server.stop()
        if code != 0:
            stats.failures.append(f"server exit code on SIGTERM: {code}")
        if server.problems:
            stats.failures.append(f"server logged {len(server.problems)} problem line(s):")
            stats.failures.extend(server.problems[:10])
        for failure in stats.failures[:20]:
            line(f"soak: FAIL {failure}")
        ok = not stats.failures
    finally:
        if traffic is not None:
            traffic.close()
        server.kill()
    line("soak: PASS" if ok else "soak: FAIL")
    return ok


# --- many open streams ------------------------------------------------------------------


async def max_concurrent_streams(port: int) -> int:
    """The server's SETTINGS_MAX_CONCURRENT_STREAMS, read from its first SETTINGS frame."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import RemoteSettingsChanged

    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        conn = H2Connection(H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        async with asyncio.timeout(10):
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    raise RuntimeError("server closed the connection before its SETTINGS")
                if any(isinstance(e, RemoteSettingsChanged) for e in conn.receive_data(chunk)):
                    return int(conn.remote_settings.max_concurrent_streams)
    finally:
        writer.close()


async def open_streams(args: argparse.Namespace) -> bool:
    count = args.open_streams
    server = Server("--log-level", "warning")
    ok = False
    try:
        per_connection = min(await max_concurrent_streams(server.port), count)
        connections = -(-count // per_connection)
        line(
            f"open-streams: server pid {server.pid} on {HOST}:{server.port}; {count} streams "
            f"on {connections} connections x {per_connection} (SETTINGS_MAX_CONCURRENT_STREAMS)"
        )
        clients = [NumberClient(HOST, server.port, timeout=300) for _ in range(connections)]
        try:
            for client in clients:  # connect all, warm the server up
                expect([s async for s in client.accumulate([1, 2])], [1, 3])
            before = await steady_rss(server)
            opened = 0
            all_open, release = asyncio.Event(), asyncio.Event()

            async def one(k: int) -> None:
                nonlocal opened
                async with clients[k % connections].session() as session:
                    expect([await session.add(k)], [k])
                    opened += 1
                    if opened == count:
                        all_open.set()
                    await release.wait()
                    expect([await session.add(-2 * k)], [-k])

            started = time.monotonic()
            tasks = [asyncio.create_task(one(k)) for k in range(1, count + 1)]
            try:
                await wait_or_fail(all_open.wait(), tasks, 300)
                open_after = time.monotonic() - started
                during = await steady_rss(server)
                release.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 300)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            elapsed = time.monotonic() - started
        finally:
            for client in clients:
                client.close()
        await check_fresh_stream(server.port)
        per_stream = (during - before) / count
        line(
            f"open-streams: all {count} open after {open_after:.1f} s, all done after "
            f"{elapsed:.1f} s; server RSS {before / MiB:.1f} -> {during / MiB:.1f} MiB "
            f"with all open: {per_stream:.0f} B ({per_stream / 1024:.1f} KiB) per open stream"
        )
        code = server.stop()
        ok = code == 0 and not server.problems
        if not ok:
            line(f"open-streams: FAIL server exit {code}, problems {server.problems[:10]}")
    finally:
        server.kill()
    line("open-streams: PASS" if ok else "open-streams: FAIL")
    return ok


async def wait_or_fail(
    waited: Awaitable[object], tasks: list[asyncio.Task[None]], timeout: float
) -> None:
    """Wait for ``waited``, but fail at once with the first stream task that fails."""
    waiter = asyncio.ensure_future(waited)
    watched: set[asyncio.Future[Any]] = {waiter, *tasks}
    while True:
        done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            waiter.cancel()
            raise TimeoutError(f"not done within {timeout} s")
        for task in done:
            if task is waiter:
                return
            task.result()  # raises, if the stream failed
        watched -= done


# --- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="soak length after warm-up")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds (default: 1/6 of --seconds, 1 to 10)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    parser.add_argument("--connections", type=int, default=8, help="shared client connections")
    parser.add_argument("--workers", type=int, default=32, help="concurrent streams")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic mix")
    parser.add_argument(
        "--rss-tolerance", type=float, default=None, help="MiB of RSS growth allowed after warm-up"
    )
    parser.add_argument(
        "--open-streams", type=int, default=None, metavar="N", help="measure N open streams instead"
    )
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(10.0, max(1.0, args.seconds / 6))
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, bool]] = (
        open_streams if args.open_streams else soak
    )
    return 0 if asyncio.run(run(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
