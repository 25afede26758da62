"""Survives hostile input: bad payloads, bad requests, HTTP/2 garbage, and a frame fuzzer.

Every test checks two things: what the hostile client saw, and that the server
still serves everyone else afterwards (:func:`assert_serving`: a fresh stream
over a connection that was open all along gives the right sums, and no stream
is left in flight on the server).

What the server does with HTTP/2 garbage (grpclib 0.4.9 on h2 4.4, with the serving
layer's connections, grpclib_ext/connections.py):

- a connection error (bad preface, a frame h2 rejects) closes the connection with a
  GOAWAY saying why (PROTOCOL_ERROR, COMPRESSION_ERROR ...); plain grpclib closes
  it without one;
- a frame whose header announces more than SETTINGS_MAX_FRAME_SIZE is refused at
  once (GOAWAY FRAME_SIZE_ERROR), before its body; an incomplete frame within the
  size is waited for (keepalive reaps a peer that never sends the rest);
- an unknown frame type is ignored (RFC 9113 section 5.5);
- floods (PINGs, streams opened and reset at once ...) are cut with a GOAWAY
  ENHANCE_YOUR_CALM; tests/test_floods.py has them all;
- a request without :method or :path gets RST_STREAM(PROTOCOL_ERROR).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import hpack
import pytest
from google.protobuf.message import DecodeError
from grpclib.const import Status
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from polling import eventually
from rawh2 import (
    ACCUMULATE,
    CONTINUATION,
    DATA,
    GOAWAY,
    HEADERS,
    HOST,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    TIMEOUT,
    WINDOW_UPDATE,
    H2Client,
    RawSocket,
    Received,
    Reply,
    frame,
    frame_header,
    grpc_message,
)

from number_service import INT32_MAX, INT32_MIN, NumberClient, Serving, build_server
from number_service.codec import decode_int32_field, encode_int32_field
from number_service.pytest_plugin import RunningServer
from number_service.serving.run import address_of, bind
from number_service.serving.streams import StreamRecord

HEALTH_NUMBERS = [5, -2, 40, 0, INT32_MAX - 43]
UNDECODABLE = "request could not be decoded as tutorial.NumberRequest: "
SETTINGS_FRAME = frame(SETTINGS, 0, 0)  # an empty SETTINGS: what a client sends first
ACK = 0x1
END_STREAM, END_HEADERS = 0x1, 0x4
QUIET = 0.3  # seconds to watch a connection to see that the server does nothing more


async def assert_serving(client: NumberClient, server: RunningServer | None = None) -> None:
    """The server still works: a fresh stream on ``client`` gives every running sum,
    and (given ``server``) no stream is left in flight there."""

    async def sums() -> list[int]:
        return [s async for s in client.accumulate(HEALTH_NUMBERS, timeout=TIMEOUT)]

    assert await asyncio.wait_for(sums(), TIMEOUT) == list(itertools.accumulate(HEALTH_NUMBERS))
    if server is not None:
        await eventually(lambda: not server.instance.streams.live(), timeout=TIMEOUT)


@pytest.fixture
async def client(number_server: RunningServer, number_server_client: NumberClient) -> NumberClient:
    """``number_server_client``, connected before the test's hostile input arrives,
    so that the check afterwards covers a connection that was open all along."""
    await assert_serving(number_server_client, number_server)
    return number_server_client


def request_headers(path: str) -> list[tuple[str, str]]:
    """The headers of a well-formed gRPC request for ``path``."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", HOST),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def sums_of(messages: list[bytes]) -> list[int]:
    return [decode_int32_field(m) for m in messages]


def only_settings(received: Received) -> bool:
    """The server sent nothing but its own connection set-up (and SETTINGS ACKs)."""
    return set(received.frame_types()) <= {"SettingsFrame", "WindowUpdateFrame"}


# 1. Request payloads that are not valid protobuf.


@pytest.mark.parametrize(
    "payload",
    [
        b"\x08",  # field 1 varint, value missing
        b"\x08\x96",  # value's varint cut short
        b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
        b"\x88" + b"\xff" * 4 + b"\x7f",  # a 6-byte tag
        b"\x0a\x05\x01",  # field 1 length-delimited, 5 bytes announced, 1 there
        b"\x12\x7f\x08\x01",  # unknown field 2, length past the end (betterproto accepts it)
        b"\x0b",  # group 1 started, never ended
        b"\x0c",  # end of group 1 that was never started
        b"\x0f",  # wire type 7
        b"\x00\x00",  # field number 0
        random.Random(20).randbytes(24),  # random bytes that protobuf rejects
        random.Random(51).randbytes(64),
    ],
    ids=[
        "truncated-varint",
        "truncated-varint-2",
        "overlong-varint",
        "overlong-tag",
        "length-past-end",
        "unknown-field-length-past-end",
        "unended-group",
        "unmatched-end-group",
        "wire-type-7",
        "field-0",
        "random-1",
        "random-2",
    ],
)
async def test_undecodable_payload_is_internal(
    number_server: RunningServer, client: NumberClient, pb2: ModuleType, payload: bytes
) -> None:
    with pytest.raises(DecodeError):  # Google's parser is the judge
        pb2.NumberRequest.FromString(payload)
    async with await H2Client.connect(number_server.port) as h2:
        reply = await h2.call(b"\x08\x07", b"\x08\x02", payload, b"\x08\x01")
    assert sums_of(reply.messages) == [7, 9]  # every valid sum, then the status
    assert reply.grpc_status == Status.INTERNAL.value
    assert reply.grpc_message is not None
    assert reply.grpc_message.startswith(UNDECODABLE)
    assert "could not be decoded" in reply.grpc_message
    await assert_serving(client, number_server)


async def test_unknown_fields_and_unexpected_wire_types_are_skipped(
    number_server: RunningServer, client: NumberClient, pb2: ModuleType
) -> None:
    requests = [
        (b"\x10\x05\x08\x03", 3),  # unknown varint field 2, then num 3
        (b"\x0a\x01\x05", 0),  # field 1 length-delimited: unknown, num stays 0
        (b"\x0d\x01\x02\x03\x04", 0),  # field 1 as fixed32: skipped
        (b"\x09" + bytes(8) + b"\x08\x04", 4),  # field 1 as fixed64, then num 4
        (b"\x1b\x08\x63\x1c\x08\x02", 2),  # group 3 (with a field 1 inside), then num 2
        (b"\x08\x01\x08\x06", 6),  # the last occurrence wins
        (b"", 0),  # the empty message
        (b"\x9a\x05\x02\xff\xff\x08\x0a", 10),  # field 83 bytes, then num 10
    ]
    for payload, num in requests:
        assert pb2.NumberRequest.FromString(payload).num == num  # Google agrees
    async with await H2Client.connect(number_server.port) as h2:
        reply = await h2.call(*(payload for payload, _ in requests))
    assert reply.grpc_status == Status.OK.value
    assert sums_of(reply.messages) == list(itertools.accumulate(num for _, num in requests))
    await assert_serving(client, number_server)


# 2. Requests that are not what the service speaks.


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("application/json", "Unacceptable content-type header"),
        ("application/grpc+json", "Unacceptable content-type header"),
        ("text/plain", "Unacceptable content-type header"),
        (None, "Missing content-type header"),
    ],
    ids=["json", "grpc+json", "text", "missing"],
)
async def test_wrong_content_type_is_refused(
    number_server: RunningServer, client: NumberClient, content_type: str | None, message: str
) -> None:
    async with await H2Client.connect(number_server.port) as h2:
        reply = await h2.call(b"\x08\x01", content_type=content_type)
    assert reply.http_status == 415
    assert reply.grpc_status == Status.UNKNOWN.value
    assert reply.grpc_message == message
    assert reply.data == b""  # the request was never handled
    await assert_serving(client, number_server)


@pytest.mark.parametrize(
    "path",
    [
        "/tutorial.NumberService/Accumulate",  # unknown method
        "/tutorial.NumberService/accumulateNumbers",  # method names are case-sensitive
        "/tutorial.Nope/AccumulateNumbers",  # unknown service
        "/AccumulateNumbers",
        "/",
    ],
)
async def test_unknown_method_or_service_is_unimplemented(
    number_server: RunningServer, client: NumberClient, path: str
) -> None:
    async with await H2Client.connect(number_server.port) as h2:
        reply = await h2.call(b"\x08\x01", path=path)
    assert reply.http_status == 200
    assert reply.grpc_status == Status.UNIMPLEMENTED.value
    assert reply.grpc_message == "Method not found"
    assert reply.data == b""
    await assert_serving(client, number_server)


async def test_compressed_message_is_unimplemented(
    number_server: RunningServer, client: NumberClient
) -> None:
    async with await H2Client.connect(number_server.port) as h2:
        reply = await h2.call(
            grpc_message(b"\x08\x02"),
            grpc_message(b"\x1f\x8b\x08\x00", compressed=True),  # flag set: "gzip" follows
            grpc_message(b"\x08\x01"),
            extra=[("grpc-encoding", "gzip")],
            framed=True,
        )
    assert sums_of(reply.messages) == [2]
    assert reply.grpc_status == Status.UNIMPLEMENTED.value
    assert reply.grpc_message == (
        "request could not be read: Compression not implemented; send it uncompressed"
    )
    await assert_serving(client, number_server)


@pytest.mark.parametrize(
    "data",
    [
        grpc_message(b"\x08\x01\x08", length=100),  # prefix says 100 bytes, 3 follow
        grpc_message(b"\x08\x01")[:3],  # the 5-byte prefix itself cut short
    ],
    ids=["length-prefix-lies", "truncated-prefix"],
)
async def test_message_cut_short_by_end_of_stream_is_internal(
    number_server: RunningServer, client: NumberClient, data: bytes
) -> None:
    async with await H2Client.connect(number_server.port) as h2:
        reply = await h2.call(grpc_message(b"\x08\x04"), data, framed=True)
    assert sums_of(reply.messages) == [4]
    assert reply.grpc_status == Status.INTERNAL.value
    assert reply.grpc_message == UNDECODABLE + "the stream ended inside a message"
    await assert_serving(client, number_server)


async def test_message_cut_short_without_end_of_stream_waits_for_the_deadline(
    number_server: RunningServer, client: NumberClient
) -> None:
    """The rest of the message may still come: the server waits, but never past the
    client's deadline, and a reset ends the wait too."""
    async with await H2Client.connect(number_server.port) as h2:
        timed = h2.open_stream(extra=[("grpc-timeout", "300m")])
        h2.send_data(timed, grpc_message(b"\x08\x01\x08", length=100))
        forever = h2.open_stream()
        h2.send_data(forever, grpc_message(b"\x08\x01\x08", length=100))
        reply = await h2.reply(timed)
        assert reply.grpc_status == Status.DEADLINE_EXCEEDED.value
        await eventually(lambda: len(number_server.instance.streams.live()) == 1, TIMEOUT)
        assert number_server.instance.streams.live()[0].method == ACCUMULATE  # still waiting
        h2.reset(forever)
        await h2.flush()
        await eventually(lambda: not number_server.instance.streams.live(), timeout=TIMEOUT)
    await assert_serving(client, number_server)


def _without(name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request_headers(ACCUMULATE) if k != name]


def _with(name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k == name else v) for k, v in request_headers(ACCUMULATE)]


MALFORMED = {
    "no-method": _without(":method"),
    "no-path": _without(":path"),
    "no-scheme": _without(":scheme"),
    "empty-path": _with(":path", ""),
    "empty-method": _with(":method", ""),
    "bad-scheme": _with(":scheme", "ftp"),
    "empty-name": [*request_headers(ACCUMULATE), ("", "x")],
    "upper-case-name": [*request_headers(ACCUMULATE), ("X-Trace", "1")],
    "unknown-pseudo-header": [(":protocol", "x"), *request_headers(ACCUMULATE)],
    "pseudo-after-regular": [*_without(":authority"), (":authority", HOST)],
    "path-twice": [*request_headers(ACCUMULATE)[:3], (":path", "/x"), *_without(":method")[3:]],
    "connection-header": [*request_headers(ACCUMULATE), ("connection", "keep-alive")],
    "te-not-trailers": _with("te", "gzip"),
    "newline-in-value": [*request_headers(ACCUMULATE), ("x-meta", "a\r\nb")],
}


@pytest.mark.parametrize("headers", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_request_headers_are_reset_with_protocol_error(
    number_server: RunningServer,
    client: NumberClient,
    headers: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A malformed request (RFC 9113 sections 8.2, 8.3.1) gets RST_STREAM(PROTOCOL_ERROR)
    at once; no stream is left open and nothing is logged above INFO. grpclib 0.4.9
    turns off h2's header validation: without :method or :path, the KeyError was
    logged as "Server error" with a traceback and the stream left open with no
    answer; the rest were served as if well-formed."""
    caplog.set_level(logging.INFO)
    request = frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(headers))
    request += frame(DATA, END_STREAM, 1, grpc_message(b"\x08\x01"))
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + request)
        received = await sock.read(lambda r: any(isinstance(f, RstStreamFrame) for f in r.frames))
        assert not received.closed
        resets = [f for f in received.frames if isinstance(f, RstStreamFrame)]
        assert [(f.stream_id, f.error_code) for f in resets] == [(1, ErrorCodes.PROTOCOL_ERROR)]
        assert "HeadersFrame" not in received.frame_types()
        await sock.send(frame(PING, 0, 0, b"12345678"))
        received = await sock.read(lambda r: r.ping_acked(b"12345678"))
        assert received.ping_acked(b"12345678")  # the connection itself still works
    await eventually(lambda: not number_server.instance.streams.live(), timeout=TIMEOUT)
    assert not [r for r in caplog.records if r.levelno > logging.INFO], caplog.text
    await assert_serving(client, number_server)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Tracebacks and lines above WARNING."""
    return [
        caplog.handler.format(r)
        for r in caplog.records
        if r.exc_info or r.levelno > logging.WARNING
    ]


@pytest.mark.parametrize("refused", [False, True], ids=["stream", "refused-stream"])
async def test_an_invalid_hpack_index_is_a_compression_error(
    number_server: RunningServer,
    client: NumberClient,
    refused: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An indexed header field past both tables (RFC 7541 2.3.3) is a decoding error,
    a connection error COMPRESSION_ERROR (RFC 9113 4.3). It made asyncio log a
    "Fatal error" traceback and drop the connection without a GOAWAY, on a stream
    over SETTINGS_MAX_CONCURRENT_STREAMS (the refusal path), and h2 said
    PROTOCOL_ERROR elsewhere."""
    caplog.set_level(logging.INFO)
    block = hpack.Encoder().encode(request_headers(ACCUMULATE))
    opened = b"".join(frame(HEADERS, END_HEADERS, 2 * k + 1, block) for k in range(100))
    bad_id = 201 if refused else 1
    bad = frame(HEADERS, END_HEADERS, bad_id, b"\xff\x80\x01")  # index 255
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + (opened if refused else b"") + bad)
        received = await sock.read()
    goaway = assert_goaway(received, ErrorCodes.COMPRESSION_ERROR, "")  # h2 says no more
    assert goaway.last_stream_id == (199 if refused else 0)
    assert not _errors(caplog), _errors(caplog)
    await eventually(lambda: not number_server.instance.streams.live(), timeout=TIMEOUT)
    await assert_serving(client, number_server)


async def test_a_header_list_over_the_limit_is_a_connection_error(
    number_server: RunningServer, client: NumberClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A header block that decodes past SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB, h2's)
    ends the connection with GOAWAY ENHANCE_YOUR_CALM, without a traceback."""
    caplog.set_level(logging.INFO)
    block = hpack.Encoder().encode([*request_headers(ACCUMULATE), ("x-big", "x" * 70_000)])
    pieces = [block[i : i + 16_000] for i in range(0, len(block), 16_000)]
    data = frame(HEADERS, 0, 1, pieces[0])
    data += b"".join(frame(CONTINUATION, 0, 1, p) for p in pieces[1:-1])
    data += frame(CONTINUATION, END_HEADERS, 1, pieces[-1])
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + data)
        received = await sock.read()
    assert_goaway(received, ErrorCodes.ENHANCE_YOUR_CALM, "")  # h2 says no more
    assert not _errors(caplog), _errors(caplog)
    await assert_serving(client, number_server)


@pytest.mark.parametrize("where", ["value", "name"])
async def test_a_non_ascii_header_byte_resets_only_its_stream(
    number_server: RunningServer,
    client: NumberClient,
    where: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """grpclib has h2 decode headers as ASCII: a byte over 0x7f in a metadata name
    or value raised UnicodeDecodeError out of h2, a "Fatal error" traceback and the
    connection dropped. It is a malformed request: RST_STREAM(PROTOCOL_ERROR) for
    that stream, the connection and its other streams carry on."""
    caplog.set_level(logging.INFO)
    meta = (b"x-caf\xe9", b"1") if where == "name" else (b"x-meta", b"caf\xe9")
    headers = [(k.encode(), v.encode()) for k, v in request_headers(ACCUMULATE)]
    block = hpack.Encoder().encode(request_headers(ACCUMULATE))
    data = frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, grpc_message(b"\x08\x02"))
    data += frame(HEADERS, END_HEADERS, 3, hpack.Encoder().encode([*headers, meta]))
    data += frame(DATA, END_STREAM, 1, grpc_message(b"\x08\x03"))

    def ended(received: Received) -> bool:
        return any(
            isinstance(f, HeadersFrame) and f.stream_id == 1 and "END_STREAM" in f.flags
            for f in received.frames
        )

    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + data)
        received = await sock.read(ended)
        assert not received.closed
    frames = received.frames
    resets = [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]
    assert resets == [(3, ErrorCodes.PROTOCOL_ERROR)]
    answered = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == 1)
    assert sums_of(Reply(data=answered).messages) == [2, 5]  # stream 1 carried on
    assert received.goaway() is None
    assert not [r for r in caplog.records if r.levelno > logging.INFO], caplog.text
    await assert_serving(client, number_server)


# 3. HTTP/2 garbage on a raw socket.


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n",  # the preface, one digit wrong
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's start
        random.Random(7).randbytes(64),
    ],
    ids=["http1", "near-preface", "tls", "random"],
)
async def test_bad_connection_preface_is_closed(
    number_server: RunningServer, client: NumberClient, garbage: bytes
) -> None:
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(garbage)
        received = await sock.read()
    assert received.closed
    *setup, last = received.frame_types()
    assert set(setup) <= {"SettingsFrame", "WindowUpdateFrame"}  # its own set-up first
    assert last == "GoAwayFrame"
    goaway = received.goaway()
    assert goaway is not None
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.PROTOCOL_ERROR, 0)
    assert goaway.additional_data == b"Invalid HTTP/2 preamble."
    await assert_serving(client, number_server)


def assert_goaway(received: Received, code: ErrorCodes, reason: str) -> GoAwayFrame:
    """The server sent a GOAWAY with ``code``, ``reason`` in its debug data, and closed."""
    assert received.closed, received.frame_types()
    goaway = received.goaway()
    assert goaway is not None, received.frame_types()
    assert goaway.error_code == code, goaway
    assert reason in goaway.additional_data.decode(), goaway.additional_data
    return goaway


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_bytes_after_preface_are_refused_at_the_frame_header(
    number_server: RunningServer, client: NumberClient, seed: int
) -> None:
    """Random bytes read as a frame header announcing megabytes, over the 16 KiB
    SETTINGS_MAX_FRAME_SIZE: refused at once, without waiting for the body."""
    garbage = random.Random(seed).randbytes(4096)
    assert int.from_bytes(garbage[:3]) > 16384 + len(garbage)
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + garbage)
        received = await sock.read()
    assert_goaway(received, ErrorCodes.FRAME_SIZE_ERROR, "over SETTINGS_MAX_FRAME_SIZE 16384")
    await assert_serving(client, number_server)


async def test_oversized_frame_is_refused_at_its_header(
    number_server: RunningServer, client: NumberClient
) -> None:
    """h2 alone buffers a frame whole before it checks its length (1 MiB here): the
    server refuses it from its 9-byte header, with a GOAWAY FRAME_SIZE_ERROR."""
    body = bytes(1 << 20)  # 1 MiB: 64 times SETTINGS_MAX_FRAME_SIZE
    oversized = frame_header(len(body), DATA, 0, 1) + body
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + oversized[:9])
        received = await sock.read()
    assert_goaway(received, ErrorCodes.FRAME_SIZE_ERROR, "a frame of 1048576 bytes")
    await assert_serving(client, number_server)


async def test_truncated_frame_then_close(
    number_server: RunningServer, client: NumberClient
) -> None:
    headers = frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(request_headers(ACCUMULATE)))
    async with await RawSocket.connect(number_server.port) as sock:
        await sock.send(PREFACE + SETTINGS_FRAME + headers[:14])
        received = await sock.read(timeout=QUIET)
        assert not received.closed  # waiting for the rest of the frame
        assert received.settings_acked()  # the frames before it were read
        await sock.send(b"", eof=True)
        received = await sock.read()
    assert received.closed
    assert only_settings(received)
    assert not number_server.instance.streams.live()  # no stream was ever started
    await assert_serving(client, number_server)


async def test_unknown_frame_type_is_ignored(
    number_server: RunningServer, client: NumberClient, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9113 section 5.5: unknown frame types MUST be ignored. grpclib 0.4.9 has
    no handler for h2's UnknownFrameReceived: it dropped the connection (with an
    asyncio "Fatal error" traceback), cutting the streams in flight on it."""
    async with await H2Client.connect(number_server.port) as h2:
        stream_id = h2.open_stream()
        h2.send_data(stream_id, grpc_message(b"\x08\x03"))
        await h2.flush()
        await h2.read_until(lambda: h2.replies[stream_id].data != b"")
        await h2.sock.send(frame(0xF0, 0, 0, b"an extension"))
        h2.send_data(stream_id, grpc_message(b"\x08\x04"), end_stream=True)
        reply = await h2.reply(stream_id)
    assert sums_of(reply.messages) == [3, 7]
    assert reply.grpc_status == Status.OK.value
    assert h2.goaway is None
    assert not [r for r in caplog.records if r.levelno > logging.INFO], caplog.text
    await assert_serving(client, number_server)


async def test_ping_flood_is_cut_after_three_pings(
    number_server: RunningServer, client: NumberClient
) -> None:
    """grpc-go's ping policy: a PING sooner than --min-ping-interval (300 s) after the
    last one, with no data sent in between, is a strike; the third strike closes the
    connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings". (Before: all 10,000
    were answered.)"""
    async with await H2Client.connect(number_server.port) as h2:
        for n in range(10_000):
            h2.ping(n)
        await h2.until_pings_acked(10_000, timeout=TIMEOUT)
    assert h2.goaway is not None
    assert h2.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert h2.goaway.additional_data is not None
    assert b"too_many_pings" in h2.goaway.additional_data
    assert h2.pings_acked == 3
    await assert_serving(client, number_server)


async def test_pings_between_answers_are_fine(
    number_server: RunningServer, client: NumberClient
) -> None:
    """Data sent by the server resets the strikes: a client that pings after each
    answer (a BDP probe does) is never cut."""
    async with await H2Client.connect(number_server.port) as h2:
        for n in range(20):
            h2.ping(n)
            reply = await h2.call(b"\x08\x05")
            assert sums_of(reply.messages) == [5]
        await h2.until_pings_acked(20)
        assert h2.goaway is None
        assert h2.pings_acked == 20


@pytest.mark.parametrize("with_data", [False, True], ids=["headers-rst", "headers-data-rst"])
async def test_rapid_reset_is_cut(
    number_server: RunningServer, client: NumberClient, with_data: bool
) -> None:
    """CVE-2023-44487: open a stream and reset it at once, 2,000 times on one
    connection. Past --max-resets (100) streams reset before they were answered, the
    server closes the connection with GOAWAY ENHANCE_YOUR_CALM, ends every handler,
    and still serves others. (Before: all 2,000 were accepted.)"""
    async with await H2Client.connect(number_server.port) as h2:
        for _ in range(2_000):
            stream_id = h2.open_stream()
            if with_data:
                h2.send_data(stream_id, grpc_message(b"\x08\x01"))
            h2.reset(stream_id)
        await h2.read_until(lambda: h2.goaway is not None)
    assert h2.goaway is not None
    assert h2.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert h2.goaway.additional_data is not None
    assert b"--max-resets 100" in h2.goaway.additional_data
    # The GOAWAY names the last stream the server took: the 101st reset's, 201.
    assert h2.goaway.last_stream_id == 201
    await eventually(lambda: not number_server.instance.streams.live(), timeout=TIMEOUT)
    await assert_serving(client, number_server)


# 4. A bounded fuzzer: sequences of HTTP/2 frames, valid-looking and mutated.


client_ids = st.sampled_from([1, 3, 5, 7])  # streams a client may open, in any order
stream_ids = st.one_of(client_ids, client_ids, st.sampled_from([0, 2]), st.integers(0, 2**32 - 1))
u32s = st.one_of(st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
u32 = struct.Struct(">I").pack
int32s = st.integers(INT32_MIN, INT32_MAX)


@st.composite
def valid_looking_frames(draw: st.DrawFn) -> bytes:
    """One frame of a known type, with a payload shaped as that type expects."""
    stream_id = draw(stream_ids)
    kind = draw(st.sampled_from(["headers", "data", "rst", "settings", "ping", "window", "other"]))
    if kind == "headers":
        path = draw(st.sampled_from([ACCUMULATE, "/tutorial.NumberService/X", "/x"]))
        # A fresh encoder refers to the static table only, so the block is
        # valid whatever blocks came before it.
        block = hpack.Encoder().encode(request_headers(path))
        flags = draw(st.sampled_from([END_HEADERS, END_HEADERS | END_STREAM, 0]))
        return frame(HEADERS, flags, stream_id, block)
    if kind == "data":
        body = draw(st.one_of(int32s.map(encode_int32_field), st.binary(max_size=12)))
        lie = draw(st.one_of(st.none(), st.integers(0, 64)))
        flags = draw(st.sampled_from([0, END_STREAM]))
        return frame(DATA, flags, stream_id, grpc_message(body, length=lie))
    if kind == "rst":
        return frame(RST_STREAM, 0, stream_id, u32(draw(st.integers(0, 14) | u32s)))
    if kind == "settings":
        pairs = draw(st.lists(st.tuples(st.integers(0, 8), u32s), max_size=3))
        flags = draw(st.sampled_from([0, 0, ACK]))
        payload = b"".join(struct.pack(">HI", key, value) for key, value in pairs)
        return frame(SETTINGS, flags, draw(st.sampled_from([0, stream_id])), payload)
    if kind == "ping":
        flags = draw(st.sampled_from([0, ACK]))
        return frame(
            PING,
            flags,
            draw(st.sampled_from([0, stream_id])),
            draw(st.binary(min_size=8, max_size=8)),
        )
    if kind == "window":
        return frame(WINDOW_UPDATE, 0, stream_id, u32(draw(u32s)))
    frame_type = draw(st.sampled_from([PRIORITY, GOAWAY, CONTINUATION, PUSH_PROMISE]))
    payload = u32(draw(u32s)) + u32(draw(u32s)) + draw(st.binary(max_size=8))
    return frame(frame_type, draw(st.integers(0, 255)), stream_id, payload)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """Any type, flags, stream id and payload; the length field true or a small lie."""
    frame_type = draw(st.integers(0, 9) | st.integers(0, 255))
    payload = draw(st.binary(max_size=32))
    length = max(0, len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1, -9])))
    header = frame_header(length, frame_type, draw(st.integers(0, 255)), draw(stream_ids))
    return header + payload


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> bytes:
    """A frame with one byte flipped, or cut short."""
    data = bytearray(draw(frames))
    at = draw(st.integers(0, len(data) - 1))
    if draw(st.booleans()):
        data[at] ^= draw(st.integers(1, 255))
        return bytes(data)
    return bytes(data[:at])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A well-formed AccumulateNumbers stream: HEADERS, messages, perhaps the end."""
    stream_id = draw(client_ids)
    block = hpack.Encoder().encode(request_headers(ACCUMULATE))
    numbers = draw(st.lists(int32s, max_size=4))
    data = b"".join(grpc_message(encode_int32_field(n)) for n in numbers)
    flags = draw(st.sampled_from([0, END_STREAM]))
    return frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, flags, stream_id, data)


# Mostly frames that look right, so that sequences get past the first few frames.
frame_sequences = st.lists(
    st.one_of(
        requests(),
        valid_looking_frames(),
        valid_looking_frames(),
        raw_frames(),
        mutated(valid_looking_frames()),
    ),
    min_size=1,
    max_size=8,
)


@dataclass
class ThreadServer:
    """A NumberService server on its own event loop in a background thread."""

    port: int
    instance: Serving
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    errors: list[logging.LogRecord] = field(default_factory=list)
    started: int = 0  # streams that reached the service

    def __post_init__(self) -> None:
        self.instance.streams.on_start.append(self._count)

    def _count(self, record: StreamRecord) -> None:
        self.started += 1

    async def wait_until_no_stream_in_flight(self) -> None:
        """Like :func:`eventually`, asking the server's own loop each time."""

        async def in_flight() -> int:
            return len(self.instance.streams.live())

        for _ in range(int(TIMEOUT / 0.01)):
            ask = asyncio.run_coroutine_threadsafe(in_flight(), self.loop)
            if not await asyncio.wait_for(asyncio.wrap_future(ask), TIMEOUT):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"streams still in flight after {TIMEOUT} s")


class _ServerErrors(logging.Handler):
    """Collects ERROR records logged on the server's thread."""

    def __init__(self, server: ThreadServer) -> None:
        super().__init__(logging.ERROR)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.server.thread.ident:
            self.server.errors.append(record)


@pytest.fixture(scope="module")
def thread_server() -> Iterator[ThreadServer]:
    """A server for all the fuzzer's examples, each of which runs its own loop.

    On its own thread, it logs each error as it happens, on that thread: an
    example can tell which errors it caused, and hypothesis shrinks to the frames
    that cause one. (number_server is bound to one test's loop; hypothesis runs
    the examples of a sync test, so they cannot share that loop.)"""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-server", daemon=True)
    thread.start()

    async def start() -> tuple[Serving, int]:
        sock = bind(HOST, 0)
        instance = build_server()
        await instance.start(sock)
        return instance, address_of(sock)[1]

    try:
        instance, port = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
        server = ThreadServer(port, instance, loop, thread)
        handler = _ServerErrors(server)
        logging.getLogger().addHandler(handler)
        try:
            yield server
        finally:
            logging.getLogger().removeHandler(handler)
            shutdown = instance.shutdown(grace=0)
            asyncio.run_coroutine_threadsafe(shutdown, loop).result(TIMEOUT)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the fuzzed server's loop did not stop"
        loop.close()


def _error(record: logging.LogRecord) -> BaseException | None:
    return record.exc_info[1] if record.exc_info else None


def unexpected_errors(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The server's errors: all of them. grpclib 0.4.9 logged some for bad input, which
    this filtered out until the serving layer fixed them: an unknown frame type
    ("Fatal error: protocol.data_received() call failed", NotImplementedError), the
    "Application error"s of handlers on the streams it cut, a request without
    :method or :path ("Server error", KeyError)."""
    return list(records)


SENTINEL = b"sentinel"


async def send_frames(port: int, data: bytes) -> str:
    """Send ``data`` and a PING on a fresh connection; then leave. How did it go?"""
    async with await RawSocket.connect(port) as sock:
        await sock.send(data + frame(PING, 0, 0, SENTINEL))
        received = await sock.read(lambda r: r.ping_acked(SENTINEL), timeout=QUIET)
        if received.closed:
            outcome = "closed by the server"
        elif received.ping_acked(SENTINEL):
            outcome = "answered"
        else:
            outcome = "waiting for more"
        await sock.send(b"", eof=True)
        assert (await sock.read()).closed, "the connection outlived the client"
    return outcome


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=frame_sequences, settings_first=st.booleans())
def test_fuzzed_frames_leave_the_server_serving(
    thread_server: ThreadServer, frames: list[bytes], settings_first: bool
) -> None:
    """Whatever frames a client sends after the preface, the server answers, closes
    or waits; it closes once the client leaves, ends every stream, logs no error
    beyond the known ones, and still serves a fresh client."""
    data = PREFACE + (SETTINGS_FRAME if settings_first else b"") + b"".join(frames)
    note(f"sent after the preface: {data[len(PREFACE) :]!r}")
    thread_server.errors.clear()
    started = thread_server.started

    async def example() -> None:
        event(await send_frames(thread_server.port, data))
        async with NumberClient(HOST, thread_server.port) as client:
            await assert_serving(client)
        await thread_server.wait_until_no_stream_in_flight()

    asyncio.run(example())
    if thread_server.started > started + 1:  # more than assert_serving's own stream
        event("a fuzzed stream reached the service")
    unexpected = unexpected_errors(thread_server.errors)
    assert not unexpected, [logging.Formatter().format(r) for r in unexpected]
