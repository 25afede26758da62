"""NumberService over a real loopback TCP socket, driven through the client library."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from grpclib import events
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from number_service import (
    ACCUMULATE_NUMBERS,
    INT32_MAX,
    NumberClient,
    NumberService,
    build_server,
)
from number_service.pytest_plugin import RunningServer
from number_service.serving.run import address_of, bind


class RawCodec(CodecBase):
    """Sends bytes exactly as given, so a test can put any payload on the wire."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: object) -> bytes:
        return message

    def decode(self, data: bytes, message_type: object) -> bytes:
        return data


async def test_pipelined(number_server_client: NumberClient) -> None:
    sums = [s async for s in number_server_client.accumulate(range(1, 1001))]
    assert sums == [n * (n + 1) // 2 for n in range(1, 1001)]


async def test_lock_step(number_server_client: NumberClient) -> None:
    async with number_server_client.session() as session:
        total = 0
        for num in (7, -3, 100, 0, -104):
            total += num
            assert await session.add(num) == total


async def test_each_answer_arrives_before_the_next_number_is_produced(
    number_server_client: NumberClient,
) -> None:
    """True bidi through accumulate(): the input waits on the output."""
    answered = asyncio.Event()

    async def numbers() -> AsyncIterator[int]:
        yield 1
        await asyncio.wait_for(answered.wait(), 5)  # hangs if responses were held back
        yield 2

    got = []
    async for total in number_server_client.accumulate(numbers()):
        got.append(total)
        answered.set()
    assert got == [1, 3]


async def test_empty_stream(number_server_client: NumberClient) -> None:
    assert [s async for s in number_server_client.accumulate([])] == []


async def test_overflow(number_server_client: NumberClient) -> None:
    got = []
    with pytest.raises(GRPCError) as caught:
        async for total in number_server_client.accumulate([INT32_MAX, 1, 1]):
            got.append(total)
    assert got == [INT32_MAX]
    assert caught.value.status is Status.OUT_OF_RANGE
    # The connection is still good for the next stream.
    assert [s async for s in number_server_client.accumulate([1, 1])] == [1, 2]


async def test_many_concurrent_streams_have_distinct_sums(number_server: RunningServer) -> None:
    async def one_stream(client: NumberClient, k: int) -> list[int]:
        return [s async for s in client.accumulate([k] * 20)]

    clients = [NumberClient(number_server.host, number_server.port) for _ in range(4)]
    try:
        results = await asyncio.gather(*(one_stream(clients[k % 4], k) for k in range(1, 201)))
    finally:
        for client in clients:
            client.close()
    for k, sums in enumerate(results, 1):
        assert sums == [k * i for i in range(1, 21)]


@pytest.mark.parametrize(
    "payload",
    [b"\x08", b"\x08\xff", b"\x08" + b"\xff" * 10 + b"\x01", b"\x0f"],
    ids=["truncated-varint", "truncated-varint-2", "overlong-varint", "bad-wire-type"],
)
async def test_undecodable_request_is_internal_and_server_keeps_serving(
    number_server: RunningServer, number_server_client: NumberClient, payload: bytes
) -> None:
    async with number_server_client.session() as bystander:
        assert await bystander.add(5) == 5
        async with Channel(number_server.host, number_server.port, codec=RawCodec()) as channel:
            with pytest.raises(GRPCError) as caught:
                async with channel.request(
                    ACCUMULATE_NUMBERS, Cardinality.STREAM_STREAM, bytes, bytes, timeout=5
                ) as stream:
                    await stream.send_message(b"\x08\x01")
                    assert await stream.recv_message() == b"\x08\x01"  # sum 1
                    await stream.send_message(payload, end=True)
                    assert await stream.recv_message() is None
        assert caught.value.status is Status.INTERNAL
        assert caught.value.message is not None
        assert "could not be decoded" in caught.value.message
        assert await bystander.add(5) == 10  # another stream never noticed


async def test_session_without_numbers_ends_ok(
    number_server: RunningServer, number_server_client: NumberClient
) -> None:
    statuses: list[Status] = []

    async def record(event: events.SendTrailingMetadata) -> None:
        statuses.append(event.status)

    events.listen(number_server.server, events.SendTrailingMetadata, record)
    async with number_server_client.session():
        pass
    async with number_server_client.session() as session:
        assert await session.add(2) == 2
    assert statuses == [Status.OK, Status.OK]


async def test_plain_grpclib_server_with_betterproto_codec_still_refuses_bad_input() -> None:
    """The style-guide embedding, Server([NumberService()]), decodes with betterproto,
    which lets wire type 7 through as num=None: the service answers INTERNAL anyway."""
    server = Server([NumberService()])
    sock = bind("127.0.0.1", 0)
    await server.start(sock=sock)
    try:
        host, port = address_of(sock)
        async with Channel(host, port, codec=RawCodec()) as channel:
            with pytest.raises(GRPCError) as caught:
                async with channel.request(
                    ACCUMULATE_NUMBERS, Cardinality.STREAM_STREAM, bytes, bytes, timeout=5
                ) as stream:
                    await stream.send_message(b"\x0f", end=True)
                    assert await stream.recv_message() is None
        assert caught.value.status is Status.INTERNAL
        assert "could not be decoded" in (caught.value.message or "")
    finally:
        server.close()
        await server.wait_closed()


async def test_accepted_connections_have_nagle_off() -> None:
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with
    Nagle on, a lock-step answer waited ~40 ms for the client's delayed ACK."""
    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address_of(sock)), 5)
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("client_host", ["127.0.0.1", "::1"])
async def test_listening_on_all_interfaces_takes_ipv4_and_ipv6_clients(client_host: str) -> None:
    """``::`` is all interfaces, as ``serve --help`` says: IPv4 clients too, not only IPv6."""
    sock = bind("::", 0)
    server = build_server()
    await server.start(sock)
    try:
        async with NumberClient(client_host, address_of(sock)[1], timeout=10) as client:
            assert [s async for s in client.accumulate([1, 2])] == [1, 3]
    finally:
        await server.shutdown(grace=0)
