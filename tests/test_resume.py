"""Resumable streams: a cut stream of ``accumulate()`` or ``session()`` is carried on a
new one, and the caller sees every sum exactly once, in order, and no error.

The servers are :class:`h2server.ScriptedServer`s, which cut a stream at exactly the
point a test names (before the first answer, mid-way, with numbers in flight) and in
the way it names (UNAVAILABLE, REFUSED_STREAM, the connection lost), and record what
each stream received: so each test can check that the new stream got the last sum
and then exactly the numbers that were not answered.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
from grpclib import events
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2server import Cut, Plan, Record, ScriptedServer

from number_service import (
    ACCUMULATE_NUMBERS,
    INT32_MAX,
    NumberClient,
    Resume,
    Serving,
    build_server,
)
from number_service.client import IN_FLIGHT
from number_service.serving.run import address_of, bind

TIMEOUT = 10.0
DRAINED = "server shut down before this stream finished; the sums so far are valid"
CUTS = {
    "unavailable": Cut.with_status(Status.UNAVAILABLE, DRAINED),
    "shutting-down": Cut.with_status(Status.UNAVAILABLE, "server is shutting down"),
    "refused": Cut.refuse(),
    "lost": Cut.lose(),
}
FAST = Resume(attempts=4, initial_backoff=0.01, max_backoff=0.05)


def cut_first_stream(at: int, cut: Cut) -> Plan:
    """Cut the server's first stream instead of answering its ``at``-th number
    (0: as soon as it opens); every later stream is served."""
    first: list[Record] = []

    def plan(record: Record, count: int) -> Cut | None:
        if not first:
            first.append(record)
        return cut if record is first[0] and count == at else None

    return plan


def running(numbers: list[int]) -> list[int]:
    return list(itertools.accumulate(numbers))


def resent(numbers: list[int], answered: int) -> list[int]:
    """What a new stream must receive when ``answered`` numbers had their sums: the
    last sum (unless 0), then every number after them."""
    base = sum(numbers[:answered])
    return ([base] if base else []) + numbers[answered:]


async def until(done: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not done():  # noqa: ASYNC110 - the servers' records have no event
            await asyncio.sleep(0.01)


def streams(*servers: ScriptedServer) -> list[Record]:
    return [record for server in servers for record in server.streams]


# --- accumulate -------------------------------------------------------------------------


@pytest.mark.parametrize("how", list(CUTS))
@pytest.mark.parametrize("at", [1, 6], ids=["before-the-first-answer", "mid-way"])
async def test_accumulate_resumes_a_cut_stream_on_the_other_target(how: str, at: int) -> None:
    """The first stream is cut instead of answering its ``at``-th number: the call
    goes on on the other server, which gets the last sum and the numbers after it;
    the caller sees each sum once. (A reset or a lost connection may take sums the
    server had queued with it: those numbers are sent again, never a sum twice.)"""
    numbers = list(range(1, 21))
    plan = cut_first_stream(at, CUTS[how])  # one plan for both: the first stream of all
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        got = [total async for total in client.accumulate(numbers)]
        assert got == running(numbers)
        first, second, *more = streams(a, b)
        assert not more
        assert first.connection == second.connection == 0
        assert first.received == numbers[:at]
        assert second.end == "ok"
        if how in ("unavailable", "shutting-down"):  # trailers come after the sums
            assert first.sent == running(numbers)[: at - 1]
            assert second.received == resent(numbers, at - 1)
        else:  # the sums sent just before a reset or a loss may never arrive
            assert any(second.received == resent(numbers, k) for k in range(at))


@pytest.mark.parametrize("how", list(CUTS))
async def test_accumulate_resumes_with_numbers_in_flight(how: str) -> None:
    """The server has read numbers it never answered (here 6 to 10 of 20, then it
    holds) when the cut comes: the new stream gets the sum of 1..5, then 6..20."""
    numbers = list(range(1, 21))

    plan = cut_first_stream(6, Cut.hold())
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        call = asyncio.create_task(_collect(client.accumulate(numbers)))
        await until(lambda: any(len(r.received) >= 10 for r in streams(a, b)))
        (held,) = [r for r in streams(a, b) if r.held]
        assert held.sent == running(numbers)[:5]
        a.cut_held(CUTS[how])
        b.cut_held(CUTS[how])
        got = await asyncio.wait_for(call, TIMEOUT)
        assert got == running(numbers)
        _, second = streams(a, b)
        if how in ("unavailable", "shutting-down"):
            assert second.received == resent(numbers, 5)  # [15, 6, 7, ..., 20]
        else:
            assert second.received in (resent(numbers, 5), resent(numbers, 0))


async def test_at_most_in_flight_numbers_wait_for_their_sums() -> None:
    """A server that reads but never answers gets IN_FLIGHT numbers and no more: what
    the client keeps to send again is bounded. Cut, they all go to the new stream."""
    numbers = [1] * (IN_FLIGHT + 500)
    plan = cut_first_stream(1, Cut.hold())
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        call = asyncio.create_task(_collect(client.accumulate(numbers)))
        await until(lambda: any(len(r.received) >= IN_FLIGHT for r in streams(a, b)))
        await asyncio.sleep(0.3)  # time to send more, if it would
        (held,) = streams(a, b)
        assert len(held.received) == IN_FLIGHT
        a.cut_held(CUTS["unavailable"])
        b.cut_held(CUTS["unavailable"])
        assert await asyncio.wait_for(call, TIMEOUT) == running(numbers)
        _, second = streams(a, b)
        assert second.received == numbers


async def test_one_accumulate_outlives_several_cuts_on_one_target() -> None:
    """Every tenth number cuts its stream, four times over, on the one server there
    is: each new stream starts from the last sum, and no sum is seen twice."""
    numbers = [(-1) ** n * n for n in range(1, 51)]
    cuts: list[int] = []

    def every_tenth(record: Record, count: int) -> Cut | None:
        if count and count == 10 and len(cuts) < 4:
            cuts.append(record.stream_id)
            return CUTS["unavailable"]
        return None

    async with (
        ScriptedServer(every_tenth) as server,
        NumberClient(server.target, timeout=TIMEOUT) as client,
    ):
        assert [s async for s in client.accumulate(numbers)] == running(numbers)
        assert len(server.streams) == 5
        answered = 0
        for record in server.streams[:4]:  # each cut at its tenth number, nine answered
            expected = resent(numbers, answered)
            assert record.received == expected[:10]
            answered += 9 - (1 if expected[0] != numbers[answered] else 0)
        assert server.streams[4].received == resent(numbers, answered)
        assert server.streams[4].end == "ok"


async def test_a_slow_input_is_read_once_across_a_cut() -> None:
    """An async iterator is never rewound: each number is taken from it once, the
    ones in flight at the cut are kept by the client and sent again."""
    taken: list[int] = []

    async def numbers() -> AsyncIterator[int]:
        for num in range(1, 11):
            taken.append(num)
            yield num
            await asyncio.sleep(0.005)

    plan = cut_first_stream(4, CUTS["lost"])
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        assert [s async for s in client.accumulate(numbers())] == running(list(range(1, 11)))
    assert taken == list(range(1, 11))


async def test_the_overflow_rule_holds_across_a_cut() -> None:
    """The sum sent again is a valid int32 sum; a real overflow after the cut is
    OUT_OF_RANGE with the message the uncut stream would have had, and is not
    resumed. Two real servers; the first one's stream is drained after one sum."""
    servers = [build_server() for _ in range(2)]
    opened: list[Serving] = []
    for server in servers:
        events.listen(server.server, events.RecvRequest, partial(_opened, opened, server))
    socks = [bind("127.0.0.1", 0) for _ in servers]
    for server, sock in zip(servers, socks, strict=True):
        await server.start(sock)
    targets = [f"127.0.0.1:{address_of(sock)[1]}" for sock in socks]
    try:
        async with NumberClient(targets, timeout=TIMEOUT) as client:
            answered = asyncio.Event()
            go_on = asyncio.Event()

            async def numbers() -> AsyncIterator[int]:
                yield INT32_MAX - 1
                await answered.wait()
                await go_on.wait()
                yield 1
                yield 1

            got: list[int] = []
            with pytest.raises(GRPCError) as caught:
                async for total in client.accumulate(numbers()):
                    got.append(total)
                    if not answered.is_set():
                        answered.set()
                        # The stream's server drains with no grace: its stream is cut.
                        (busy,) = [s for s in servers if s.streams.live()]
                        await busy.shutdown(grace=0)
                        go_on.set()
            assert got == [INT32_MAX - 1, INT32_MAX]
            assert caught.value.status is Status.OUT_OF_RANGE
            assert len(opened) == 2  # the cut stream and its new one: the overflow stays
            assert opened[0] is not opened[1]
            with pytest.raises(GRPCError) as uncut:  # the same numbers, on the other server
                await _collect(client.accumulate([INT32_MAX - 1, 1, 1]))
            assert caught.value.message == uncut.value.message
            assert f"sum {INT32_MAX} + num 1 = {INT32_MAX + 1}" in str(uncut.value.message)
    finally:
        for server in servers:
            await server.shutdown(grace=0)


# --- session ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", list(CUTS))
@pytest.mark.parametrize("at", [1, 4], ids=["first-add", "mid-way"])
async def test_session_resumes_the_add_in_flight(how: str, at: int) -> None:
    """The ``at``-th add meets the cut: it returns its sum all the same, from a new
    stream on the other server that got the sum so far first."""
    numbers = [5, -3, 10, 7, 2, 9]
    plan = cut_first_stream(at, CUTS[how])  # one plan for both: the first stream of all
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        async with client.session() as session:
            got = [await session.add(num) for num in numbers]
        assert got == running(numbers)
        first, second = streams(a, b)
        assert first.connection == second.connection == 0
        assert first.received == numbers[:at]
        assert second.received == resent(numbers, at - 1)
        assert second.end == "ok"


async def test_session_cut_while_idle_resumes_at_the_next_add() -> None:
    """The stream is cut between two adds (a drain's grace ends): the next add opens
    the new stream; leaving after a cut with every number answered is quiet."""
    async with (
        ScriptedServer() as a,
        ScriptedServer() as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        async with client.session() as session:
            assert await session.add(4) == 4
            (record,) = streams(a, b)
            server = a if record in a.streams else b
            server.connections[0].cut(record.stream_id, record, CUTS["unavailable"])
            await asyncio.sleep(0.1)
            assert await session.add(6) == 10
        async with client.session() as session:
            assert await session.add(1) == 1
            (_, latest, _) = streams(a, b)
            other = a if latest in a.streams else b
            other.connections[-1].cut(latest.stream_id, latest, CUTS["lost"])
            await asyncio.sleep(0.1)
        assert sorted(r.received for r in streams(a, b)) == [[1], [4], [4, 6]]


# --- giving up --------------------------------------------------------------------------


def always(cut: Cut, at: int) -> Plan:
    return lambda record, count: cut if count == at else None


@pytest.mark.parametrize("attempts", [1, 3])
async def test_accumulate_gives_up_when_the_budget_is_spent(attempts: int) -> None:
    """Every stream is cut after the resumed prefix's answer: no number is ever
    answered again, so ``attempts`` new streams are tried, then the call raises the
    cut's UNAVAILABLE, after the sums it had."""
    numbers = [1, 2, 3]

    def cut_after_the_prefix(record: Record, count: int) -> Cut | None:
        if record.stream_id == 1 and record.connection == 0:
            return CUTS["unavailable"] if count == 2 else None
        return CUTS["unavailable"] if count == 2 else None

    resume = Resume(attempts=attempts, initial_backoff=0.01)
    async with (
        ScriptedServer(cut_after_the_prefix) as server,
        NumberClient(server.target, timeout=TIMEOUT, resume=resume) as client,
    ):
        got: list[int] = []
        with pytest.raises(GRPCError) as caught:
            async for total in client.accumulate(numbers):
                got.append(total)
        assert got == [1]
        assert caught.value.status is Status.UNAVAILABLE
        message = str(caught.value.message)
        assert DRAINED in message
        assert f"not resumed: {attempts} new stream(s) failed" in message
        assert len(server.streams) == 1 + attempts
        for record in server.streams[1:]:
            assert record.received == [1, 2]  # the last sum, then the number it cut


async def test_session_gives_up_when_the_budget_is_spent() -> None:
    async with (
        ScriptedServer(always(CUTS["refused"], 1)) as server,
        NumberClient(server.target, timeout=TIMEOUT, resume=FAST) as client,
    ):
        with pytest.raises(GRPCError) as caught:
            async with client.session() as session:
                await session.add(1)
        assert caught.value.status is Status.UNAVAILABLE
        assert "REFUSED_STREAM" in str(caught.value.message)
        assert len(server.streams) == 1 + FAST.attempts


async def test_resuming_stops_at_the_deadline() -> None:
    """A budget far longer than the deadline: DEADLINE_EXCEEDED when the deadline
    comes, saying what cut the stream, and not much later."""
    slow = Resume(attempts=1000, initial_backoff=0.2, max_backoff=0.2)
    async with (
        ScriptedServer(always(CUTS["shutting-down"], 1)) as server,
        NumberClient(server.target, timeout=1.0, resume=slow) as client,
    ):
        started = time.monotonic()
        with pytest.raises(GRPCError) as caught:
            await _collect(client.accumulate([1, 2]))
        took = time.monotonic() - started
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert "server is shutting down" in str(caught.value.message)
    assert 0.9 < took < 1.0 + 1.0
    assert 2 <= len(server.streams) <= 10


async def test_a_new_stream_that_never_answers_ends_at_the_deadline_naming_the_cut() -> None:
    """The first stream is cut; the new one is opened and never answered: the call
    ends at its deadline, DEADLINE_EXCEEDED naming the cut it was resuming."""
    plan = cut_first_stream(1, CUTS["shutting-down"])

    def then_hold(record: Record, count: int) -> Cut | None:
        return plan(record, count) or (Cut.hold() if count == 1 else None)

    async with (
        ScriptedServer(then_hold) as a,
        ScriptedServer(then_hold) as b,
        NumberClient([a.target, b.target], timeout=1.0) as client,
    ):
        with pytest.raises(GRPCError) as caught:
            await _collect(client.accumulate([1, 2]))
        assert caught.value.status is Status.DEADLINE_EXCEEDED
        assert "while resuming a stream: server is shutting down" in str(caught.value.message)
        assert [r.held for r in streams(a, b)] == [False, True]


async def test_a_real_error_is_never_resumed() -> None:
    """A status other than UNAVAILABLE (here INTERNAL) ends the call as it is."""
    async with (
        ScriptedServer(always(Cut.with_status(Status.INTERNAL, "broken"), 2)) as server,
        NumberClient(server.target, timeout=TIMEOUT) as client,
    ):
        got: list[int] = []
        with pytest.raises(GRPCError) as caught:
            async for total in client.accumulate([1, 2, 3]):
                got.append(total)
        assert (caught.value.status, caught.value.message) == (Status.INTERNAL, "broken")
        assert got == [1]
        assert len(server.streams) == 1


# --- resume=False -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unavailable", "lost"])
async def test_without_resume_a_cut_is_the_error(how: str) -> None:
    plan = cut_first_stream(3, CUTS[how])
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT, resume=False) as client,
    ):
        got: list[int] = []
        with pytest.raises(GRPCError) as caught:
            async for total in client.accumulate([1, 2, 3, 4]):
                got.append(total)
        assert caught.value.status is Status.UNAVAILABLE
        assert got == [1, 3][: len(got)]
        assert len(streams(a, b)) == 1


@pytest.mark.parametrize("how", ["unavailable", "lost"])
async def test_without_resume_a_cut_session_raises(how: str) -> None:
    plan = cut_first_stream(2, CUTS[how])
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        with pytest.raises(GRPCError) as caught:
            async with client.session(resume=False) as session:
                assert await session.add(1) == 1
                await session.add(2)
        assert caught.value.status is Status.UNAVAILABLE
        assert len(streams(a, b)) == 1


async def test_without_resume_a_refused_stream_is_still_sent_again() -> None:
    """A stream the server refused before answering anything was never processed:
    sent again from the start on the other server, as gRPC clients do, with
    resuming off too."""
    plan = cut_first_stream(0, CUTS["refused"])
    async with (
        ScriptedServer(plan) as a,
        ScriptedServer(plan) as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT, resume=False) as client,
    ):
        assert [s async for s in client.accumulate([1, 2, 3])] == [1, 3, 6]
        first, second = streams(a, b)
        assert first.end == "refused"
        assert second.received == [1, 2, 3]
        async with client.session() as session:  # per call: resume is off here too
            assert await session.add(2) == 2


async def _opened(opened: list[Serving], server: Serving, event: events.RecvRequest) -> None:
    if event.method_name == ACCUMULATE_NUMBERS:
        opened.append(server)


async def _collect(sums: AsyncIterator[int]) -> list[int]:
    return [s async for s in sums]
