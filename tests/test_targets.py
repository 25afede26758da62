"""A client with several targets: parsing them, round robin over the connections that
are up, names that resolve to several addresses, and what a GOAWAY does.

The servers are :class:`h2server.ScriptedServer`s (raw h2, on loopback), which send
GOAWAY frames as grpc-go's GracefulStop does and record every stream they served.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2server import Cut, Record, ScriptedServer
from processes import free_port

from number_service import NumberClient, Session
from number_service.targets import Target, parse_targets

TIMEOUT = 10.0


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "port", "expected"),
    [
        ("127.0.0.1", 50052, [Target("127.0.0.1", 50052)]),
        ("::1", 50052, [Target("::1", 50052)]),
        ("localhost:7", None, [Target("localhost", 7)]),
        ("localhost", None, [Target("localhost", 50051)]),
        ("[::1]:7", None, [Target("::1", 7)]),
        ("[::1]", None, [Target("::1", 50051)]),
        ("::1", None, [Target("::1", 50051)]),
        ("a:1, b:2,c", None, [Target("a", 1), Target("b", 2), Target("c", 50051)]),
        (["a:1", "b:2,c:3"], None, [Target("a", 1), Target("b", 2), Target("c", 3)]),
    ],
)
def test_targets_are_parsed(
    spec: str | list[str], port: int | None, expected: list[Target]
) -> None:
    assert parse_targets(spec, port, 50051) == expected


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("a:b", "port 'b' is not a number"),
        ("a:0", "port 0 is not in 1-65535"),
        ("[::1:5", "in brackets"),
        (":5", "has no host"),
        (" , ", "no target"),
        ([], "no target"),
    ],
)
def test_bad_targets_are_named(spec: str | list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("[", r"\[")):
        parse_targets(spec, None, 50051)


def test_the_client_says_its_targets() -> None:
    assert NumberClient("127.0.0.1", 1).targets == ["127.0.0.1:1"]
    assert NumberClient("[::1]:2,h:3").targets == ["[::1]:2", "h:3"]
    assert NumberClient().targets == ["127.0.0.1:50051"]


# --- round robin ------------------------------------------------------------------------


async def test_new_calls_go_round_robin_over_the_targets() -> None:
    async with (
        ScriptedServer() as a,
        ScriptedServer() as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        for num in range(10):
            assert [s async for s in client.accumulate([num, 1])] == [num, num + 1]
        assert len(a.streams) == len(b.streams) == 5
        assert len(a.connections) == len(b.connections) == 1  # each connection is kept


async def test_a_target_that_is_down_is_skipped_and_used_again_once_up() -> None:
    """Nothing listens on the first target: every call goes to the second. Once a
    server listens there, the client connects to it in the background and calls go
    round robin again."""
    port = free_port()
    async with (
        ScriptedServer() as up,
        NumberClient([f"127.0.0.1:{port}", up.target], timeout=TIMEOUT) as client,
    ):
        for _ in range(4):
            assert [s async for s in client.accumulate([2])] == [2]
        assert len(up.streams) == 4
        async with ScriptedServer(port=port) as late:
            async with asyncio.timeout(TIMEOUT):
                while not late.streams:
                    assert [s async for s in client.accumulate([3])] == [3]
                    await asyncio.sleep(0.05)
            before = len(late.streams)
            for _ in range(4):
                assert [s async for s in client.accumulate([3])] == [3]
            assert len(late.streams) - before == 2


async def test_no_target_up_is_unavailable_naming_each() -> None:
    ports = [free_port(), free_port()]
    async with NumberClient([f"127.0.0.1:{p}" for p in ports], timeout=TIMEOUT) as client:
        with pytest.raises(GRPCError) as caught:
            await _collect(client.accumulate([1]))
    assert caught.value.status is Status.UNAVAILABLE
    message = str(caught.value.message)
    assert message.startswith("cannot reach any of ")
    for port in ports:
        assert f"127.0.0.1:{port}: " in message


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``replicas.test`` resolves to the addresses in the list's last entry (no DNS
    server is asked); each lookup appends a copy, so the list counts them."""
    answers: list[list[str]] = [["127.0.0.1", "::1"]]
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "replicas.test":
            return real(host, port, *args, **kwargs)
        addresses = list(answers[-1])
        answers.append(addresses)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


async def test_a_name_with_several_addresses_is_round_robin_and_resolved_again(
    replicas: list[list[str]],
) -> None:
    """``replicas.test:PORT`` is 127.0.0.1 and ::1, a server on each: calls go to both.
    When one connection ends, the name is resolved again, and an address it no longer
    gives takes no more calls."""
    port = free_port()
    async with (
        ScriptedServer(host="127.0.0.1", port=port) as v4,
        ScriptedServer(host="::1", port=port) as v6,
        NumberClient(f"replicas.test:{port}", timeout=TIMEOUT) as client,
    ):
        for _ in range(4):
            assert [s async for s in client.accumulate([1])] == [1]
        assert len(v4.streams) == len(v6.streams) == 2
        assert len(replicas) == 2  # asked once so far
        replicas.append(["::1"])
        v4.connections[0].abort()  # the connection ends: resolve again on the next call
        await asyncio.sleep(0.1)
        for _ in range(4):
            assert [s async for s in client.accumulate([1])] == [1]
        assert len(replicas) >= 4
        assert len(v4.streams) == 2
        assert len(v6.streams) == 6


# --- GOAWAY -----------------------------------------------------------------------------


def server_of(record: Record, *servers: ScriptedServer) -> ScriptedServer:
    (server,) = [s for s in servers if record in s.streams]
    return server


async def test_a_graceful_goaway_lets_the_stream_in_flight_finish() -> None:
    """GOAWAY(2^31-1) + PING, then GOAWAY(last stream id), while a session is open:
    the session carries on on that connection to its OK, the next call goes to the
    other server, and the client closes the drained connection after the session."""
    async with (
        ScriptedServer() as a,
        ScriptedServer() as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        async with client.session() as session:
            assert await session.add(1) == 1
            (record,) = a.streams + b.streams
            draining = server_of(record, a, b)
            other = b if draining is a else a
            draining.stop_listening()  # as a server does when it drains
            await draining.goaway()
            assert await session.add(2) == 3  # still on the drained connection
            for num in (5, 6, 7):  # new calls: the other server only
                assert [s async for s in client.accumulate([num])] == [num]
            assert len(other.streams) == 3
            assert await session.add(3) == 6
        assert record.received == [1, 2, 3]
        assert record.end == "ok"
        assert len(draining.streams) == 1
        await asyncio.wait_for(draining.connections[0].closed.wait(), TIMEOUT)


async def test_a_stream_above_the_goaways_last_stream_id_is_sent_again_elsewhere() -> None:
    """Two sessions on one connection; its GOAWAY names the first one's stream as the
    last it takes: the second is refused on the client's side and carried on on the
    other server's connection; the first finishes where it is."""
    async with (
        ScriptedServer() as a,
        ScriptedServer() as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        async with contextlib.AsyncExitStack() as stack:
            on_a: list[Session] = []
            while len(on_a) < 2:  # round robin: every other one goes to b
                session = await stack.enter_async_context(client.session())
                before = len(a.streams)
                assert await session.add(0) == 0
                if len(a.streams) > before:
                    on_a.append(session)
            first, other = on_a
            assert await first.add(1) == 1
            first_id, other_id = (r.stream_id for r in a.streams)
            a.stop_listening()
            await a.goaway(last_stream_id=first_id)
            await asyncio.sleep(0.1)
            assert await first.add(1) == 2
            assert await other.add(4) == 4
        assert [(r.stream_id, r.received, r.end) for r in a.streams] == [
            (first_id, [0, 1, 1], "ok"),
            (other_id, [0], "reset by client"),
        ]
        assert [r.received for r in b.streams][-1] == [4]


async def test_a_goaway_on_the_only_connection_leaves_the_next_call_a_new_one() -> None:
    async with (
        ScriptedServer() as server,
        NumberClient(server.target, timeout=TIMEOUT) as client,
    ):
        async with client.session() as session:
            assert await session.add(1) == 1
            await server.goaway()
            assert [s async for s in client.accumulate([9])] == [9]  # a new connection
            assert await session.add(1) == 2  # the old one still serves its stream
        assert len(server.connections) == 2
        assert [r.connection for r in server.streams] == [0, 1]
        await asyncio.wait_for(server.connections[0].closed.wait(), TIMEOUT)


async def test_streams_opened_on_a_connection_after_its_goaway_are_refused_and_retried() -> None:
    """A GOAWAY with last stream id 1 on a connection where three sessions wait for
    their first answer: 3 and 5 are above it, so the client ends them itself and
    sends their numbers again (resuming off: they were never processed) on a new
    connection; 1 is answered where it is."""
    async with ScriptedServer() as a:
        async with NumberClient(a.target, timeout=TIMEOUT, resume=False) as on_a:
            sessions = [await _enter(on_a.session()) for _ in range(3)]
            await asyncio.sleep(0.05)
            assert sorted(r.stream_id for r in a.streams) == [1, 3, 5]
            await a.goaway(last_stream_id=1)
            await asyncio.sleep(0.05)
            # One target only: the refused ones go to a new connection of the same server.
            totals = [await s.add(10 + i) for i, (s, _) in enumerate(sessions)]
            assert totals == [10, 11, 12]
            for _, context in sessions:
                await context.__aexit__(None, None, None)
        by_connection = sorted((r.connection, r.received) for r in a.streams if r.received)
        assert by_connection == [(0, [10]), (1, [11]), (1, [12])]


async def test_unavailable_from_a_server_retires_its_connection() -> None:
    """Today's drain: the server stops listening and answers new streams on its
    open connection with UNAVAILABLE "server is shutting down". The call is resumed
    on the other server, the drained connection takes no new calls (the client
    closes it), and once a server listens on that port again, calls go there too."""
    shutting_down = Cut.with_status(Status.UNAVAILABLE, "server is shutting down")
    port = free_port()
    async with (
        ScriptedServer(port=port) as a,
        ScriptedServer() as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        for num in range(4):  # both connections up, and used
            assert [s async for s in client.accumulate([num])] == [num]
        assert len(a.streams) == len(b.streams) == 2
        a.stop_listening()
        a.plan = lambda record, count: shutting_down if count == 0 else None
        for num in range(4):
            assert [s async for s in client.accumulate([num])] == [num]
        assert [r.end for r in a.streams[2:]] == ["status"]  # one try, then no more
        assert len(b.streams) == 2 + 4
        await asyncio.wait_for(a.connections[0].closed.wait(), TIMEOUT)
        async with ScriptedServer(port=port) as again, asyncio.timeout(TIMEOUT):
            while not again.streams:
                assert [s async for s in client.accumulate([1])] == [1]
                await asyncio.sleep(0.05)


async def _collect(sums: Any) -> list[int]:
    return [s async for s in sums]


async def _enter(context: Any) -> tuple[Any, Any]:
    return await context.__aenter__(), context
