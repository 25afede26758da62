"""Rolling restarts lose nothing: our client with two ``serve`` processes as targets.

Each replica in turn gets SIGTERM (it drains: streams still open after ``--grace``
end UNAVAILABLE) and is started again on the same port, then one is killed with
SIGKILL and started again. Streams that outlive the grace period are resumed on the
other replica: every sum of every stream is exact, and no error reaches the caller.
Real processes on 127.0.0.1; generous timeouts (the machine is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

from processes import (
    EXE,
    EXIT_TIMEOUT,
    HOST,
    Lines,
    ServerProcess,
    env_without_buffering,
    free_port,
    reap,
    start_server,
)

from number_service import NumberClient

GRACE = 1.0  # --grace of each replica: far shorter than the streams
SESSIONS = 50
PAUSE = 0.05  # seconds between two numbers of a session
SETTLE = 1.0  # seconds between two steps of the restart
CALL_TIMEOUT = 120.0


class Replicas:
    """Two ``serve`` processes on fixed ports, restarted in place."""

    def __init__(self) -> None:
        self.ports = [free_port(), free_port()]
        self.servers: list[ServerProcess] = []
        self.drained = 0  # streams the replicas said they ended at the end of a grace
        self.logs: list[str] = []

    @property
    def targets(self) -> list[str]:
        return [f"{HOST}:{port}" for port in self.ports]

    def start(self, index: int | None = None) -> None:
        for i in range(2) if index is None else [index]:
            server = start_server(self.ports[i], "--grace", str(GRACE))
            if i < len(self.servers):
                self.servers[i] = server
            else:
                self.servers.append(server)

    def restart(self, index: int, sig: signal.Signals) -> None:
        """Stop replica ``index`` with ``sig`` (SIGTERM: it drains) and start it again."""
        server = self.servers[index]
        if sig is signal.SIGKILL:
            server.proc.kill()
            server.proc.wait(EXIT_TIMEOUT)
        else:
            assert server.stop(sig) == 0
        text = server.stderr.rest()
        self.logs.append(text)
        assert "Traceback" not in text, text
        for line in text.splitlines():
            if "grace period over: ended" in line:
                self.drained += int(line.split("ended ")[1].split()[0])
        self.start(index)

    def roll(self) -> None:
        """SIGTERM each replica in turn, then SIGKILL the first; each comes back."""
        for index in (0, 1):
            time.sleep(SETTLE)
            self.restart(index, signal.SIGTERM)
        time.sleep(SETTLE)
        self.restart(0, signal.SIGKILL)
        time.sleep(SETTLE)

    def close(self) -> None:
        for server in self.servers:
            reap(server.proc)


@contextlib.contextmanager
def replicas() -> Iterator[Replicas]:
    pair = Replicas()
    try:
        pair.start()
        yield pair
    finally:
        pair.close()


async def test_sessions_outlive_a_rolling_restart_and_a_kill() -> None:
    """50 sessions, each adding a number every 50 ms for the whole restart: each
    checks every sum it gets, none raises, and the replicas did cut streams at the
    end of their grace (so streams were resumed, not merely lucky)."""
    with replicas() as pair:
        stop = asyncio.Event()

        async def one(seed: int, client: NumberClient) -> int:
            numbers = random.Random(seed)
            total = count = 0
            async with client.session() as session:
                while not stop.is_set():
                    num = numbers.randint(-1000, 1000)
                    total += num
                    got = await session.add(num)
                    assert got == total, f"session {seed}: sum {got} after {count}, not {total}"
                    count += 1
                    await asyncio.sleep(PAUSE * numbers.uniform(0.5, 1.5))
            return count

        async with NumberClient(pair.targets, timeout=CALL_TIMEOUT) as client:
            sessions = [asyncio.create_task(one(seed, client)) for seed in range(SESSIONS)]
            try:
                await asyncio.to_thread(pair.roll)
            finally:
                stop.set()
            counts = await asyncio.wait_for(asyncio.gather(*sessions), CALL_TIMEOUT)
        assert min(counts) > 10
        assert pair.drained > 0, pair.logs  # some sessions outlived a grace period


def feed(proc: subprocess.Popen[str], count: int, pause: float) -> None:
    """Write 1..count to ``proc``'s stdin, one line every ``pause`` s, then close it."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        for num in range(1, count + 1):
            proc.stdin.write(f"{num}\n")
            proc.stdin.flush()
            time.sleep(pause)
        proc.stdin.close()


def test_cli_accumulate_through_a_rolling_restart_prints_every_sum_once() -> None:
    """``seq 1 N | number-service accumulate --target A,B -``, the numbers coming
    slowly enough that the stream lives through both restarts and the kill: exactly
    the N running sums, exit 0, nothing on stderr."""
    count = 600
    pause = (4 * SETTLE + 4 * GRACE) / count * 2  # the stream outlives the whole roll
    with replicas() as pair:
        proc = subprocess.Popen(
            [str(EXE), "accumulate", "--target", ",".join(pair.targets), "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_without_buffering(),
        )
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            stdout, stderr = Lines(proc.stdout), Lines(proc.stderr)
            writer = threading.Thread(target=feed, args=(proc, count, pause), daemon=True)
            writer.start()
            # The stream is open before the roll: a CLI slow to start (three suites at
            # once) could otherwise open it on a replica already restarted, and then
            # no drain would cut it (CI, 3.13: drained 0).
            assert stdout.get() == "1\n"
            pair.roll()
            writer.join(CALL_TIMEOUT)
            assert not writer.is_alive()
            proc.wait(CALL_TIMEOUT)
            out, err = stdout.rest(), stderr.rest()
        finally:
            reap(proc)
    assert proc.returncode == 0, err
    assert err == ""
    sums = [int(line) for line in out.splitlines()]
    assert sums == [n * (n + 1) // 2 for n in range(1, count + 1)]
    assert pair.drained > 0, pair.logs
