"""The generated client, ``number_service_gen.tutorial.NumberServiceStub`` (betterproto2's
async grpclib stub), against our server over TCP and in-process; and what it does not
do that NumberClient does (README, "Which client"): check int32, and end a call whose
request iterator raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor
from polling import eventually

from number_service import INT32_MAX, NumberClient, NumberService, build_server
from number_service.pytest_plugin import RunningServer
from number_service.serving import address_of, bind
from number_service_gen.tutorial import NumberRequest, NumberServiceStub

TIMEOUT = 10.0


@pytest.fixture(params=["tcp", "in-process"])
async def stub(request: pytest.FixtureRequest) -> AsyncIterator[NumberServiceStub]:
    """The stub on a grpclib Channel to a real server, or on ChannelFor."""
    if request.param == "tcp":
        built = build_server()  # what the number_server fixture starts
        sock = bind("127.0.0.1", 0)
        await built.start(sock)
        try:
            async with Channel(*address_of(sock)) as channel:
                yield NumberServiceStub(channel)
        finally:
            await built.shutdown(grace=0)
    else:
        async with ChannelFor([NumberService()]) as channel:
            yield NumberServiceStub(channel)


def requests(*numbers: int) -> list[NumberRequest]:
    return [NumberRequest(num=n) for n in numbers]


async def test_sums(stub: NumberServiceStub) -> None:
    answers = stub.accumulate_numbers(requests(3, 4, -10), timeout=TIMEOUT)
    assert [answer.sum async for answer in answers] == [3, 7, -3]

    async def produced() -> AsyncIterator[NumberRequest]:
        for n in (5, 5):
            await asyncio.sleep(0)
            yield NumberRequest(num=n)

    answers = stub.accumulate_numbers(produced(), timeout=TIMEOUT)
    assert [answer.sum async for answer in answers] == [5, 10]
    assert [answer async for answer in stub.accumulate_numbers([], timeout=TIMEOUT)] == []


async def test_out_of_range_after_the_sums_before_it(stub: NumberServiceStub) -> None:
    sums: list[int] = []
    with pytest.raises(GRPCError) as caught:
        async for answer in stub.accumulate_numbers(requests(INT32_MAX, 1, 5), timeout=TIMEOUT):
            sums.append(answer.sum)
    assert sums == [INT32_MAX]
    assert caught.value.status is Status.OUT_OF_RANGE
    assert "sum 2147483647 + num 1" in str(caught.value.message)


async def test_the_stub_sends_a_number_outside_int32_which_arrives_wrapped(
    number_server: RunningServer,
) -> None:
    """betterproto2 does not range-check int32: 2**31 goes out as a 5-byte varint that
    Google's parser (and so our server) reads as -2**31. NumberClient refuses it."""
    async with Channel(number_server.host, number_server.port) as channel:
        answers = NumberServiceStub(channel).accumulate_numbers(requests(2**31), timeout=TIMEOUT)
        assert [answer.sum async for answer in answers] == [-(2**31)]
    async with NumberClient(number_server.host, number_server.port, timeout=TIMEOUT) as client:
        with pytest.raises(ValueError, match="int32"):
            async for _ in client.accumulate([2**31]):
                pass


class ProducerError(Exception):
    """What the caller's own request iterator raises."""


async def failing() -> AsyncIterator[NumberRequest]:
    yield NumberRequest(num=1)
    raise ProducerError("the numbers ran out unexpectedly")


async def failing_ints() -> AsyncIterator[int]:
    yield 1
    raise ProducerError("the numbers ran out unexpectedly")


async def test_a_request_iterator_that_raises_leaves_the_call_hanging(
    number_server: RunningServer,
) -> None:
    """KNOWN.md's note, checked: the stub sends from a background task whose exception
    nobody reads (betterproto issue #188), so the caller never sees it; the call
    waits for answers that cannot come, until its deadline (TimeoutError), or
    forever without one, while the server holds the stream open. NumberClient
    raises the iterator's exception at once."""
    loop = asyncio.get_running_loop()
    async with Channel(number_server.host, number_server.port) as channel:
        stub = NumberServiceStub(channel)
        sums: list[int] = []
        started = loop.time()
        with pytest.raises(TimeoutError):
            async for answer in stub.accumulate_numbers(failing(), timeout=1.0):
                sums.append(answer.sum)
        assert sums == [1]
        assert loop.time() - started >= 0.9, "it ended before its deadline"

        async def without_deadline() -> list[int]:
            return [answer.sum async for answer in stub.accumulate_numbers(failing())]

        call = asyncio.create_task(without_deadline())
        await eventually(lambda: any(r.received for r in number_server.instance.streams.live()))
        done, _ = await asyncio.wait([call], timeout=1.0)
        assert not done, "the call ended without a deadline"
        (record,) = number_server.instance.streams.live()
        assert (record.received, record.sent, record.status) == (1, 1, None)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    async with NumberClient(number_server.host, number_server.port, timeout=TIMEOUT) as client:
        started = loop.time()
        got: list[int] = []
        with pytest.raises(ProducerError):
            async for total in client.accumulate(failing_ints()):
                got.append(total)
        assert loop.time() - started < 0.9, "NumberClient waited for something"
    assert got in ([], [1])  # the sum may or may not have come back before the failure


async def test_an_unreachable_server_is_an_oserror_for_the_stub() -> None:
    """The stub passes grpclib's exceptions on; NumberClient says UNAVAILABLE."""
    sock = bind("127.0.0.1", 0)
    host, port = address_of(sock)
    sock.close()  # nothing listens there now
    async with Channel(host, port) as channel:
        with pytest.raises(ConnectionRefusedError):
            async for _ in NumberServiceStub(channel).accumulate_numbers(requests(1), timeout=5):
                pass
    async with NumberClient(host, port, timeout=5) as client:
        with pytest.raises(GRPCError) as caught:
            async for _ in client.accumulate([1]):
                pass
    assert caught.value.status is Status.UNAVAILABLE
