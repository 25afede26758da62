"""Our pytest plugin, as a project that depends on us would use it."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
from number_service import NumberClient

async def test_in_process(number_client: NumberClient) -> None:
    assert [s async for s in number_client.accumulate([1, 2, 3])] == [1, 3, 6]

async def test_real_server(number_server, number_server_client: NumberClient) -> None:
    assert number_server.host == "127.0.0.1" and number_server.port > 0
    async with number_server_client.session() as session:
        assert await session.add(2) == 2
        assert await session.add(2) == 4

async def test_a_wrong_expectation_fails(number_client: NumberClient) -> None:
    assert [s async for s in number_client.accumulate([1, 1])] == [1, 1]
"""


def test_fixtures_work_for_users(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_a_wrong_expectation_fails*"])


HELD_OPEN = """
import asyncio
import socket

from number_service import NumberClient

HELD = []  # outlives each test, so that only the fixture's teardown can end them

async def test_a_client_left_connected(number_server) -> None:
    client = NumberClient(number_server.host, number_server.port)
    assert [s async for s in client.accumulate([1, 2])] == [1, 3]
    HELD.append(client)  # never closed

async def test_a_stream_left_open(number_server) -> None:
    client = NumberClient(number_server.host, number_server.port)
    opened = client.session()
    HELD.append((client, opened))  # neither the stream nor the client is closed
    session = await opened.__aenter__()
    assert await session.add(5) == 5

async def test_a_silent_tcp_connection(number_server) -> None:
    HELD.append(socket.create_connection((number_server.host, number_server.port)))
    await asyncio.sleep(0.2)  # accepted by the server, not just by the kernel
"""
TEARDOWN_WITHIN = 30.0  # seconds for three short tests and their teardowns (~2 s)


def test_server_fixture_teardown_ends_connections_left_open(pytester: pytest.Pytester) -> None:
    """The number_server fixture shuts its server down even when a test leaves a
    client connected; on Python 3.12.1+ its teardown used to wait forever."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    pytester.makepyfile(test_held=HELD_OPEN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=TEARDOWN_WITHIN)
    result.assert_outcomes(passed=3)
