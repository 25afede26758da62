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
