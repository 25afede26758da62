"""The typed client library's own promises: refusals, laziness, errors as GRPCError."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpclib import events
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hyperframe.frame import HeadersFrame
from processes import free_port
from rawh2 import DATA, GOAWAY, PREFACE, SETTINGS, frame, parse_frames

from number_service import INT32_MAX, INT32_MIN, NumberClient, Resume, Retry, build_server
from number_service.pytest_plugin import RunningServer
from number_service.serving.run import bind


def received_messages(server: RunningServer) -> list[object]:
    """Every request message the server decodes, as they arrive."""
    seen: list[object] = []

    async def record(event: events.RecvMessage) -> None:
        seen.append(event.message)

    events.listen(server.server, events.RecvMessage, record)
    return seen


@pytest.mark.parametrize("bad", [INT32_MAX + 1, INT32_MIN - 1])
async def test_out_of_int32_in_a_sequence_is_refused_before_anything_is_sent(
    number_server: RunningServer, number_server_client: NumberClient, bad: int
) -> None:
    started: list[str] = []

    async def record(event: events.RecvRequest) -> None:
        started.append(event.method_name)

    events.listen(number_server.server, events.RecvRequest, record)
    with pytest.raises(ValueError, match="outside int32"):
        async for _ in number_server_client.accumulate([1, 2, bad]):
            pass
    assert started == []  # not even a stream was opened
    assert [s async for s in number_server_client.accumulate([1])] == [1]
    assert started == ["/tutorial.NumberService/AccumulateNumbers"]


async def test_out_of_int32_in_an_iterator_is_never_sent(
    number_server: RunningServer, number_server_client: NumberClient
) -> None:
    seen = received_messages(number_server)

    async def numbers() -> AsyncIterator[int]:
        yield 1
        yield 2**31

    with pytest.raises(ValueError, match="2147483648 is outside int32"):
        async for _ in number_server_client.accumulate(numbers()):
            pass
    await asyncio.sleep(0.05)
    assert [m.num for m in seen] == [1]  # type: ignore[attr-defined]


async def test_session_refuses_out_of_int32(number_client: NumberClient) -> None:
    async with number_client.session() as session:
        assert await session.add(1) == 1
        with pytest.raises(ValueError, match="outside int32"):
            await session.add(INT32_MAX + 1)
        assert await session.add(1) == 2  # the stream is still good


async def test_accepts_sync_and_async_iterables(number_client: NumberClient) -> None:
    async def agen() -> AsyncIterator[int]:
        for n in (1, 2, 3):
            yield n

    assert [s async for s in number_client.accumulate(iter([1, 2, 3]))] == [1, 3, 6]
    assert [s async for s in number_client.accumulate(agen())] == [1, 3, 6]
    assert [s async for s in number_client.accumulate(n for n in range(3))] == [0, 1, 3]


async def test_does_not_collect_the_input_first(number_client: NumberClient) -> None:
    """An endless input still yields sums; breaking off cancels the call."""

    async def forever() -> AsyncIterator[int]:
        while True:
            yield 1
            await asyncio.sleep(0.001)  # a live source, not a flood of 4 MiB of window

    got = []
    async for total in number_client.accumulate(forever()):
        got.append(total)
        if total == 5:
            break
    assert got == [1, 2, 3, 4, 5]
    assert [s async for s in number_client.accumulate([7])] == [7]


async def test_error_in_the_input_iterator_surfaces(number_client: NumberClient) -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        async for _ in number_client.accumulate(broken()):
            pass


async def test_deadline_is_a_grpc_status(number_server_client: NumberClient) -> None:
    with pytest.raises(GRPCError) as caught:
        async with number_server_client.session(timeout=0.2) as session:
            assert await session.add(1) == 1
            await asyncio.sleep(0.5)
            await session.add(1)
    assert caught.value.status is Status.DEADLINE_EXCEEDED


async def test_deadline_while_waiting_in_accumulate(number_server_client: NumberClient) -> None:
    async def slow() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(5)
        yield 2

    got = []
    with pytest.raises(GRPCError) as caught:
        async for total in number_server_client.accumulate(slow(), timeout=0.3):
            got.append(total)
    assert got == [1]
    assert caught.value.status is Status.DEADLINE_EXCEEDED


async def test_no_server_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    async with NumberClient("127.0.0.1", port) as client:
        with pytest.raises(GRPCError) as caught:
            async for _ in client.accumulate([1]):
                pass
    assert caught.value.status is Status.UNAVAILABLE
    assert f"127.0.0.1:{port}" in (caught.value.message or "")


async def test_metadata_reaches_the_server(number_server: RunningServer) -> None:
    got: list[object] = []

    async def record(event: events.RecvRequest) -> None:
        got.append(event.metadata.get("x-tenant"))

    events.listen(number_server.server, events.RecvRequest, record)
    async with NumberClient(
        number_server.host, number_server.port, metadata={"x-tenant": "a"}
    ) as client:
        assert [s async for s in client.accumulate([1])] == [1]
        assert [s async for s in client.accumulate([1], metadata={"x-tenant": "b"})] == [1]
    assert got == ["a", "b"]


async def test_retry_waits_for_a_server_that_starts_late() -> None:
    port = free_port()
    retry = Retry(attempts=50, initial_backoff=0.05, max_backoff=0.1)
    async with NumberClient("127.0.0.1", port, retry=retry, timeout=10) as client:
        early = asyncio.create_task(_collect(client.accumulate([1, 2, 3])))
        await asyncio.sleep(0.3)
        assert not early.done()  # still retrying: nothing listens yet
        server = build_server()
        await server.start(bind("127.0.0.1", port))
        try:
            assert await asyncio.wait_for(early, 10) == [1, 3, 6]
        finally:
            await server.shutdown(grace=0)


async def test_retry_gives_up_with_unavailable() -> None:
    port = free_port()
    retry = Retry(attempts=3, initial_backoff=0.05, multiplier=1)
    started = asyncio.get_running_loop().time()
    async with NumberClient("127.0.0.1", port, retry=retry) as client:
        with pytest.raises(GRPCError) as caught:
            await _collect(client.accumulate([1]))
    assert caught.value.status is Status.UNAVAILABLE
    assert asyncio.get_running_loop().time() - started >= 2 * 0.05 * 0.8  # two waits


async def test_retry_stays_within_the_deadline() -> None:
    port = free_port()
    retry = Retry(attempts=1000, initial_backoff=0.05, multiplier=1)
    async with NumberClient("127.0.0.1", port, retry=retry, timeout=0.3) as client:
        with pytest.raises(GRPCError) as caught:
            await asyncio.wait_for(_collect(client.accumulate([1])), 5)
    assert caught.value.status is Status.DEADLINE_EXCEEDED


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``unresolvable.test`` fails to resolve with the error code put in the list
    (no DNS server is asked); the list then counts the attempts after it."""
    code: list[int] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "unresolvable.test":
            code.append(code[0])
            raise socket.gaierror(code[0], _EAI_TEXT[code[0]])
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return code


_EAI_TEXT = {
    socket.EAI_NONAME: "Name or service not known",
    socket.EAI_AGAIN: "Temporary failure in name resolution",
}


async def test_retry_gives_up_at_once_on_a_name_that_does_not_resolve(
    resolver: list[int],
) -> None:
    resolver.append(socket.EAI_NONAME)
    retry = Retry(attempts=5, initial_backoff=0.05, multiplier=1)
    async with NumberClient("unresolvable.test", 50051, retry=retry, timeout=10) as client:
        with pytest.raises(GRPCError) as caught:
            await _collect(client.accumulate([1]))
    assert caught.value.status is Status.UNAVAILABLE
    assert "unresolvable.test" in str(caught.value.message)
    assert "Name or service not known" in str(caught.value.message)
    assert len(resolver) - 1 == 1  # asked once, never again


async def test_retry_tries_again_while_the_resolver_fails_temporarily(
    resolver: list[int],
) -> None:
    resolver.append(socket.EAI_AGAIN)
    retry = Retry(attempts=3, initial_backoff=0.05, multiplier=1)
    async with NumberClient("unresolvable.test", 50051, retry=retry, timeout=10) as client:
        with pytest.raises(GRPCError) as caught:
            await _collect(client.accumulate([1]))
    assert caught.value.status is Status.UNAVAILABLE
    assert "Temporary failure in name resolution" in str(caught.value.message)
    assert len(resolver) - 1 == 3  # every attempt asked


def test_retry_backoff_grows_to_its_cap() -> None:
    delays = list(Retry(attempts=6, initial_backoff=0.1, max_backoff=0.5).delays())
    assert len(delays) == 5
    for delay, base in zip(delays, [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
        assert 0.8 * base <= delay <= 1.2 * base


async def _collect(sums: AsyncIterator[int]) -> list[int]:
    return [s async for s in sums]


@pytest.mark.parametrize("used", [True, False], ids=["after-add", "empty"])
async def test_deadline_while_a_session_idles(
    number_server_client: NumberClient, used: bool
) -> None:
    with pytest.raises(GRPCError) as caught:
        async with number_server_client.session(timeout=0.3) as session:
            if used:
                assert await session.add(1) == 1
            await asyncio.sleep(0.6)
    assert caught.value.status is Status.DEADLINE_EXCEEDED


async def test_the_callers_own_errors_pass_through_unchanged(
    number_server_client: NumberClient,
) -> None:
    """Only failures of the call become gRPC statuses, not the caller's."""
    with pytest.raises(FileNotFoundError):
        async with number_server_client.session() as session:
            assert await session.add(1) == 1
            raise FileNotFoundError("the caller's own")
    with pytest.raises(TimeoutError):
        async with number_server_client.session() as session:
            await asyncio.wait_for(asyncio.sleep(1), 0.01)

    async def numbers() -> AsyncIterator[int]:
        yield 1
        raise ConnectionResetError("the input's own")

    with pytest.raises(ConnectionResetError, match="the input's own"):
        await _collect(number_server_client.accumulate(numbers()))
    assert await _collect(number_server_client.accumulate([2, 2])) == [2, 4]


# --- Session.add raises the stream's end itself ----------------------------------------


async def test_session_add_raises_the_servers_status_itself(
    number_server_client: NumberClient,
) -> None:
    """The server ends the stream (trailers, then RST_STREAM as the client has not
    half-closed): the add() that overflowed raises OUT_OF_RANGE with its message,
    not grpclib's "Stream reset by remote party", and leaving the block after the
    caller handled it raises nothing more."""
    await _overflow_in_a_session(number_server_client)


async def test_session_add_raises_the_servers_status_itself_in_process(
    number_client: NumberClient,
) -> None:
    await _overflow_in_a_session(number_client)


async def _overflow_in_a_session(client: NumberClient) -> None:
    async with client.session() as session:
        assert await session.add(INT32_MAX) == INT32_MAX
        with pytest.raises(GRPCError) as caught:
            await session.add(1)
        assert caught.value.status is Status.OUT_OF_RANGE
        message = str(caught.value.message)
        assert f"sum {INT32_MAX} + num 1 = 2147483648 is outside int32" in message
        with pytest.raises(RuntimeError, match="session is closed"):
            await session.add(1)
    async with client.session() as session:  # the client carries on
        assert await session.add(3) == 3


async def test_session_add_raises_a_drains_unavailable_itself() -> None:
    """Without resuming: the drain's own status and message reach the caller."""
    server = build_server()
    sock = bind("127.0.0.1", 0)
    await server.start(sock)
    client = NumberClient("127.0.0.1", sock.getsockname()[1], timeout=10, resume=False)
    async with client, client.session() as session:
        assert await session.add(5) == 5
        await server.shutdown(grace=0)
        with pytest.raises(GRPCError) as caught:
            await session.add(1)
    assert caught.value.status is Status.UNAVAILABLE
    assert "server shut down before this stream finished" in str(caught.value.message)


async def test_session_add_raises_unavailable_itself_when_the_connection_drops(
    number_server: RunningServer,
) -> None:
    """Without resuming (with it, the add would succeed: see test_resume.py)."""
    async with (
        CuttingFront(number_server.port, cut=0, goaway=False) as front,
        NumberClient("127.0.0.1", front.port, timeout=10, resume=False) as client,
    ):
        with pytest.raises(GRPCError) as outside:
            async with client.session() as session:
                assert await session.add(5) == 5
                await front.drop()
                with pytest.raises(GRPCError) as caught:
                    await session.add(1)
                raise caught.value
        assert outside.value is caught.value  # the same error, not a second one
        assert caught.value.status is Status.UNAVAILABLE
        assert "cut off" in str(caught.value.message)


def test_a_client_made_outside_the_event_loop_works_inside_it() -> None:
    port = free_port()
    client = NumberClient("127.0.0.1", port, timeout=10)  # no loop is running here

    async def main() -> list[int]:
        server = build_server()
        await server.start(bind("127.0.0.1", port))
        try:
            async with client:
                return await _collect(client.accumulate([4, 5]))
        finally:
            await server.shutdown(grace=0)

    assert asyncio.run(main()) == [4, 9]


# --- a call whose connection ends before the server answered ----------------------------


class CuttingFront:
    """A listener in front of a real server: its first ``cut`` connections end as
    soon as the client's request HEADERS arrive, unanswered (with a GOAWAY saying
    no stream was processed, or without a word: "lost"); later ones are piped
    through. This is what a grpclib client meets when a server closes an idle
    connection just as a call starts, made deterministic."""

    def __init__(
        self, backend_port: int, cut: int, *, goaway: bool, drop_after_answer: int = 0
    ) -> None:
        """``drop_after_answer``: the first so many piped connections are lost just
        after the server's first DATA frame has passed (the trailers never do)."""
        self.backend_port = backend_port
        self.cut = cut
        self.goaway = goaway
        self.drop_after_answer = drop_after_answer
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[asyncio.StreamWriter] = set()  # of connections piped through

    async def __aenter__(self) -> CuttingFront:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drop(self) -> None:
        """End every piped connection now, without a word: the connection is lost."""
        for writer in self._clients:
            writer.transport.abort()
        await asyncio.sleep(0.1)  # for the client to read the end

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.connections <= self.cut:
                await self._cut(reader, writer)
            else:
                await self._pipe(reader, writer)
        finally:
            writer.close()

    async def _cut(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
            frames, _ = parse_frames(data[len(PREFACE) :])
            if any(isinstance(f, HeadersFrame) for f in frames):
                break
        if self.goaway:  # NO_ERROR, last stream id 0: no stream was processed
            writer.write(frame(SETTINGS, 0, 0) + frame(GOAWAY, 0, 0, struct.pack("!II", 0, 0)))
            await writer.drain()
            # Read on until the client hangs up: closing with its later frames unread
            # would make the kernel send a reset, which can destroy the GOAWAY.
            while await asyncio.wait_for(reader.read(65536), 10):
                pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        back_reader, back_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.close()

        async def answer_then_drop(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            data = b""
            while chunk := await src.read(65536):
                data += chunk
                end = _end_of_first_data_frame(data)
                if end is not None:
                    dst.write(data[:end])
                    await dst.drain()
                    dst.transport.abort()
                    return

        dropping = self.connections - self.cut <= self.drop_after_answer
        back = answer_then_drop if dropping else copy
        try:
            await asyncio.gather(copy(reader, back_writer), back(back_reader, writer))
        finally:
            back_writer.close()


def _end_of_first_data_frame(data: bytes) -> int | None:
    """Where the first non-empty DATA frame in ``data`` (whole HTTP/2 frames from a
    server) ends, once it is all there."""
    offset = 0
    while len(data) - offset >= 9:
        length = int.from_bytes(data[offset : offset + 3], "big")
        if len(data) - offset < 9 + length:
            return None
        offset += 9 + length
        if data[offset - 9 - length + 3] == DATA and length:
            return offset
    return None


# These pinned the earlier rule, "an unanswered accumulate() is sent again once";
# resuming (test_resume.py) replaced it, and they now pin what replaced it, through a
# front that cuts connections in front of the real server.


@pytest.mark.parametrize("goaway", [True, False], ids=["goaway", "lost"])
async def test_a_call_cut_off_before_any_answer_is_resumed_on_a_new_connection(
    number_server: RunningServer, goaway: bool
) -> None:
    """The first connection ends (GOAWAY, or lost) before the server answered the
    call: the call goes on on a new connection and succeeds. That is not ``retry``
    (connecting again), which is off here."""
    async with (
        CuttingFront(number_server.port, cut=1, goaway=goaway) as front,
        NumberClient("127.0.0.1", front.port, timeout=10, retry=None) as client,
    ):
        assert [s async for s in client.accumulate([1, 2, 3])] == [1, 3, 6]
        assert [s async for s in client.accumulate((4,))] == [4]
        assert front.connections == 2


@pytest.mark.parametrize("goaway", [True, False], ids=["goaway", "lost"])
async def test_without_resume_only_a_refused_call_is_sent_again(
    number_server: RunningServer, goaway: bool
) -> None:
    """``resume=False``: a GOAWAY with last stream id 0 says the stream was never
    processed, and it is sent again; a connection lost is the call's UNAVAILABLE."""
    async with (
        CuttingFront(number_server.port, cut=1, goaway=goaway) as front,
        NumberClient("127.0.0.1", front.port, timeout=10, resume=False) as client,
    ):
        if goaway:
            assert [s async for s in client.accumulate([1, 2, 3])] == [1, 3, 6]
        else:
            with pytest.raises(GRPCError) as caught:
                await _collect(client.accumulate([1, 2, 3]))
            assert caught.value.status is Status.UNAVAILABLE
            assert "Connection lost" in str(caught.value.message)
        assert front.connections == 1 + goaway


@pytest.mark.parametrize("goaway", [True, False], ids=["goaway", "lost"])
async def test_a_call_cut_off_past_its_budget_is_unavailable_with_a_hint_only_when_lost(
    number_server: RunningServer, goaway: bool
) -> None:
    """Each new stream is cut too, past the budget (two): UNAVAILABLE. The "connect
    with TLS" hint (what a TLS server's silent drop looks like) is given for a lost
    connection, never after a GOAWAY: a server that sends one speaks plaintext HTTP/2."""
    budget = Resume(attempts=2, initial_backoff=0.01)
    async with (
        CuttingFront(number_server.port, cut=3, goaway=goaway) as front,
        NumberClient("127.0.0.1", front.port, timeout=10, resume=budget) as client,
    ):
        with pytest.raises(GRPCError) as caught:
            async for _ in client.accumulate([1, 2, 3]):
                pass
        assert caught.value.status is Status.UNAVAILABLE
        message = str(caught.value.message)
        assert "not resumed: 2 new stream(s) failed" in message
        if goaway:
            assert "GOAWAY" in message
            assert "TLS" not in message
        else:
            assert "Connection lost" in message
            assert "connect with TLS" in message
        assert front.connections == 3
        assert [s async for s in client.accumulate([5])] == [5]  # the fourth is piped


async def test_a_half_read_iterator_is_resumed_without_reading_it_twice(
    number_server: RunningServer,
) -> None:
    """An iterator the call was still reading when the connection went: the call
    goes on on a new connection with what it had sent, and nothing is taken from
    the iterator twice."""
    taken: list[int] = []
    more = asyncio.Event()

    async def numbers() -> AsyncIterator[int]:
        taken.append(1)
        yield 1
        await asyncio.wait_for(more.wait(), 10)  # still waiting when the cut comes
        taken.append(2)
        yield 2

    async with (
        CuttingFront(number_server.port, cut=1, goaway=True) as front,
        NumberClient("127.0.0.1", front.port, timeout=10) as client,
    ):
        sums = client.accumulate(numbers())
        assert await anext(sums) == 1
        more.set()
        assert [s async for s in sums] == [3]
        assert taken == [1, 2]
        assert front.connections == 2


async def test_a_call_that_had_an_answer_is_resumed_from_its_last_sum(
    number_server: RunningServer,
) -> None:
    """The connection is lost after the server's first DATA frame: the sums that
    came are kept, and the rest come from a new stream that starts from the last."""
    async with (
        CuttingFront(number_server.port, cut=0, goaway=False, drop_after_answer=1) as front,
        NumberClient("127.0.0.1", front.port, timeout=10, retry=None) as client,
    ):
        assert [s async for s in client.accumulate([1, 2, 3])] == [1, 3, 6]
        assert front.connections == 2


async def test_a_half_read_iterator_with_an_answer_is_resumed(
    number_server: RunningServer,
) -> None:
    """The connection is lost after the server's first sum, the iterator half read:
    the call goes on; each number is taken once and each sum seen once."""
    taken: list[int] = []
    dropped = asyncio.Event()

    async def numbers() -> AsyncIterator[int]:
        taken.append(1)
        yield 1
        await asyncio.wait_for(dropped.wait(), 10)
        taken.append(2)
        yield 2

    got: list[int] = []
    async with (
        CuttingFront(number_server.port, cut=0, goaway=False) as front,
        NumberClient("127.0.0.1", front.port, timeout=10, retry=None) as client,
    ):
        async for total in client.accumulate(numbers()):
            got.append(total)
            if total == 1:
                await front.drop()
                dropped.set()
        assert got == [1, 3]
        assert taken == [1, 2]
        assert front.connections == 2


async def test_a_session_cut_before_its_answer_is_resumed(number_server: RunningServer) -> None:
    """A session's first add meets a connection closed with a GOAWAY: it is answered
    from a new connection."""
    async with (
        CuttingFront(number_server.port, cut=1, goaway=True) as front,
        NumberClient("127.0.0.1", front.port, timeout=10) as client,
    ):
        async with client.session() as session:
            assert await session.add(1) == 1
            assert await session.add(2) == 3
        assert front.connections == 2
