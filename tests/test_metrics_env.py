"""An inherited PROMETHEUS_MULTIPROC_DIR, and listeners that fail, cannot fail calls.

prometheus-client picks file-backed metric values when PROMETHEUS_MULTIPROC_DIR is
set; ``serve`` decides for itself (in memory, or its supervisor's directory), so a
value left in the environment neither breaks calls nor fills a directory with files.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from polling import eventually
from processes import reap, run, start_server

from number_service import NumberClient
from number_service.pytest_plugin import RunningServer
from number_service.serving.streams import StreamRecord

TIMEOUT = 20.0


async def sums(client: NumberClient, numbers: list[int]) -> list[int]:
    return [total async for total in client.accumulate(numbers)]


@pytest.mark.parametrize(
    "workers", [[], ["--workers", "2"], ["--workers", "2", "--metrics-port", "0"]]
)
@pytest.mark.parametrize("exists", [False, True], ids=["missing-dir", "empty-dir"])
async def test_calls_and_health_work_whatever_prometheus_multiproc_dir_says(
    tmp_path: Path, workers: list[str], exists: bool
) -> None:
    where = tmp_path / "multiproc"
    if exists:
        where.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(where)}
    server = start_server(0, *workers, env=env)
    try:
        for _ in range(4):  # separate connections: with workers, on either of them
            async with NumberClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:
                assert await sums(client, [1, 2, 3]) == [1, 3, 6]
        result = await asyncio.to_thread(run, "health", "--port", str(server.port), env=env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")
        assert await asyncio.to_thread(server.stop) == 0
        log = server.stderr.rest()
    finally:
        reap(server.proc)
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log
    if exists:  # nothing of ours is written there
        assert list(where.iterdir()) == []
    else:
        assert not where.exists()


async def test_a_failing_listener_neither_fails_the_call_nor_floods_the_log(
    number_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[StreamRecord] = []

    def broken(record: StreamRecord) -> None:
        raise RuntimeError("consumer bug")

    streams = number_server.instance.streams
    for listeners in (streams.on_start, streams.on_messages, streams.on_end):
        listeners.insert(0, broken)  # before the others: they must still run
    streams.on_end.append(calls.append)
    caplog.set_level(logging.ERROR, logger="number_service.serving.streams")
    async with NumberClient(number_server.host, number_server.port, timeout=TIMEOUT) as client:
        for _ in range(3):
            # Lock-step: each answer is a batch of its own, so on_messages runs 4 times.
            async with client.session() as session:
                assert [await session.add(n) for n in (1, 2, 3, 4)] == [1, 3, 6, 10]
        async with asyncio.timeout(TIMEOUT):
            await eventually(lambda: len(calls) == 3)
    assert [record.received for record in calls] == [4, 4, 4]
    # Once per list, with its traceback; the 10th failure of on_messages is one line more.
    errors = [r for r in caplog.records if r.name == "number_service.serving.streams"]
    first = [r for r in errors if r.exc_info is not None]
    assert len(first) == 3, [r.getMessage() for r in errors]
    assert all("broken" in r.getMessage() and "failed" in r.getMessage() for r in errors)
    later = [r.getMessage() for r in errors if r.exc_info is None]
    # on_messages: 12 answers, each reported on its own; the 10th failure is one line.
    assert later == [
        "stream listener test_a_failing_listener_neither_fails_the_call_nor_floods_the_log"
        ".<locals>.broken has failed 10 times"
    ], later
    assert streams.on_messages.failures[broken] == 12
