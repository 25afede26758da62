"""NumberService in process, through grpclib.testing.ChannelFor (the number_client fixture)."""

from __future__ import annotations

import asyncio

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from number_service import INT32_MAX, INT32_MIN, NumberClient, NumberService
from number_service_gen.tutorial import NumberRequest, NumberServiceStub


async def test_pipelined_sums(number_client: NumberClient) -> None:
    sums = [s async for s in number_client.accumulate(range(1, 11))]
    assert sums == [1, 3, 6, 10, 15, 21, 28, 36, 45, 55]


async def test_negative_numbers(number_client: NumberClient) -> None:
    assert [s async for s in number_client.accumulate([-5, 3, -10])] == [-5, -2, -12]


async def test_empty_stream_ends_ok_without_responses(number_client: NumberClient) -> None:
    assert [s async for s in number_client.accumulate([])] == []


async def test_lock_step_session(number_client: NumberClient) -> None:
    async with number_client.session() as session:
        assert await session.add(4) == 4
        assert await session.add(-1) == 3
        assert await session.add(INT32_MAX - 3) == INT32_MAX


@pytest.mark.parametrize(
    ("nums", "delivered", "message"),
    [
        ([INT32_MAX, 1], [INT32_MAX], "sum 2147483647 + num 1"),
        ([INT32_MIN, -1], [INT32_MIN], "sum -2147483648 + num -1"),
        ([1, 2, INT32_MAX], [1, 3], "sum 3 + num 2147483647"),
    ],
)
async def test_overflow_ends_stream_with_out_of_range(
    number_client: NumberClient, nums: list[int], delivered: list[int], message: str
) -> None:
    got: list[int] = []
    with pytest.raises(GRPCError) as caught:
        async for total in number_client.accumulate(nums):
            got.append(total)
    assert caught.value.status is Status.OUT_OF_RANGE
    assert caught.value.message is not None
    assert message in caught.value.message
    assert got == delivered  # every valid sum arrives before the status


async def test_overflow_in_session(number_client: NumberClient) -> None:
    with pytest.raises(GRPCError) as caught:
        async with number_client.session() as session:
            assert await session.add(INT32_MAX) == INT32_MAX
            await session.add(1)
    assert caught.value.status is Status.OUT_OF_RANGE


async def test_streams_do_not_share_state(number_client: NumberClient) -> None:
    async with number_client.session() as a, number_client.session() as b:
        assert await a.add(10) == 10
        assert await b.add(1) == 1
        assert await a.add(10) == 20
        assert await b.add(1) == 2


async def test_generated_stub_works_too() -> None:
    """Users of the plain betterproto stub get the same answers."""
    async with ChannelFor([NumberService()]) as channel:
        stub = NumberServiceStub(channel)
        requests = [NumberRequest(num=n) for n in (3, 4, 5)]
        sums = [r.sum async for r in stub.accumulate_numbers(requests)]
    assert sums == [3, 7, 12]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(INT32_MIN, INT32_MAX), max_size=20))
def test_service_matches_reference_model(nums: list[int]) -> None:
    async def run() -> tuple[list[int], Status | None]:
        async with ChannelFor([NumberService()]) as channel:
            got: list[int] = []
            try:
                async for total in NumberClient.over(channel).accumulate(nums):
                    got.append(total)
            except GRPCError as err:
                return got, err.status
            return got, None

    expected: list[int] = []
    total = 0
    status = None
    for num in nums:
        total += num
        if not INT32_MIN <= total <= INT32_MAX:
            status = Status.OUT_OF_RANGE
            break
        expected.append(total)
    assert asyncio.run(run()) == (expected, status)
