"""Interoperability with grpcio, Google's gRPC implementation, in both directions.

grpcio code for ``proto/tutorial/number.proto`` is generated at test time into a
temporary directory; nothing generated for grpcio is kept in the repository.

* grpcio client -> our grpclib server (the sync client runs in a worker thread,
  because our server runs on the test's event loop);
* our :class:`NumberClient` -> a grpcio server with an independent reference servicer.

Byte-level compatibility of the messages is in test_codec.py.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpcio_peer import Grpcio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import strategies as st

from number_service import ACCUMULATE_NUMBERS, NumberClient
from number_service.pytest_plugin import RunningServer

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
#: Every grpcio call gets this deadline, so that no test can hang.
CALL_TIMEOUT = 10.0
#: Never use a proxy from the environment: everything stays on 127.0.0.1.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

int32s = st.integers(min_value=INT32_MIN, max_value=INT32_MAX)


# --- grpcio client -> our grpclib server -------------------------------------------


@pytest.fixture
def grpcio_channel(number_server: RunningServer) -> Iterator[grpc.Channel]:
    """A grpcio channel to our server over loopback TCP, closed afterwards."""
    channel = grpc.insecure_channel(
        f"{number_server.host}:{number_server.port}", options=CHANNEL_OPTIONS
    )
    try:
        yield channel
    finally:
        channel.close()


@pytest.fixture
def grpcio_stub(grpcio_gen: Grpcio, grpcio_channel: grpc.Channel) -> Any:
    """A generated grpcio stub on ``grpcio_channel``."""
    return grpcio_gen.pb2_grpc.NumberServiceStub(grpcio_channel)


def _pipelined(stub: Any, pb2: ModuleType, nums: Iterable[int]) -> tuple[list[int], Any]:
    """Send all ``nums`` at once; return the sums and the finished call."""
    call = stub.AccumulateNumbers((pb2.NumberRequest(num=n) for n in nums), timeout=CALL_TIMEOUT)
    return [response.sum for response in call], call


def _until_error(
    stub: Any, pb2: ModuleType, nums: Iterable[int]
) -> tuple[list[int], grpc.RpcError]:
    """Send ``nums``; return the sums received before the call failed, and its error."""
    sums: list[int] = []
    call = stub.AccumulateNumbers((pb2.NumberRequest(num=n) for n in nums), timeout=CALL_TIMEOUT)
    try:
        for response in call:
            sums.append(response.sum)
    except grpc.RpcError as err:
        return sums, err
    raise AssertionError(f"call ended with {call.code()} after sums {sums}, expected an error")


async def test_grpcio_client_pipelined(grpcio_gen: Grpcio, grpcio_stub: Any) -> None:
    """1..10 sent without waiting gives the triangular numbers and OK."""
    sums, call = await asyncio.to_thread(_pipelined, grpcio_stub, grpcio_gen.pb2, range(1, 11))
    assert sums == [1, 3, 6, 10, 15, 21, 28, 36, 45, 55]
    assert call.code() is grpc.StatusCode.OK


async def test_grpcio_client_lock_step(grpcio_gen: Grpcio, grpcio_stub: Any) -> None:
    """Each request is sent only after the previous sum has arrived."""
    pb2 = grpcio_gen.pb2
    nums = [7, -3, 100, 0, -104, INT32_MAX, INT32_MIN]
    sums: list[int] = []
    seen_before_send: list[int] = []
    answered: queue.Queue[None] = queue.Queue()

    def requests() -> Iterator[Any]:
        for num in nums:
            seen_before_send.append(len(sums))
            yield pb2.NumberRequest(num=num)
            answered.get(timeout=CALL_TIMEOUT)

    def run() -> Any:
        call = grpcio_stub.AccumulateNumbers(requests(), timeout=CALL_TIMEOUT)
        for response in call:
            sums.append(response.sum)
            answered.put(None)
        return call

    call = await asyncio.to_thread(run)
    assert sums == [7, 4, 104, 104, 0, INT32_MAX, -1]
    assert seen_before_send == list(range(len(nums)))
    assert call.code() is grpc.StatusCode.OK


async def test_grpcio_client_empty_stream(grpcio_gen: Grpcio, grpcio_stub: Any) -> None:
    """No requests: no responses, status OK."""
    sums, call = await asyncio.to_thread(_pipelined, grpcio_stub, grpcio_gen.pb2, [])
    assert sums == []
    assert call.code() is grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("nums", "valid", "details"),
    [
        pytest.param([INT32_MAX, 1], [INT32_MAX], f"sum {INT32_MAX} + num 1", id="positive"),
        pytest.param([INT32_MIN, -1], [INT32_MIN], f"sum {INT32_MIN} + num -1", id="negative"),
        pytest.param(
            [5, INT32_MAX, *range(1000)], [5], f"sum 5 + num {INT32_MAX}", id="more-to-send"
        ),
    ],
)
async def test_grpcio_client_overflow(
    grpcio_gen: Grpcio, grpcio_stub: Any, nums: list[int], valid: list[int], details: str
) -> None:
    """Leaving int32 is OUT_OF_RANGE naming sum and num, after the valid sums."""
    sums, err = await asyncio.to_thread(_until_error, grpcio_stub, grpcio_gen.pb2, nums)
    assert sums == valid
    assert err.code() is grpc.StatusCode.OUT_OF_RANGE
    assert details in err.details()
    assert "int32" in err.details()


@pytest.mark.parametrize("raw", [b"\x08", b"\x08\xff"], ids=["no-varint", "truncated-varint"])
async def test_grpcio_client_undecodable_request(grpcio_channel: grpc.Channel, raw: bytes) -> None:
    """A request that is not a NumberRequest is INTERNAL with a clear message."""
    call = grpcio_channel.stream_stream(
        ACCUMULATE_NUMBERS,
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )

    def run() -> tuple[list[bytes], grpc.RpcError]:
        responses: list[bytes] = []
        try:
            for response in call(iter([raw]), timeout=CALL_TIMEOUT):
                responses.append(response)
        except grpc.RpcError as err:
            return responses, err
        raise AssertionError(f"no error, responses {responses}")

    responses, err = await asyncio.to_thread(run)
    assert responses == []
    assert err.code() is grpc.StatusCode.INTERNAL
    assert "could not be decoded" in err.details()
    assert "tutorial.NumberRequest" in err.details()


async def test_grpcio_client_concurrent_streams(grpcio_gen: Grpcio, grpcio_stub: Any) -> None:
    """Many streams open at once on one connection each get their own sums."""
    pb2 = grpcio_gen.pb2
    n_streams = 40
    all_open = threading.Event()

    def requests(k: int) -> Iterator[Any]:
        all_open.wait(CALL_TIMEOUT)
        for i in range(1, 11):
            yield pb2.NumberRequest(num=k * i - 17)

    def run() -> list[tuple[list[int], grpc.StatusCode]]:
        calls = [
            grpcio_stub.AccumulateNumbers(requests(k), timeout=CALL_TIMEOUT)
            for k in range(n_streams)
        ]
        all_open.set()
        return [([r.sum for r in call], call.code()) for call in calls]

    results = await asyncio.to_thread(run)
    for k, (sums, code) in enumerate(results):
        assert sums == [k * i * (i + 1) // 2 - 17 * i for i in range(1, 11)], f"stream {k}"
        assert code is grpc.StatusCode.OK, f"stream {k}"


# --- our client -> a grpcio server ----------------------------------------------------


class ReferenceServicer:
    """The contract implemented on grpcio, independently of our service.

    With ``stall_after=n`` it answers ``n`` requests, then neither answers nor ends
    the call until the call is over (deadline, cancel or server stop).
    """

    def __init__(self, pb2: ModuleType, *, stall_after: int | None = None) -> None:
        self.pb2 = pb2
        self.stall_after = stall_after

    def AccumulateNumbers(  # noqa: N802 - the name grpcio's generated code calls
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Yield the running sum for each request; abort OUT_OF_RANGE on overflow."""
        total = 0
        for answered, request in enumerate(request_iterator):
            if self.stall_after is not None and answered >= self.stall_after:
                over = threading.Event()
                if context.add_callback(over.set):
                    over.wait(CALL_TIMEOUT)
                return
            if not INT32_MIN <= total + request.num <= INT32_MAX:
                context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"reference: sum {total} + num {request.num} overflows int32",
                )
            total += request.num
            yield self.pb2.NumberResponse(sum=total)


StartServer = Callable[[ReferenceServicer], int]


@pytest.fixture
def start_grpcio_server(grpcio_gen: Grpcio) -> Iterator[StartServer]:
    """Start grpcio servers on 127.0.0.1 ephemeral ports; all stopped afterwards."""
    started: list[tuple[grpc.Server, ThreadPoolExecutor]] = []

    def start(servicer: ReferenceServicer) -> int:
        executor = ThreadPoolExecutor(max_workers=4)
        server = grpc.server(executor, options=CHANNEL_OPTIONS)
        started.append((server, executor))
        grpcio_gen.pb2_grpc.add_NumberServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port, "grpcio could not bind 127.0.0.1"
        server.start()
        return int(port)

    yield start
    for server, executor in started:
        assert server.stop(grace=None).wait(CALL_TIMEOUT), "grpcio server did not stop"
        executor.shutdown(wait=True, cancel_futures=True)


@pytest_asyncio.fixture
async def reference_client(
    grpcio_gen: Grpcio, start_grpcio_server: StartServer
) -> AsyncIterator[NumberClient]:
    """Our client connected to a grpcio server running :class:`ReferenceServicer`."""
    port = start_grpcio_server(ReferenceServicer(grpcio_gen.pb2))
    async with NumberClient("127.0.0.1", port, timeout=CALL_TIMEOUT) as client:
        yield client


async def _accumulate_into(sums: list[int], client: NumberClient, nums: list[int]) -> None:
    """accumulate() ``nums``, appending each sum to ``sums`` as it arrives."""
    async for total in client.accumulate(nums):
        sums.append(total)


async def _add_into(sums: list[int], client: NumberClient, nums: list[int]) -> None:
    """add() ``nums`` one by one in a session, appending each sum to ``sums``."""
    async with client.session() as session:
        for num in nums:
            sums.append(await session.add(num))


async def test_our_client_pipelined(reference_client: NumberClient) -> None:
    """accumulate() over a grpcio server gives the running sums."""
    sums = [s async for s in reference_client.accumulate(range(1, 11))]
    assert sums == [1, 3, 6, 10, 15, 21, 28, 36, 45, 55]


async def test_our_client_async_source(reference_client: NumberClient) -> None:
    """An async source, negatives and the int32 bounds come back unchanged."""

    async def numbers() -> AsyncIterator[int]:
        for num in [INT32_MIN, INT32_MAX, -5, 0, 6]:
            yield num

    sums = [s async for s in reference_client.accumulate(numbers())]
    assert sums == [INT32_MIN, -1, -6, -6, 0]


async def test_our_client_session_lock_step(reference_client: NumberClient) -> None:
    """session().add() answers each number with the sum before the next is sent."""
    async with reference_client.session() as session:
        assert await session.add(10) == 10
        assert await session.add(-4) == 6
        assert await session.add(INT32_MAX - 6) == INT32_MAX
        assert await session.add(INT32_MIN) == -1


async def test_our_client_empty_stream(reference_client: NumberClient) -> None:
    """No numbers: no sums and no error."""
    assert [s async for s in reference_client.accumulate([])] == []


async def test_our_client_empty_session(reference_client: NumberClient) -> None:
    """A session left without any add() half-closes and ends with OK."""
    async with reference_client.session():
        pass
    async with reference_client.session() as session:  # and the client carries on
        assert await session.add(3) == 3


@pytest.mark.parametrize(
    ("nums", "valid", "message"),
    [
        pytest.param([INT32_MAX, 1], [INT32_MAX], f"sum {INT32_MAX} + num 1", id="positive"),
        pytest.param([INT32_MIN, -1], [INT32_MIN], f"sum {INT32_MIN} + num -1", id="negative"),
        pytest.param(
            [1, INT32_MAX, *range(1000)], [1], f"sum 1 + num {INT32_MAX}", id="more-to-send"
        ),
    ],
)
async def test_our_client_overflow(
    reference_client: NumberClient, nums: list[int], valid: list[int], message: str
) -> None:
    """The grpcio server's OUT_OF_RANGE is a GRPCError with its message.

    grpcio ends a stream the client still sends on with trailers and then
    RST_STREAM(NO_ERROR); grpclib's client treats the reset as termination and
    drops a response that was read in the same packet (cf. grpc-node #2764). So
    pipelined, the sums that arrive are the valid ones, but the last may be
    missing; lock-step (test_our_client_session_overflow) gets every one.
    """
    sums: list[int] = []
    with pytest.raises(GRPCError) as info:
        await _accumulate_into(sums, reference_client, nums)
    assert sums == valid[: len(sums)]
    assert info.value.status is Status.OUT_OF_RANGE
    assert info.value.message == f"reference: {message} overflows int32"


async def test_our_client_session_overflow(reference_client: NumberClient) -> None:
    """In a session, the overflowing add() raises the server's OUT_OF_RANGE itself."""
    async with reference_client.session() as session:
        assert await session.add(INT32_MAX) == INT32_MAX
        with pytest.raises(GRPCError) as info:
            await session.add(1)
    assert info.value.status is Status.OUT_OF_RANGE
    assert info.value.message == f"reference: sum {INT32_MAX} + num 1 overflows int32"


@pytest_asyncio.fixture
async def stalling_client(
    grpcio_gen: Grpcio, start_grpcio_server: StartServer
) -> AsyncIterator[NumberClient]:
    """Our client, with a 0.5 s timeout, to a grpcio server that stalls after one answer."""
    port = start_grpcio_server(ReferenceServicer(grpcio_gen.pb2, stall_after=1))
    async with NumberClient("127.0.0.1", port, timeout=0.5) as client:
        yield client


async def test_our_client_deadline_accumulate(stalling_client: NumberClient) -> None:
    """A stalled stream ends in DEADLINE_EXCEEDED, after the sums that did arrive."""
    sums: list[int] = []
    started = time.monotonic()
    with pytest.raises(GRPCError) as info:
        await _accumulate_into(sums, stalling_client, [5, 1])
    elapsed = time.monotonic() - started
    assert info.value.status is Status.DEADLINE_EXCEEDED
    assert sums == [5]
    assert 0.4 <= elapsed < 5


async def test_our_client_deadline_session(stalling_client: NumberClient) -> None:
    """A session whose answer never comes ends in DEADLINE_EXCEEDED."""
    sums: list[int] = []
    started = time.monotonic()
    with pytest.raises(GRPCError) as info:
        await _add_into(sums, stalling_client, [5, 1])
    elapsed = time.monotonic() - started
    assert info.value.status is Status.DEADLINE_EXCEEDED
    assert sums == [5]
    assert 0.4 <= elapsed < 5
