"""The ceiling: what h2 alone costs a server per request and answer, in one process.

    python -m benchmarks.ceiling            # both measurements, a few seconds
    python -m benchmarks.ceiling --json

Two h2 connections, a client's and a server's, are wired back to back in memory (no
sockets, no asyncio, no grpclib, no protobuf): the bytes one's ``data_to_send()``
returns are the other's ``receive_data()``. The server side is configured as
grpclib's server configures h2 (its H2Configuration, its window sizes) and makes the
same h2 calls our server makes for each message, in the same order:

- per stream, once: the request HEADERS received; the response HEADERS sent with
  the first answer (grpclib's ``send_initial_metadata``);
- per request and answer (a *pair*): one DATA frame received (a 5-byte gRPC prefix
  and a 3-byte NumberRequest), its flow-control credit given back
  (``acknowledge_received_data``, which sends a WINDOW_UPDATE when h2's window
  manager decides to) and flushed, one DATA frame sent with the answer and flushed;
- per stream, at its end (``short`` only): the client's empty DATA with END_STREAM
  received, the trailers HEADERS sent with END_STREAM;
- ``pipelined``: every stream has a batch of requests in each read (as a client
  pipelining on many streams fills a socket read: by default all 100 a stream may
  have in flight); they are all received in one ``receive_data``, each stream's
  credit is given back once, and each stream's answers go out in one DATA frame, as
  our server's BatchingStream does at best.

Only the server's calls are timed (the client's h2 is driven by the same loop but
not counted), one frame per ``receive_data`` as under a lock-step client. So
``us_per_pair`` is the least CPU time any server built on h2 spends per message on
one core, and ``pairs_per_s`` the most messages per second it can answer;
``benchmarks.bench compare`` prints what fraction of it our server reaches.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass

from grpclib.config import Configuration
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, Event, RequestReceived, StreamEnded
from h2.settings import SettingCodes

REQUEST_HEADERS = [  # what grpc-go sends for AccumulateNumbers
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/tutorial.NumberService/AccumulateNumbers"),
    (":authority", "127.0.0.1:50051"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.33.1"),
    ("te", "trailers"),
]
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc+proto")]
TRAILERS = [("grpc-status", "0")]
REQUEST = b"\x00\x00\x00\x00\x03\x08\xe8\x07"  # NumberRequest(num=1000), gRPC-framed
ANSWER = b"\x00\x00\x00\x00\x03\x08\xd0\x0f"  # NumberResponse(sum=2000)


@dataclass
class Ceiling:
    """One measurement: the server's h2 time over ``pairs`` requests and answers."""

    kind: str  # "pairs": long-lived streams; "short": streams of `numbers` pairs;
    # "pipelined": long-lived streams, a batch of requests on each in every read
    streams: int
    pairs: int
    server_seconds: float
    us_per_pair: float
    pairs_per_s: float
    streams_per_s: float  # short: whole streams (open, pairs, close) per second
    per_stream: int  # short: pairs per stream


def server_h2(lean: bool = False) -> H2Connection:
    """An h2 server connection as grpclib's Server and H2Protocol set one up; ``lean``:
    with the serving layer's h2 fixes (grpclib_ext.lean.LeanH2Connection)."""
    config = Configuration()
    h2 = H2Connection(
        H2Configuration(
            client_side=False,
            header_encoding="ascii",
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    if lean:
        from number_service.serving.grpclib_ext.lean import LeanH2Connection

        h2.__class__ = LeanH2Connection
    h2.initiate_connection()
    initial = h2.local_settings.initial_window_size
    if config.http2_connection_window_size - initial:
        h2.increment_flow_control_window(config.http2_connection_window_size - initial)
    if config.http2_stream_window_size - initial:
        h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: config.http2_stream_window_size})
    return h2


class Pair:
    """A client and a server h2 connection, back to back; the server's time counted."""

    def __init__(self, lean: bool = False) -> None:
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding="ascii"))
        self.client.initiate_connection()
        self.server = server_h2(lean)
        self.spent = 0.0
        self.answers = 0  # answer DATA frames the client received, checked
        self.ended = 0  # streams the client saw end (the trailers)
        self._to_server(self.client.data_to_send())
        self._to_client(self.server.data_to_send())
        self._to_server(self.client.data_to_send())  # the SETTINGS ACKs

    def _to_server(self, data: bytes) -> list[Event]:
        """Hand the server what the client wrote; the server's work, timed."""
        server = self.server
        t0 = time.perf_counter()
        events = server.receive_data(data)
        out = server.data_to_send()
        for event in events:
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                # grpclib: Buffer ack -> Connection.ack -> acknowledge + flush
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                out += server.data_to_send()
        self.spent += time.perf_counter() - t0
        if out:
            self._to_client(out)
        return events

    def _to_client(self, data: bytes) -> None:
        client = self.client
        for event in client.receive_data(data):
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                count = len(event.data) // len(ANSWER)
                if not count or event.data != ANSWER * count:
                    raise AssertionError(f"the client got {event.data!r}, not answers")
                self.answers += count
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.ended += 1
        more = client.data_to_send()
        if more:
            self._to_server(more)

    def _send(self, stream_id: int, *, headers: bool = False, end: bool = False) -> None:
        """The server answers on ``stream_id`` (timed), as grpclib writes it."""
        server = self.server
        t0 = time.perf_counter()
        if headers:
            server.send_headers(stream_id, RESPONSE_HEADERS)
            out = server.data_to_send()
        else:
            out = b""
        if end:
            server.send_headers(stream_id, TRAILERS, end_stream=True)
        else:
            server.send_data(stream_id, ANSWER)
        out += server.data_to_send()
        self.spent += time.perf_counter() - t0
        self._to_client(out)

    def open(self) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, REQUEST_HEADERS)
        events = self._to_server(self.client.data_to_send())
        assert any(isinstance(e, RequestReceived) for e in events), events
        return stream_id

    def pair(self, stream_id: int, first: bool = False) -> None:
        self.client.send_data(stream_id, REQUEST)
        events = self._to_server(self.client.data_to_send())
        assert any(isinstance(e, DataReceived) for e in events), events
        self._send(stream_id, headers=first)

    def batch(self, stream_ids: list[int], size: int) -> None:
        """``size`` requests on each stream, all in one read; each stream's credit back
        at once and its ``size`` answers in one DATA frame (timed)."""
        client = self.client
        for stream_id in stream_ids:
            for _ in range(size):
                client.send_data(stream_id, REQUEST)
        data = client.data_to_send()
        server = self.server
        answers = ANSWER * size
        t0 = time.perf_counter()
        credit: dict[int, int] = {}
        for event in server.receive_data(data):
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                stream_id = event.stream_id
                credit[stream_id] = credit.get(stream_id, 0) + event.flow_controlled_length
        out = server.data_to_send()
        for stream_id, size_ in credit.items():
            server.acknowledge_received_data(size_, stream_id)
            server.send_data(stream_id, answers)
        out += server.data_to_send()
        self.spent += time.perf_counter() - t0
        if credit != dict.fromkeys(stream_ids, size * len(REQUEST)):
            raise AssertionError(f"request bytes received per stream: {credit}")
        self._to_client(out)

    def close(self, stream_id: int) -> None:
        self.client.end_stream(stream_id)
        events = self._to_server(self.client.data_to_send())
        assert any(isinstance(e, StreamEnded) for e in events), events
        self._send(stream_id, end=True)


def long_streams(streams: int = 100, pairs: int = 30_000, lean: bool = False) -> Ceiling:
    """``streams`` open streams on one connection taking turns, ``pairs`` in all."""
    pair = Pair(lean)
    ids = [pair.open() for _ in range(streams)]
    for stream_id in ids:
        pair.pair(stream_id, first=True)
    pair.spent = 0.0
    gc.collect()
    for k in range(pairs):
        pair.pair(ids[k % streams])
    if pair.answers != streams + pairs:
        raise AssertionError(f"{pair.answers} answers for {streams + pairs} requests")
    return _result("pairs", streams, pairs, pair.spent, 0, 0)


def pipelined_streams(
    streams: int = 100, size: int = 100, pairs: int = 100_000, lean: bool = False
) -> Ceiling:
    """``streams`` open streams on one connection, ``size`` requests on each in every
    read, about ``pairs`` in all. The defaults are the bench's pipelined-many load
    (100 streams, 100 requests in flight on each): no read can bring more, so no
    server answering it passes this figure."""
    pair = Pair(lean)
    # The client's connection window as grpc-go's grows it (BDP estimation, up to 16
    # MiB), so a read's answers on every stream fit in it.
    pair.client.increment_flow_control_window(2**24 - 65_535)
    pair._to_server(pair.client.data_to_send())
    ids = [pair.open() for _ in range(streams)]
    for stream_id in ids:
        pair.pair(stream_id, first=True)
    rounds = max(1, pairs // (streams * size))
    pair.spent = 0.0
    gc.collect()
    for _ in range(rounds):
        pair.batch(ids, size)
    done = rounds * streams * size
    if pair.answers != streams + done:
        raise AssertionError(f"{pair.answers} answers for {streams + done} requests")
    return _result("pipelined", streams, done, pair.spent, 0, size)


def short_streams(count: int = 4000, numbers: int = 5, lean: bool = False) -> Ceiling:
    """``count`` streams one after another: open, ``numbers`` pairs, close."""
    pair = Pair(lean)
    for _ in range(100):  # warm the HPACK tables and the code
        _short(pair, numbers)
    pair.spent = 0.0
    gc.collect()
    for _ in range(count):
        _short(pair, numbers)
    if (pair.answers, pair.ended) != ((count + 100) * numbers, count + 100):
        raise AssertionError(f"{pair.answers} answers, {pair.ended} streams ended")
    return _result("short", 1, count * numbers, pair.spent, count, numbers)


def _short(pair: Pair, numbers: int) -> None:
    stream_id = pair.open()
    for i in range(numbers):
        pair.pair(stream_id, first=not i)
    pair.close(stream_id)


def _result(
    kind: str, streams: int, pairs: int, spent: float, whole: int, per_stream: int
) -> Ceiling:
    return Ceiling(
        kind,
        streams,
        pairs,
        spent,
        spent / pairs * 1e6,
        pairs / spent,
        whole / spent if whole else 0.0,
        per_stream,
    )


def measure(scale: float = 1.0, lean: bool = False) -> dict[str, Ceiling]:
    """Every measurement; ``scale`` shortens them (tests); ``lean``: with our h2 fixes."""
    return {
        "pairs": long_streams(pairs=max(200, int(30_000 * scale)), lean=lean),
        "short": short_streams(count=max(20, int(4000 * scale)), lean=lean),
        "pipelined": pipelined_streams(pairs=max(10_000, int(100_000 * scale)), lean=lean),
    }


def describe(found: dict[str, Ceiling], lean: bool = False) -> str:
    long_, short, piped = found["pairs"], found["short"], found["pipelined"]
    fixes = ", with grpclib_ext.lean's h2 fixes" if lean else ""
    return (
        f"h2 alone (benchmarks/ceiling.py, server side, one core{fixes}): "
        f"{long_.us_per_pair:.1f} us per request+answer on {long_.streams} open streams "
        f"= {long_.pairs_per_s:,.0f} pairs/s; short streams of {short.per_stream} numbers: "
        f"{short.us_per_pair:.1f} us per pair = {short.streams_per_s:,.0f} streams/s; "
        f"{piped.streams} streams with {piped.per_stream} requests each per read, answered "
        f"in one DATA frame: {piped.us_per_pair:.1f} us per pair = "
        f"{piped.pairs_per_s:,.0f} pairs/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default work")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--lean", action="store_true", help="h2 with the serving layer's fixes (grpclib_ext.lean)"
    )
    args = parser.parse_args(argv)
    found = measure(args.scale, args.lean)
    if args.json:
        print(json.dumps({k: asdict(v) for k, v in found.items()}, indent=2))
    else:
        print(describe(found, args.lean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
