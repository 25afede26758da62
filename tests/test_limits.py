"""Resource limits, each reached over loopback: message size, streams per connection,
the connection cap, keepalive, the idle-connection and per-stream idle timeouts.

Servers run in-process (``build_server(limits)`` on 127.0.0.1:0) with small
limits so each is reached quickly; one ``number-service serve`` subprocess shows the
flags and environment variables reach the same limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections import deque
from collections.abc import AsyncIterator

import grpc
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.errors import ErrorCodes
from h2.events import PingReceived
from h2.exceptions import TooManyStreamsError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame, PingFrame, SettingsFrame
from polling import eventually
from processes import run, start_server
from rawh2 import (
    PREFACE,
    SETTINGS,
    H2Client,
    RawSocket,
    Received,
    frame,
    grpc_message,
)

from number_service import NumberClient, Serving, build_server
from number_service.codec import encode_int32_field as num  # a NumberRequest's bytes
from number_service.service import ACCUMULATE_NUMBERS
from number_service.serving.grpclib_ext import Server
from number_service.serving.limits import Limits
from number_service.serving.run import address_of, bind
from number_service.serving.settings import DEFAULT_MAX_MESSAGE_SIZE, flag

HOST = "127.0.0.1"
TIMEOUT = 10.0  # seconds: the longest any one wait here may take
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@contextlib.asynccontextmanager
async def serving(limits: Limits | None = None) -> AsyncIterator[tuple[Serving, int]]:
    """A NumberService server with ``limits`` (None: its defaults) on
    127.0.0.1:<ephemeral>, and its port; shut down after."""
    sock = bind(HOST, 0)
    built = build_server(limits)
    await built.start(sock)
    try:
        yield built, address_of(sock)[1]
    finally:
        await built.shutdown(grace=0)


@contextlib.asynccontextmanager
async def ext_serving(limits: Limits | None = None) -> AsyncIterator[tuple[Server, int]]:
    """:func:`serving`'s grpclib_ext Server (for tests that look at its connections)
    and its port."""
    async with serving(limits) as (built, port):
        assert isinstance(built.server, Server)
        yield built.server, port


def sums(data: list[bytes]) -> list[int]:
    """Sums from NumberResponse bytes (small non-negative ones)."""
    out = []
    for message in data:
        assert message[:1] == b"\x08", message
        value, shift = 0, 0
        for byte in message[1:]:
            value |= (byte & 0x7F) << shift
            shift += 7
        out.append(value)
    return out


def padded(value: int, size: int) -> bytes:
    """A NumberRequest of exactly ``size`` bytes: an unknown length-delimited field 2
    (skipped by every protobuf parser) holds the padding, then num = ``value``."""
    tail = num(value)
    length = size - len(tail) - 1 - 4  # tag byte, 4-byte varint length (2**21..2**28)
    assert 2**21 <= length < 2**28
    varint = bytes([(length & 0x7F) | 0x80, (length >> 7 & 0x7F) | 0x80])
    varint += bytes([(length >> 14 & 0x7F) | 0x80, length >> 21])
    message = b"\x12" + varint + bytes(length) + tail
    assert len(message) == size
    return message


# --- 1. maximum message size ------------------------------------------------------------


def _grpcio_call(port: int, message: bytes) -> tuple[list[bytes], grpc.RpcError | None]:
    """One stream from grpcio carrying ``message`` as raw bytes; responses and error."""
    with grpc.insecure_channel(f"{HOST}:{port}", options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(
            ACCUMULATE_NUMBERS,
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )
        responses: list[bytes] = []
        try:
            for response in call(iter([message]), timeout=TIMEOUT):
                responses.append(response)
        except grpc.RpcError as err:
            return responses, err
        return responses, None


async def test_message_over_the_limit_is_resource_exhausted_at_the_limit_accepted() -> None:
    """Default limit, 4 MiB: a 5 MiB request from grpcio gets RESOURCE_EXHAUSTED with
    its size, the limit and the flag; one of exactly 4 MiB (padding in an unknown
    field, then num=5) is read and answered 5; one byte more is refused."""
    assert Limits().max_message_size == DEFAULT_MAX_MESSAGE_SIZE == 4 * 1024 * 1024
    async with serving(Limits()) as (_, port):
        five_mib = padded(1, 5 * 1024 * 1024)
        responses, err = await asyncio.to_thread(_grpcio_call, port, five_mib)
        assert responses == []
        assert err is not None
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "5242880 bytes" in err.details()
        assert "4194304 bytes" in err.details()
        assert "--max-message-size" in err.details()

        at_limit = padded(5, DEFAULT_MAX_MESSAGE_SIZE)
        responses, err = await asyncio.to_thread(_grpcio_call, port, at_limit)
        assert err is None, err
        assert sums(responses) == [5]

        over = padded(5, DEFAULT_MAX_MESSAGE_SIZE + 1)
        responses, err = await asyncio.to_thread(_grpcio_call, port, over)
        assert err is not None
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err


async def test_oversized_prefix_is_refused_before_the_body_other_streams_carry_on() -> None:
    """A length prefix claiming 1 GiB is answered RESOURCE_EXHAUSTED at once, with
    only the prefix sent: the server never waits for (or buffers) the body. Another
    stream on the same connection keeps its sum; this process's peak RSS does not
    grow by anything like the claimed size."""
    async with serving(Limits()) as (built, port), await H2Client.connect(port) as client:
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        good = client.open_stream()
        client.send_data(good, grpc_message(num(1)))
        await client.read_until(lambda: len(client.replies[good].messages) == 1)

        huge = client.open_stream()
        client.send_data(huge, grpc_message(b"", length=2**30))  # the prefix alone
        reply = await client.reply(huge)
        assert reply.grpc_status == Status.RESOURCE_EXHAUSTED.value, reply
        assert reply.grpc_message is not None
        assert "1073741824 bytes" in reply.grpc_message
        assert "--max-message-size" in reply.grpc_message

        client.send_data(good, grpc_message(num(2)), end_stream=True)
        good_reply = await client.reply(good)
        assert sums(good_reply.messages) == [1, 3]
        assert good_reply.grpc_status == Status.OK.value
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
        assert grown < 64 * 1024, f"peak RSS grew by {grown} KiB"
        assert not built.streams.live()


# --- 2. maximum concurrent streams per connection ---------------------------------------


async def test_max_concurrent_streams_is_advertised_and_enforced() -> None:
    """Limit 3: the server's SETTINGS say 3; a raw client's h2 then refuses to open
    a 4th stream itself. One opened anyway (the client broke the protocol) gets
    RST_STREAM REFUSED_STREAM, and the three open streams carry on."""
    async with (
        serving(Limits(max_concurrent_streams=3)) as (_, port),
        await H2Client.connect(port) as client,
    ):
        settings = client.conn.remote_settings
        await client.read_until(lambda: settings.max_concurrent_streams == 3)
        await client.flush()  # our ACK of it: from now on the server enforces it
        streams = [client.open_stream() for _ in range(3)]
        for k, stream in enumerate(streams, 1):
            client.send_data(stream, grpc_message(num(k)))
        await client.read_until(lambda: all(len(client.replies[s].messages) == 1 for s in streams))
        assert [sums(client.replies[s].messages) for s in streams] == [[1], [2], [3]]
        with pytest.raises(TooManyStreamsError):
            client.open_stream()

        # Ignore the setting (test-only: lift h2's own client-side check).
        settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = deque([1000])
        refused = client.open_stream()
        client.send_data(refused, grpc_message(num(9)), end_stream=True)  # on a refused stream
        reply = await client.reply(refused)
        assert reply.reset == ErrorCodes.REFUSED_STREAM, reply
        assert reply.headers == []

        for k, stream in enumerate(streams, 1):  # the three carry on
            client.send_data(stream, grpc_message(num(10)), end_stream=True)
            reply = await client.reply(stream)
            assert sums(reply.messages) == [k, k + 10]
            assert reply.grpc_status == Status.OK.value
        settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = deque([3])
        assert sums((await client.call(num(5))).messages) == [5]  # and new ones open
        assert client.goaway is None
        assert not client.closed


async def test_a_grpclib_client_queues_streams_beyond_the_limit() -> None:
    """Limit 3: a well-behaved client (ours, on grpclib) opens a 4th stream only when
    one of the 3 open ones ends; all sums are right and the server never has more
    than 3 streams of the connection open."""
    async with (
        serving(Limits(max_concurrent_streams=3)) as (built, port),
        NumberClient(HOST, port, timeout=TIMEOUT) as client,
    ):
        most = 0

        def count(_: object) -> None:
            nonlocal most
            most = max(most, len(built.streams.live()))

        built.streams.on_start.append(count)
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(client.session()) for _ in range(3)]
            for k, session in enumerate(sessions, 1):
                assert await session.add(k) == k

            async def fourth() -> int:
                async with client.session() as session:
                    return await session.add(40)

            waiting = asyncio.ensure_future(fourth())
            done, _ = await asyncio.wait([waiting], timeout=0.5)
            assert not done, "a 4th stream opened while 3 were open"
            assert len(built.streams.live()) == 3
            await stack.aclose()  # the three end with OK: the 4th goes ahead
            assert await asyncio.wait_for(waiting, TIMEOUT) == 40
        assert most == 3


# --- 3. open connections per process ----------------------------------------------------


async def handshaken(port: int) -> H2Client:
    client = await H2Client.connect(port)
    await client.read_until(lambda: client.conn.remote_settings.max_concurrent_streams > 0)
    return client


def goaway_of(received: Received) -> GoAwayFrame:
    frames = [f for f in received.frames if isinstance(f, GoAwayFrame)]
    assert len(frames) == 1, received.frame_types()
    return frames[0]


async def test_a_client_over_the_cap_that_sent_its_preface_reads_the_goaway() -> None:
    """Over the cap, a client that has sent its preface and SETTINGS (bytes the server
    never reads) still gets SETTINGS and the GOAWAY, then a FIN, not a reset: the
    refused connection is held open, read and dropped, until the client closes."""
    async with serving(Limits(max_connections=1)) as (built, port):
        assert built.connections is not None
        async with await handshaken(port):
            async with await RawSocket.connect(port) as extra:
                await extra.send(PREFACE + frame(SETTINGS, 0, 0) + b"more bytes, never read")
                received = await extra.read(timeout=TIMEOUT)
                assert received.closed  # the server's FIN
                goaway = goaway_of(received)
                assert goaway.error_code == ErrorCodes.NO_ERROR
                assert flag("max_connections").encode() in goaway.additional_data
                assert built.connections.held == 1
            await eventually(lambda: built.connections is not None and built.connections.held == 0)
        assert built.connections.refused == 1


async def test_connections_over_the_cap_are_closed_with_goaway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cap 5: five connections open; the 6th, 7th and 8th get SETTINGS, a GOAWAY
    (NO_ERROR, no stream processed, the flag named) and are closed, with one warning
    for the three; the five keep working; once one closes, a new one is admitted."""
    caplog.set_level(logging.INFO, logger="number_service")
    async with serving(Limits(max_connections=5)) as (built, port):
        assert built.connections is not None
        clients = [await handshaken(port) for _ in range(5)]
        try:
            assert built.connections.open == 5
            for _ in range(3):
                async with await RawSocket.connect(port) as extra:
                    received = await extra.read(timeout=TIMEOUT)
                assert received.closed
                goaway = goaway_of(received)
                assert goaway.error_code == ErrorCodes.NO_ERROR
                assert goaway.last_stream_id == 0
                assert b"--max-connections 5" in goaway.additional_data
            assert built.connections.refused == 3
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "--max-connections 5" in warnings[0].getMessage()

            for k, client in enumerate(clients, 1):
                reply = await client.call(num(k), num(1))
                assert sums(reply.messages) == [k, k + 1]
                assert reply.grpc_status == Status.OK.value

            await clients.pop().close()
            await eventually(lambda: built.connections is not None and built.connections.open == 4)
            async with NumberClient(HOST, port, timeout=TIMEOUT) as again:
                assert [s async for s in again.accumulate([2, 3])] == [2, 5]
            assert any("refused 3" in r.getMessage() for r in caplog.records)
        finally:
            for client in clients:
                await client.close()
        await eventually(lambda: built.connections is not None and built.connections.open == 0)


async def test_shutdown_closes_every_connection_left_open() -> None:
    """After its drain, shutdown closes every connection, whatever it is doing: one
    with a stream the drain cut (its UNAVAILABLE trailers arrive first), one with no
    stream, one that never sent the HTTP/2 preface. grpclib leaves connections to
    the clients, and from Python 3.12.1 its wait_closed() waited for them forever."""
    sock = bind(HOST, 0)
    built = build_server()
    connections = built.connections
    assert connections is not None
    await built.start(sock)
    port = address_of(sock)[1]
    silent = await RawSocket.connect(port)
    idle = await handshaken(port)
    busy = await handshaken(port)
    try:
        stream = busy.open_stream()
        busy.send_data(stream, grpc_message(num(7)))
        reply = busy.replies[stream]
        await busy.read_until(lambda: sums(reply.messages) == [7])
        await eventually(lambda: connections.open == 3)
        await asyncio.wait_for(built.shutdown(grace=0), TIMEOUT)
        assert connections.open == 0
        await busy.read_until(lambda: False)  # to the end of the connection
        assert reply.ended, "the stream was cut off before its trailers"
        assert reply.grpc_status == Status.UNAVAILABLE.value
        assert "shut down" in (reply.grpc_message or "")
        await idle.read_until(lambda: False)
        for client, last in ((busy, stream), (idle, 0)):
            assert client.closed
            # The drain's two GOAWAYs (2^31-1, then the real last stream id), then the
            # close, after everything written.
            assert [(g.last_stream_id, g.error_code) for g in client.goaways] == [
                (2**31 - 1, 0),
                (last, 0),
            ]
        assert (await silent.read(timeout=TIMEOUT)).closed
    finally:
        for peer in (busy, idle, silent):
            await peer.close()


# --- 4. keepalive and the idle-connection timeout ---------------------------------------


async def test_a_peer_that_never_answers_pings_is_closed() -> None:
    """keepalive 0.2 s / 0.2 s: a peer that completes the HTTP/2 handshake, then
    never answers a PING, is pinged and has its connection closed."""
    limits = Limits(keepalive_time=0.2, keepalive_timeout=0.2, idle_timeout=None)
    async with serving(limits) as (built, port), await RawSocket.connect(port) as peer:
        await peer.send(PREFACE + frame(SETTINGS, 0, 0))
        await peer.read(lambda r: any(isinstance(f, SettingsFrame) for f in r.frames))
        await peer.send(frame(SETTINGS, 0x1, 0))  # ACK the server's settings
        received = await peer.read(timeout=TIMEOUT)  # until the server closes
        assert received.closed, "the server kept a peer that never answers pings"
        pings = [f for f in received.frames if isinstance(f, PingFrame) and not f.flags]
        assert pings, received.frame_types()
        assert built.connections is not None
        await eventually(lambda: built.connections is not None and built.connections.open == 0)


async def test_a_peer_that_answers_pings_keeps_its_connection() -> None:
    """keepalive 0.2 s / 2 s: a client that answers PINGs (h2 does) is pinged
    several times over ~1.5 s, idle and with a stream open, and keeps its connection.
    (The generous timeout: client and server share this test's event loop, so an
    answer can be read late after a stall of the machine.)"""
    limits = Limits(keepalive_time=0.2, keepalive_timeout=2.0, idle_timeout=None)
    async with serving(limits) as (_, port), await handshaken(port) as client:
        pinged = 0
        loop = asyncio.get_running_loop()
        stream = None
        end = loop.time() + 1.5
        while loop.time() < end:
            if stream is None and loop.time() > end - 0.8:
                stream = client.open_stream()
                client.send_data(stream, grpc_message(num(4)))
            with contextlib.suppress(TimeoutError):
                events = await client.receive(timeout=0.1)
                pinged += sum(isinstance(e, PingReceived) for e in events)
            assert not client.closed, f"closed after {pinged} pings"
        assert pinged >= 3, pinged
        assert stream is not None
        client.send_data(stream, grpc_message(num(5)), end_stream=True)
        reply = await client.reply(stream)
        assert sums(reply.messages) == [4, 9]
        assert reply.grpc_status == Status.OK.value


async def test_an_idle_connection_is_closed_a_busy_one_is_not() -> None:
    """idle timeout 0.3 s: a connection with no stream gets a GOAWAY (NO_ERROR,
    naming the flag) and is closed; one whose stream stays open for 1 s is not,
    and is closed once that stream has ended and 0.3 s have passed."""
    limits = Limits(idle_timeout=0.3, keepalive_time=None)
    async with serving(limits) as (built, port):
        async with await handshaken(port) as idle:
            await idle.read_until(lambda: idle.closed, TIMEOUT)
            assert idle.goaway is not None
            assert idle.goaway.error_code == ErrorCodes.NO_ERROR
            assert idle.goaway.additional_data is not None
            assert b"--idle-timeout" in idle.goaway.additional_data

        async with await handshaken(port) as busy:
            stream = busy.open_stream()
            busy.send_data(stream, grpc_message(num(1)))
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.0
            while loop.time() < end:
                with contextlib.suppress(TimeoutError):
                    await busy.receive(timeout=0.1)
                assert busy.goaway is None
                assert not busy.closed
            busy.send_data(stream, grpc_message(num(2)), end_stream=True)
            reply = await busy.reply(stream)
            assert sums(reply.messages) == [1, 3]
            await busy.read_until(lambda: busy.closed, TIMEOUT)
            assert busy.goaway is not None
        assert built.connections is not None
        assert built.connections.idle_closed == 2


def test_idle_timeout_is_off_by_default_keepalive_is_on() -> None:
    """A grpclib client fails a call that races with an idle close, so connections
    are not closed for idleness unless asked; keepalive reaps dead peers instead."""
    assert Limits().idle_timeout is None
    assert Limits().keepalive_time is not None


@pytest.mark.parametrize(
    "sent",
    [b"", PREFACE[:10], PREFACE],
    ids=["nothing", "part-of-the-preface", "preface-without-settings"],
)
async def test_keepalive_alone_closes_a_peer_that_never_completes_http2(sent: bytes) -> None:
    """keepalive 0.2 s / 0.5 s, no idle timeout: a peer that connects and sends
    nothing, part of the HTTP/2 preface, or the preface but no SETTINGS, is pinged
    (grpclib pings from the moment the connection is made; h2 allows it before the
    client's preface) and closed, and its slot under the cap is freed."""
    limits = Limits(keepalive_time=0.2, keepalive_timeout=0.5)
    assert limits.idle_timeout is None
    async with serving(limits) as (built, port), await RawSocket.connect(port) as peer:
        await peer.send(sent)
        await eventually(lambda: built.connections is not None and built.connections.open == 1)
        received = await peer.read(timeout=TIMEOUT)  # until the server closes
        assert received.closed, "the server kept a peer that never completed HTTP/2"
        assert any(isinstance(f, PingFrame) for f in received.frames), received.frame_types()
        await eventually(lambda: built.connections is not None and built.connections.open == 0)


# --- 5. per-stream idle timeout ---------------------------------------------------------


async def test_a_silent_stream_ends_with_deadline_exceeded() -> None:
    """stream idle timeout 0.3 s: a client that sends 1, 2 and then nothing gets 1, 3
    and then DEADLINE_EXCEEDED with a message naming the flag; the connection stays."""
    async with (
        serving(Limits(stream_idle_timeout=0.3)) as (built, port),
        NumberClient(HOST, port, timeout=TIMEOUT) as client,
    ):
        got: list[int] = []

        async def numbers() -> AsyncIterator[int]:
            yield 1
            yield 2
            await asyncio.sleep(TIMEOUT)

        with pytest.raises(GRPCError) as caught:
            async for total in client.accumulate(numbers()):
                got.append(total)
        assert got == [1, 3]
        assert caught.value.status is Status.DEADLINE_EXCEEDED
        assert caught.value.message is not None
        assert "no request for 0.3 s (--stream-idle-timeout)" in caught.value.message
        assert "start a new one" in caught.value.message
        assert [s async for s in client.accumulate([7])] == [7]  # same client, new stream
        assert not built.streams.live()


async def test_a_stream_that_keeps_sending_is_not_cut() -> None:
    """stream idle timeout 1 s: one request every 0.1 s for 1.5 s is served whole
    (10x margin: client and server share this test's event loop)."""
    async with (
        serving(Limits(stream_idle_timeout=1.0)) as (_, port),
        NumberClient(HOST, port, timeout=TIMEOUT) as client,
    ):

        async def numbers() -> AsyncIterator[int]:
            for _ in range(15):
                yield 1
                await asyncio.sleep(0.1)

        assert [s async for s in client.accumulate(numbers())] == list(range(1, 16))


# --- the serve command: flags and environment ------------------------------------------


async def test_serve_flags_and_environment_reach_the_limits() -> None:
    """`number-service serve` with --max-message-size 1000, --max-concurrent-streams 3,
    --stream-idle-timeout 0.3 and NUMBER_SERVICE_MAX_CONNECTIONS=2,
    NUMBER_SERVICE_IDLE_TIMEOUT=2: each limit is reached over loopback."""
    srv = start_server(
        0,
        "--max-message-size",
        "1000",
        "--max-concurrent-streams",
        "3",
        "--stream-idle-timeout",
        "0.3",
        env={"NUMBER_SERVICE_MAX_CONNECTIONS": "2", "NUMBER_SERVICE_IDLE_TIMEOUT": "2"},
    )
    try:
        async with await handshaken(srv.port) as client:
            await client.read_until(lambda: client.conn.remote_settings.max_concurrent_streams == 3)
            big = await client.call(bytes(1001))
            assert big.grpc_status == Status.RESOURCE_EXHAUSTED.value, big
            assert big.grpc_message is not None
            assert "limit of 1000 bytes" in big.grpc_message
            stream = client.open_stream()
            client.send_data(stream, grpc_message(num(6)))
            silent = await client.reply(stream)
            assert sums(silent.messages) == [6]
            assert silent.grpc_status == Status.DEADLINE_EXCEEDED.value, silent

            async with await handshaken(srv.port) as second:
                async with await RawSocket.connect(srv.port) as third:
                    received = await third.read(timeout=TIMEOUT)
                assert received.closed
                assert b"--max-connections 2" in goaway_of(received).additional_data
                await asyncio.to_thread(srv.stderr.wait_for, "connection cap reached")
                await second.read_until(lambda: second.closed, TIMEOUT)  # idle for 2 s
                assert second.goaway is not None
    finally:
        assert srv.stop() == 0


def test_limits_are_checked() -> None:
    """Nonsense limits are refused when the configuration is made, not at run time."""
    for bad in (
        {"max_message_size": -1},
        {"max_message_size": 0},
        {"tls_handshake_timeout": 0.0},
        {"max_concurrent_streams": 0},
        {"max_connections": 0},
        {"keepalive_time": 0.0},
        {"idle_timeout": -1.0},
        {"stream_idle_timeout": 0.0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)


def test_max_message_size_0_is_a_usage_error() -> None:
    """0 would mean "refuse every message", where 0 turns other limits off: refused."""
    result = run("serve", "--port", "0", "--max-message-size", "0")
    assert result.returncode == 2, result
    assert "--max-message-size" in result.stderr
    assert "Traceback" not in result.stderr


async def test_log_level_warning_hides_the_limits_info_lines() -> None:
    """--log-level warning: the cap's warning shows, its info line ("accepting
    connections again") does not; the server's own ready and stop lines still do."""
    srv = start_server(0, "--max-connections", "1", "--log-level", "warning")
    try:
        async with await handshaken(srv.port):
            async with await RawSocket.connect(srv.port) as extra:
                assert (await extra.read(timeout=TIMEOUT)).closed
            await asyncio.to_thread(srv.stderr.wait_for, "connection cap reached")
        loop = asyncio.get_running_loop()
        end = loop.time() + TIMEOUT
        while True:  # until the server has seen `first` go and admits a connection
            async with await RawSocket.connect(srv.port) as again:
                await again.send(PREFACE + frame(SETTINGS, 0, 0))
                if not (await again.read(timeout=0.5)).closed:
                    break
            assert loop.time() < end, "no connection admitted after the first closed"
    finally:
        assert srv.stop() == 0
    lines = srv.stderr.rest().splitlines()
    assert not [line for line in lines if "accepting connections again" in line], lines
    assert any("listening on" in line for line in lines), lines
    assert any("stopped" in line for line in lines), lines
