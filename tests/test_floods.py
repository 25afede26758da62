"""HTTP/2 flood defences (issue #13): one hostile connection must not take the server down.

Three parts:

1. every attack of ``benchmarks/floods.py`` (the advisories of the issue) against a
   real ``number-service serve``, from a raw HTTP/2 attacker that connects again
   whenever it is cut, with a lock-step NumberClient on another connection all
   along: the attacker is cut within the documented bound, the bystander keeps
   getting right sums, RSS stays within 16 MiB and comes back, and the log has no
   traceback, nothing above WARNING and exactly one WARNING per connection cut,
   naming the attacker and the limit. Nothing here is timed strictly: the strict
   figures (half the quiet rate, p99 under 10 ms) are the benchmark's, and a tiny
   run of it is the last test of this part;
2. the accounting itself, sans I/O (``grpclib_ext/floods.py``): each limit's edge;
3. what a flood could leave behind, budgets of buffered request bytes, and the
   flags and environment variables of every limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import subprocess
import sys
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from grpclib.const import Status
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from polling import eventually
from processes import ServerProcess, reap, start_server
from rawh2 import H2Client, grpc_message
from test_faults import rss, steady_rss
from test_limits import ext_serving

from benchmarks.floods import ATTACKS, Attack, Attacked, attack_for, frame
from number_service import NumberClient, build_server, cli, server
from number_service.codec import encode_int32_field as num
from number_service.serving import logs
from number_service.serving.grpclib_ext import Server
from number_service.serving.grpclib_ext.floods import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    FloodLimits,
    FrameAccounting,
)
from number_service.serving.limits import Limits

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
HOST = "127.0.0.1"
TIMEOUT = 10.0
SECONDS = 1.5  # of attack, per flood
RSS_GROWTH = 16 * MiB  # at most, during an attack (the bound)
RSS_LEFT = 4 * MiB  # at most, once the attack is over
ADD_TIMEOUT = 5.0  # seconds one bystander add may take: generous, the machine is shared
AFTER = re.compile(r"after (\d+) frames")


# --- 1. every flood against a real server ------------------------------------------------


@pytest.fixture(scope="module")
def serve() -> Iterator[ServerProcess]:
    """One ``number-service serve`` for the floods, logging JSON at info, without the
    cool-down: each attack's bystander connects after the attack before it, from the
    same address, and every attacker connection is to meet the limit itself (the
    cool-down has tests of its own below, and the benchmark runs with it)."""
    srv = start_server(0, "--log-format", "json", "--flood-cooldown", "0")
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        reap(srv.proc)


@dataclass
class Bystander:
    """A lock-step NumberClient session on its own connection, every sum checked."""

    port: int
    answered: int = 0
    slowest: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        client = NumberClient(HOST, self.port, timeout=60)
        async with client, client.session() as session:
            total = 0
            n = 0
            while not self.stop.is_set():
                n += 1
                total += n
                started = asyncio.get_running_loop().time()
                got = await asyncio.wait_for(session.add(n), ADD_TIMEOUT)
                self.slowest = max(self.slowest, asyncio.get_running_loop().time() - started)
                assert got == total, f"bystander: sum {got}, want {total}"
                self.answered += 1


async def _peak_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss(pid))
        await asyncio.sleep(0.02)


async def flood(srv: ServerProcess, attack: Attack) -> tuple[Attacked, Bystander, list[int]]:
    """Attack for SECONDS with a bystander alongside: what the attacker did, the
    bystander, and the server's RSS before, at its peak and after."""
    before = await steady_rss(srv.proc.pid)
    bystander = Bystander(srv.port)
    watching = asyncio.create_task(bystander.run())
    peak, stop = [before], asyncio.Event()
    sampling = asyncio.create_task(_peak_rss(srv.proc.pid, peak, stop))
    await eventually(lambda: bystander.answered > 0 or watching.done(), TIMEOUT)
    try:
        attacked = await attack_for(srv.port, attack, SECONDS)
    finally:
        bystander.stop.set()
        stop.set()
        await asyncio.wait_for(watching, TIMEOUT)  # raises what the bystander met
        await sampling
    after = await steady_rss(srv.proc.pid)
    return attacked, bystander, [before, peak[0], after]


def records(lines: list[str]) -> list[dict[str, Any]]:
    """The server's JSON log lines (a line that is not JSON is kept as its text)."""
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"level": "NOT JSON", "message": line})
    return out


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_flood_is_cut_and_others_are_served(serve: ServerProcess, name: str) -> None:
    attack = ATTACKS[name]
    serve.stderr.drain()
    attacked, bystander, (before, peak, after) = await flood(serve, attack)
    await asyncio.sleep(0.3)  # the last lines are out
    logged = records(serve.stderr.drain())
    figures = (
        f"{name}: {attacked.connections} connections, {attacked.cut} cut, "
        f"{attacked.frames_sent} frames written, {attacked.answers} answers read; "
        f"bystander {bystander.answered} answers, "
        f"slowest {bystander.slowest * 1000:.0f} ms; RSS {before / MiB:.1f} / "
        f"{peak / MiB:.1f} / {after / MiB:.1f} MiB"
    )
    print("\n" + figures)
    assert bystander.answered >= 20, figures
    assert peak - before <= RSS_GROWTH, figures
    assert after - before <= RSS_LEFT, figures
    loud = [r for r in logged if r.get("level") not in ("DEBUG", "INFO", "WARNING")]
    assert not loud, loud[:3]
    assert not [r for r in logged if "Traceback" in json.dumps(r)], logged[:3]
    warnings = [r for r in logged if r.get("level") == "WARNING"]
    if attack.limit is None:  # held by flow control and budgets, not cut
        assert not warnings, warnings[:3]
        if name == "pipelined":  # the heavy client is served too, not just the bystander
            assert attacked.answers >= 1000, (figures, attacked.answers)
            assert attacked.cpu_s > 0, attacked
        return
    assert attacked.cut >= max(1, attacked.connections - 1), figures  # the last may be unfinished
    assert attacked.cut <= len(warnings) <= attacked.connections, (figures, warnings[:3])
    for record in warnings:
        message = str(record["message"])
        assert message.startswith("closed the connection from "), message
        assert record["peer"] in attacked.peers, (record, attacked.peers[:3])
        assert attack.limit in message, message
        match = AFTER.search(message)
        assert match is not None, message
        assert attack.bound is not None
        assert int(match.group(1)) <= attack.bound, message
    # One per connection: a source port may come again once its connection is closed,
    # so a peer is warned of no more often than it connected.
    connected, warned = Counter(attacked.peers), Counter(r["peer"] for r in warnings)
    assert all(warned[peer] <= connected[peer] for peer in warned), (warned, connected)
    if attack.reads:  # it read the GOAWAY that says why
        assert attacked.goaways, figures
        for code, debug in attacked.goaways:
            assert code == ErrorCodes.ENHANCE_YOUR_CALM, (code, debug)
            assert attack.limit in debug, debug


def test_benchmark_runs_tiny() -> None:
    """benchmarks/floods.py, tiny: two attacks, both servers, the Python bystander and
    no timing criteria; it passes and prints its table."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.floods",
            *("--seconds", "0.4", "--attacks", "ping,rapid-reset"),
            *("--servers", "ours,grpc.aio", "--bystander", "python", "--no-timing"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    print("\n" + result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    ours = {row[1]: row for row in rows if row[:1] == ["ours"]}
    assert set(ours) == {"ping", "rapid-reset"}, result.stdout
    assert all(row[-1] == "ok" for row in ours.values()), result.stdout
    assert {row[1] for row in rows if row[:1] == ["grpc.aio"]} == {"ping", "rapid-reset"}
    assert result.stdout.rstrip().endswith("PASS"), result.stdout


# --- 2. the accounting, sans I/O ----------------------------------------------------------


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = frame(HEADERS, END_HEADERS, 1, b"\x83\x86")  # the block is not read here


def accounting(**limits: Any) -> FrameAccounting:
    counting = FrameAccounting(FloodLimits(**limits))
    assert counting.received(PREFACE).end == len(PREFACE)
    return counting


def verdict_at(counting: FrameAccounting, frames: list[bytes]) -> int | None:
    """The index of the frame that broke a limit, or None; one frame per call."""
    for i, one in enumerate(frames):
        take = counting.received(one)
        if take.verdict is not None:
            assert take.end < len(one)  # the frame that breaks the limit is not handed on
            return i
        assert take.end == len(one)
    return None


@pytest.mark.parametrize(
    ("limits", "frames", "cut_at"),
    [
        # Two empty DATA frames in a row: the second is one too many.
        ({"max_empty_frames": 1}, [REQUEST, frame(DATA, 0, 1), frame(DATA, 0, 1)], 2),
        # A frame with a payload in between starts the count again; END_STREAM is not empty.
        (
            {"max_empty_frames": 1},
            [REQUEST, frame(DATA, 0, 1), frame(DATA, 0, 1, b"x"), frame(DATA, 0, 1)]
            + [frame(DATA, END_STREAM, 1)] * 3,
            None,
        ),
        (
            {"max_empty_frames": 1},
            [frame(HEADERS, 0, 1, b"\x83")] + [frame(CONTINUATION, 0, 1)] * 2,
            2,
        ),
        # PRIORITY: 2 per stream opened, plus one stream's worth.
        ({"max_priority_frames": 2}, [REQUEST] + [frame(PRIORITY, 0, 3, bytes(5))] * 5, 5),
        # WINDOW_UPDATE: 5 + 2 x streams opened, with no DATA sent.
        ({"max_window_updates": 10}, [REQUEST] + [frame(WINDOW_UPDATE, 0, 0, bytes(4))] * 8, 8),
        # SETTINGS: 3 with no data sent.
        ({"max_settings": 3}, [frame(SETTINGS, 0, 0)] * 4, 3),
        ({"max_settings": 3}, [frame(SETTINGS, 1, 0)] * 10, None),  # ACKs do not count
        # PING: the third strike (the fourth PING within the interval).
        ({"min_ping_interval": 300.0}, [frame(PING, 0, 0, bytes(8))] * 4, 3),
        ({"min_ping_interval": 300.0}, [frame(PING, 1, 0, bytes(8))] * 10, None),  # ACKs
        # Resets: 2 allowed, cut once over 2 and over half the streams opened.
        (
            {"max_resets": 2},
            [
                frame(HEADERS, END_HEADERS, sid, b"\x83") + frame(RST_STREAM, 0, sid, bytes(4))
                for sid in (1, 3, 5)
            ],
            2,
        ),
        # ... and the same stream reset again is one reset.
        ({"max_resets": 2}, [REQUEST] + [frame(RST_STREAM, 0, 1, bytes(4))] * 5, None),
    ],
    ids=[
        "empty-data",
        "empty-data-interrupted",
        "empty-continuation",
        "priority",
        "window-update",
        "settings",
        "settings-acks",
        "ping",
        "ping-acks",
        "resets",
        "same-stream-reset",
    ],
)
def test_each_limit_cuts_one_frame_past_it(
    limits: dict[str, Any], frames: list[bytes], cut_at: int | None
) -> None:
    counting = accounting(**limits)
    at = verdict_at(counting, frames)
    assert at == cut_at
    if cut_at is not None:
        assert counting.verdict is not None
        assert counting.verdict.code is ErrorCodes.ENHANCE_YOUR_CALM


def test_data_sent_resets_ping_strikes_and_settings_and_allows_window_updates() -> None:
    counting = accounting(min_ping_interval=300.0, max_settings=1, max_window_updates=1)
    ping, settings = frame(PING, 0, 0, bytes(8)), frame(SETTINGS, 0, 0)
    assert verdict_at(counting, [REQUEST, ping, ping, ping, settings]) is None
    counting.sent(frame(HEADERS, END_HEADERS, 1, b"\x88") + frame(DATA, 0, 1, b"1234"))
    assert verdict_at(counting, [ping, ping, ping, settings]) is None  # strikes back to 0
    # 5 + 2 x (1 stream + 1 x 1 DATA frame sent) = 9 WINDOW_UPDATEs
    assert verdict_at(counting, [frame(WINDOW_UPDATE, 0, 0, bytes(4))] * 10) == 9


def test_a_stream_answered_is_not_a_reset_before_its_answer() -> None:
    counting = accounting(max_resets=1)
    opened = [frame(HEADERS, END_HEADERS, sid, b"\x83") for sid in (1, 3, 5, 7)]
    assert verdict_at(counting, opened) is None
    for sid in (1, 3, 5):  # answered, then cancelled by the client: fine
        counting.sent(frame(HEADERS, END_HEADERS, sid, b"\x88"))
    assert verdict_at(counting, [frame(RST_STREAM, 0, sid, bytes(4)) for sid in (1, 3, 5)]) is None
    assert counting.resets == 0
    # The server refusing streams counts, from what it writes.
    assert counting.sent(frame(RST_STREAM, 0, 7, bytes(4))) is None
    assert counting.resets == 1
    more = [frame(HEADERS, END_HEADERS, 9, b"\x83")]
    assert verdict_at(counting, more) is None
    verdict = counting.sent(frame(RST_STREAM, 0, 9, bytes(4)))
    assert verdict is None  # 2 resets of 5 streams: not over half
    assert counting.resets == 2


def test_queued_control_frames_count_only_while_the_socket_holds_bytes() -> None:
    counting = accounting(max_queued_control_frames=3)
    ack = frame(PING, 1, 0, bytes(8))
    for _ in range(10):
        assert counting.sent(ack * 2, unsent=0) is None  # the client reads
    assert counting.sent(ack * 3, unsent=100) is None
    verdict = counting.sent(ack, unsent=117)
    assert verdict is not None
    assert "--max-queued-control-frames 3" in verdict.reason


def test_slices_hold_a_bounded_number_of_frames_headers_counting_more() -> None:
    counting = accounting(frames_per_turn=100)
    data = frame(DATA, 0, 1, b"x") * 250
    take = counting.received(data)
    assert (take.end, take.more) == (100 * 10, True)
    take = counting.received(data[take.end :])
    assert (take.end, take.more) == (100 * 10, True)
    take = counting.received(data[2000:])
    assert (take.end, take.more) == (50 * 10, False)
    headers = b"".join(frame(HEADERS, END_HEADERS, sid, b"\x83") for sid in range(1, 200, 2))
    take = counting.received(headers)
    assert take.end == 25 * len(frame(HEADERS, END_HEADERS, 1, b"\x83"))  # 4 each


def test_a_partial_frame_waits_and_an_oversized_one_is_refused_at_its_header() -> None:
    counting = accounting()
    whole = frame(DATA, 0, 1, b"12345")
    assert counting.received(whole[:12]).end == 0  # waits for the rest
    assert counting.received(whole).end == len(whole)
    take = counting.received(frame(DATA, 0, 1, bytes(20_000))[:9])
    assert take.verdict is not None
    assert take.verdict.code is ErrorCodes.FRAME_SIZE_ERROR


def test_outbound_frames_cut_across_writes_are_followed() -> None:
    counting = accounting()
    counting.received(frame(HEADERS, END_HEADERS, 1, b"\x83"))
    out = frame(DATA, 0, 1, b"x" * 100) + frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x88")
    for cut in (5, 50, 112):
        assert counting.sent(out[:cut]) is None
        assert counting.sent(out[cut:]) is None
    assert counting.data_sent == 3


# --- 3. nothing retained, budgets, flags ---------------------------------------------------


@pytest.fixture
async def in_process() -> AsyncIterator[tuple[Server, int]]:
    async with ext_serving() as running:
        yield running


async def test_reset_and_refused_streams_leave_nothing_behind(
    in_process: tuple[Server, int],
) -> None:
    """Streams opened and reset (90 per connection, under --max-resets), with a
    message each, on 10 connections: afterwards no task is kept, h2 remembers at most
    1,024 closed streams per connection, and Python holds < 512 B per stream more
    (it was ~9 KB: grpclib kept cancelled tasks, their tracebacks, the streams)."""
    grpclib_server, port = in_process

    async def resets(count: int) -> None:
        async with await H2Client.connect(port) as h2:
            for _ in range(count):
                stream_id = h2.open_stream()
                h2.send_data(stream_id, grpc_message(num(1)))
                await h2.flush()
                await asyncio.sleep(0)  # one by one: each reaches the handler
                h2.reset(stream_id)
            h2.ping(0)
            await h2.until_pings_acked(1)
            assert h2.goaway is None

    await resets(90)  # warm up: every code path taken once
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            await resets(90)
        await asyncio.sleep(0.2)
        for _ in range(grpclib_server.__gc_interval__):  # grpclib's sweep of handlers
            async with await H2Client.connect(port):
                pass
        await asyncio.sleep(0.2)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    for handler in grpclib_server._handlers:
        assert not handler._tasks
        assert not handler._cancelled
    per_stream = (after - before) / 900
    print(f"\nretained per reset stream: {per_stream:.0f} B")
    assert per_stream < 512, per_stream


async def test_h2_remembers_a_bounded_number_of_closed_streams(
    in_process: tuple[Server, int],
) -> None:
    _, port = in_process
    async with NumberClient(HOST, port, timeout=TIMEOUT) as client:
        for n in range(1200):
            assert [s async for s in client.accumulate([n])] == [n]
        (connection,) = in_process[0].connections.live
        h2 = connection.connection._connection
        assert len(h2._closed_streams) <= 1024


@pytest.mark.parametrize("config", ["defaults", "4MiB-messages"])
async def test_partial_messages_are_bounded_and_freed(config: str) -> None:
    """The review's attack: 100 streams on a connection, each sending the first 4 MiB
    of a 4 MiB message it never finishes, 13 connections in a row. Before: 36 -> 440
    MiB for one connection, 549 MiB after 13, held after they closed.

    With NumberService's defaults each stream ends with RESOURCE_EXHAUSTED at its
    length prefix (over 1 KiB) and RSS stays within 16 MiB. With 4 MiB messages
    allowed (--max-message-size) and a 4 MiB budget per connection, the streams past
    the budget end with RESOURCE_EXHAUSTED naming --max-connection-buffer; what the
    server holds is then the budget plus what flow control lets in (4 MiB per
    connection): RSS grows by 20-25 MiB (the C heap keeps ~2 bytes for each byte of
    16 KiB buffers that h2 and grpclib copy), not with the number of connections;
    the C heap may keep most of it once they close, despite glibc's malloc_trim."""
    args = ["--max-message-size", str(4 * MiB), "--max-connection-buffer", str(4 * MiB)]
    srv = start_server(0, *(args if config == "4MiB-messages" else []))
    try:
        before = await steady_rss(srv.proc.pid)
        peak = before
        peaks: list[int] = []
        messages: set[str] = set()
        statuses: dict[int, int] = {}
        for _ in range(13):
            async with await H2Client.connect(srv.port) as h2:
                streams = []
                for _ in range(100):
                    stream_id = h2.open_stream()
                    h2.send_data(stream_id, grpc_message(b"", length=4 * MiB))
                    streams.append(stream_id)
                for _ in range(15):  # send what the windows allow, reading answers
                    for stream_id in streams:
                        reply = h2.replies[stream_id]
                        if reply.ended or reply.reset is not None:
                            continue
                        with contextlib.suppress(H2Error):  # closed by the server
                            room = min(h2.conn.local_flow_control_window(stream_id), 16_384)
                            if room > 0:
                                h2.send_data(stream_id, bytes(room))
                    with contextlib.suppress(TimeoutError):
                        await h2.receive(timeout=0.05)
                    peak = max(peak, rss(srv.proc.pid))
                peaks.append(peak)
                for reply in h2.replies.values():
                    if reply.grpc_status is not None:
                        statuses[reply.grpc_status] = statuses.get(reply.grpc_status, 0) + 1
                        messages.add(str(reply.grpc_message))
        after = await steady_rss(srv.proc.pid)
    finally:
        assert srv.stop() == 0
    figures = (
        f"{config}: RSS {before / MiB:.1f} -> peak {peak / MiB:.1f} -> {after / MiB:.1f} MiB "
        f"(peak after 3 connections {peaks[2] / MiB:.1f}); statuses {statuses}"
    )
    print("\n" + figures)
    assert set(statuses) == {Status.RESOURCE_EXHAUSTED.value}, figures
    if config == "defaults":
        assert statuses[Status.RESOURCE_EXHAUSTED.value] == 1300, figures
        assert all("limit of 1024 bytes" in m for m in messages), messages
        assert peak - before <= RSS_GROWTH, figures
        assert after - before <= RSS_LEFT, figures
    else:
        assert statuses[Status.RESOURCE_EXHAUSTED.value] >= 13, figures
        assert all("--max-connection-buffer" in m for m in messages), messages
        # Budget and window, 8 MiB, twice over, plus the 16 MiB of the other floods; the
        # C heap keeps most of it after the connections close (seen: +21.5 MiB after,
        # +23.1 at the peak), so "after" is held to the same bound: not growing with
        # the connections is what this checks here, not coming back.
        assert peak - before <= 2 * (4 + 4) * MiB + RSS_GROWTH, figures
        assert after - before <= 2 * (4 + 4) * MiB + RSS_GROWTH, figures


async def test_a_budget_is_given_back_when_streams_end(in_process: tuple[Server, int]) -> None:
    grpclib_server, port = in_process
    async with await H2Client.connect(port) as h2:
        stream_id = h2.open_stream()
        h2.send_data(stream_id, grpc_message(b"\x08\x01\x08", length=900))  # a message begun
        h2.ping(1)
        await h2.until_pings_acked(1)
        await eventually(lambda: grpclib_server.budget.held > 0, TIMEOUT)
        h2.reset(stream_id)
        await h2.flush()
        await eventually(lambda: grpclib_server.budget.held == 0, TIMEOUT)


async def test_the_default_message_size_fits_numberservices_requests() -> None:
    """NumberService's default (1 KiB) takes its largest request (11 bytes), and
    --max-message-size still sets it; the serving layer's default stays gRPC's."""
    largest = num(-(2**31))
    assert len(largest) == 11
    assert len(largest) <= server.MAX_MESSAGE_SIZE
    assert server.default_limits().max_message_size == server.MAX_MESSAGE_SIZE == 1024
    assert build_server().limits.max_message_size == 1024
    assert server.ServeConfig().limits.max_message_size == 1024
    assert Limits().max_message_size == 4 * MiB


FLAGS = [
    # (flag, value, Limits field, what it becomes)
    ("--max-empty-frames", "3", "max_empty_frames", 3),
    ("--max-priority-frames", "7", "max_priority_frames", 7),
    ("--max-window-updates", "4", "max_window_updates", 4),
    ("--min-ping-interval", "2.5", "min_ping_interval", 2.5),
    ("--max-settings", "6", "max_settings", 6),
    ("--max-resets", "9", "max_resets", 9),
    ("--flood-cooldown", "2.5", "flood_cooldown", 2.5),
    ("--max-queued-control-frames", "50", "max_queued_control_frames", 50),
    ("--max-frames-per-turn", "20", "max_frames_per_turn", 20),
    ("--max-messages-per-turn", "8", "max_messages_per_turn", 8),
    ("--max-connection-buffer", "1000000", "max_connection_buffer", 1_000_000),
    ("--max-process-buffer", "9000000", "max_process_buffer", 9_000_000),
]


@pytest.mark.parametrize("how", ["flag", "environment", "zero", "default"])
def test_every_flood_limit_has_a_flag_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    seen: list[server.ServeConfig] = []

    async def serve(config: server.ServeConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setattr(logs, "configure", lambda *args: None)  # pytest's logging stays
    args = ["serve", "--port", "0"]
    env: dict[str, str] = {}
    for flag, text, _, _ in FLAGS:
        if how == "flag":
            args += [flag, text]
        elif how in ("environment", "zero"):
            variable = "NUMBER_SERVICE_" + flag.removeprefix("--").replace("-", "_").upper()
            env[variable] = "0" if how == "zero" else text
    result = CliRunner().invoke(cli.main, args, env=env)
    assert result.exit_code == 0, result.output
    (config,) = seen
    for _, _, name, value in FLAGS:
        want = {"zero": None, "default": getattr(Limits(), name)}.get(how, value)
        assert getattr(config.limits, name) == want, name


@pytest.mark.parametrize("name", [name for _, _, name, _ in FLAGS])
def test_flood_limits_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Limits(**{name: 0})


async def test_the_limit_flags_reach_a_real_server() -> None:
    """NUMBER_SERVICE_MAX_RESETS=5 and --max-empty-frames 3 on `serve`: the cuts come
    there, and the warning names each (no cool-down: the second connection comes
    straight after the first's cut)."""
    srv = start_server(
        0,
        "--max-empty-frames",
        "3",
        "--flood-cooldown",
        "0",
        env={"NUMBER_SERVICE_MAX_RESETS": "5"},
    )
    try:
        async with await H2Client.connect(srv.port) as h2:
            for _ in range(20):
                h2.reset(h2.open_stream())
            await h2.read_until(lambda: h2.goaway is not None)
        assert h2.goaway is not None
        assert b"6 streams reset" in (h2.goaway.additional_data or b"")
        await asyncio.to_thread(srv.stderr.wait_for, "--max-resets 5")
        async with await H2Client.connect(srv.port) as h2:
            stream_id = h2.open_stream()
            await h2.flush()
            await h2.sock.send(frame(DATA, 0, stream_id) * 10)
            await h2.read_until(lambda: h2.goaway is not None)
        assert h2.goaway is not None
        assert b"4 empty frames in a row (--max-empty-frames 3)" in (
            h2.goaway.additional_data or b""
        )
    finally:
        assert srv.stop() == 0
