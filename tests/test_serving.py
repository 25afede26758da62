"""The serving layer serves any betterproto2 service, not only NumberService: a
test-only echo of the ``Kinds`` message (every kind of protobuf field), served by
``Serving.build`` with its defaults (StrictCodec), with health and the drain, and
named by the application's name rather than NumberService's."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Stream

import number_service
from fieldkinds_gen.testing.fieldkinds import Inner, Kinds
from number_service import serving
from number_service.serving import Serving, StrictCodec, address_of, bind
from number_service.serving.grpclib_ext.client import make_channel
from number_service.serving.streams import SHUTDOWN_MESSAGE
from number_service.serving.supervisor import metrics_dir_prefix
from number_service.serving.worker import Worker, worker_env, worker_header

HOST = "127.0.0.1"
TIMEOUT = 10.0
ECHO = "/testing.Echo/Echo"
WATCH = "/grpc.health.v1.Health/Watch"


class Echo:
    """A service on betterproto2 messages that is not NumberService: every request
    back as it came, until the client half-closes."""

    async def echo(self, stream: Stream[Kinds, Kinds]) -> None:
        async for request in stream:
            await stream.send_message(request)

    def __mapping__(self) -> dict[str, Handler]:
        return {ECHO: Handler(self.echo, Cardinality.STREAM_STREAM, Kinds, Kinds)}


def kinds(n: int) -> Kinds:
    return Kinds(
        i32=-n,
        u64=2**64 - n,
        s64=-(2**62),
        db=n / 3,
        inner=Inner(a=n, s="é" * n, child=Inner(r=[-n, n])),
        r_name=["x"] * n,
        counts={"n": n},
    )


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[Serving, int]]:
    built = Serving.build([Echo()])
    Worker(3, "my-app").attach(built.server)
    sock = bind(HOST, 0)
    await built.start(sock)
    try:
        yield built, address_of(sock)[1]
    finally:
        await built.shutdown(grace=0)


async def test_another_service_is_served_with_the_strict_codec(
    echo_server: tuple[Serving, int],
) -> None:
    """Messages of every field kind round-trip; a value the strict codec refuses
    ends the stream with INTERNAL naming the message; health knows the service."""
    _, port = echo_server
    async with Channel(HOST, port, codec=StrictCodec()) as channel:
        async with channel.request(ECHO, Cardinality.STREAM_STREAM, Kinds, Kinds) as call:
            await call.send_request()
            for n in (1, 2, 3):
                await call.send_message(kinds(n))
                assert await call.recv_message() == kinds(n)
            await call.end()
            assert await call.recv_message() is None
            assert call.initial_metadata is not None
            assert dict(call.initial_metadata)["my-app-worker"] == "3"

        raw = Channel(HOST, port, codec=_Bytes())
        try:
            with pytest.raises(GRPCError) as bad:
                async with raw.request(ECHO, Cardinality.STREAM_STREAM, bytes, bytes) as call:
                    await call.send_message(b"\x08", end=True)  # a varint cut short
                    await call.recv_message()
            assert bad.value.status is Status.INTERNAL
            assert "request could not be decoded as Kinds" in str(bad.value.message)
        finally:
            raw.close()

        for service in ("", "testing.Echo"):
            path = "/grpc.health.v1.Health/Check"
            async with channel.request(
                path, Cardinality.UNARY_UNARY, HealthCheckRequest, HealthCheckResponse
            ) as check:
                await check.send_message(HealthCheckRequest(service=service), end=True)
                reply = await check.recv_message()
            assert reply is not None
            assert reply.status == HealthCheckResponse.SERVING


class _Bytes(StrictCodec):
    """Bytes as they are, for a request the server must refuse."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        assert isinstance(message, bytes)
        return message

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


async def test_the_drain_waits_for_the_services_streams_not_for_health() -> None:
    """Shutdown with a grace of 5 s: an echo stream in flight carries on and, once
    it ends, the drain is over at once, though a health Watch stream stays open
    (it never ends by itself); an echo stream still open at the end of the grace
    gets UNAVAILABLE with the layer's message, which says nothing about sums.
    The client is grpclib's with ``grpclib_ext``'s connections: grpclib's own fails
    every stream of a connection that receives a GOAWAY, the drain's too."""
    built = Serving.build([Echo()])
    sock = bind(HOST, 0)
    await built.start(sock)
    loop = asyncio.get_running_loop()
    async with make_channel(*address_of(sock), codec=StrictCodec()) as channel:
        watch = channel.request(
            WATCH, Cardinality.UNARY_STREAM, HealthCheckRequest, HealthCheckResponse
        )
        async with (
            watch as watching,
            channel.request(ECHO, Cardinality.STREAM_STREAM, Kinds, Kinds) as call,
        ):
            await watching.send_message(HealthCheckRequest(service=""), end=True)
            first = await watching.recv_message()
            assert first is not None
            assert first.status == HealthCheckResponse.SERVING
            await call.send_request()
            await call.send_message(kinds(1))
            assert await call.recv_message() == kinds(1)

            started = loop.time()
            shutdown = asyncio.create_task(built.shutdown(grace=5))
            serving_now = await watching.recv_message()
            assert serving_now is not None
            assert serving_now.status == HealthCheckResponse.NOT_SERVING
            await call.send_message(kinds(2))  # in flight: it goes on
            assert await call.recv_message() == kinds(2)
            await call.end()
            assert await call.recv_message() is None
            await asyncio.wait_for(shutdown, TIMEOUT)
            assert loop.time() - started < 4, "the drain waited for the Watch stream"

    built = Serving.build([Echo()])
    sock = bind(HOST, 0)
    await built.start(sock)
    async with make_channel(*address_of(sock), codec=StrictCodec()) as channel:
        with pytest.raises(GRPCError) as cut:
            async with channel.request(ECHO, Cardinality.STREAM_STREAM, Kinds, Kinds) as call:
                await call.send_request()
                await call.send_message(kinds(1))
                assert await call.recv_message() == kinds(1)
                await asyncio.wait_for(built.shutdown(grace=0.2), TIMEOUT)
                await call.recv_message()
    assert cut.value.status is Status.UNAVAILABLE
    assert cut.value.message == SHUTDOWN_MESSAGE
    assert "sum" not in SHUTDOWN_MESSAGE


def test_names_come_from_the_application_name() -> None:
    """The worker's environment variable and header and the metrics directory are
    the application's; NumberService's are what they always were."""
    assert worker_env("my-app") == "MY_APP_WORKER_INDEX"
    assert worker_header("my-app") == "my-app-worker"
    assert metrics_dir_prefix("my-app") == "my-app-metrics-"
    assert serving.ServeConfig().name == "grpc-server"
    assert number_service.ServeConfig().name == "number-service"
    assert worker_env(number_service.ServeConfig().name) == "NUMBER_SERVICE_WORKER_INDEX"
    assert worker_header("number-service") == "number-service-worker"


SERVING = Path(serving.__file__).parent
# What only NumberService may say: its names, its method, its sums.
PARTICULAR = re.compile(
    r"NumberService|number-service|NUMBER_SERVICE|ACCUMULATE|AccumulateNumbers|"
    r"NumberRequest|NumberResponse|number_service_gen|\b[Ss]ums\b|\btutorial\b"
)


def test_the_serving_layer_names_no_service() -> None:
    found = [
        f"{path.relative_to(SERVING)}:{number}: {line.strip()}"
        for path in sorted(SERVING.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PARTICULAR.search(line)
    ]
    assert not found, "\n".join(found)
