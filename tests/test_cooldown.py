"""The cool-down after a flood (issue #13): a cut attacker may not come straight back.

A connection cut for a flood starts a cool-down of its address: new connections from
it are refused at once, with SETTINGS and a GOAWAY ENHANCE_YOUR_CALM saying so, and
no warning each; its connections already open carry on. Sans I/O first
(``grpclib_ext/cooldown.py``), then against a real ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from typing import Any

import pytest
from h2.errors import ErrorCodes
from processes import ServerProcess, reap, start_server
from rawh2 import H2Client, RawSocket, frame
from test_limits import ext_serving

from benchmarks.floods import PREFACE, SETTINGS_FRAME
from number_service import NumberClient
from number_service.serving.grpclib_ext import Server, connections
from number_service.serving.grpclib_ext.cooldown import Cooldown, address_key
from number_service.serving.grpclib_ext.floods import RST_STREAM
from number_service.serving.limits import Limits

HOST = "127.0.0.1"
COOLDOWN = 0.5  # seconds of the real server's first cool-down
RESETS = 3  # --max-resets of the real server: the fourth reset cuts


# --- sans I/O ---------------------------------------------------------------------------


def test_each_cut_doubles_the_cooldown_up_to_the_cap() -> None:
    cooldown = Cooldown(1.0, cap=5.0, forget=100.0)
    lengths = [cooldown.strike("192.0.2.1", now) for now in (0.0, 10.0, 20.0, 30.0, 40.0)]
    assert lengths == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert cooldown.remaining("192.0.2.1", 40.0) == 5.0
    assert cooldown.remaining("192.0.2.1", 44.0) == pytest.approx(1.0)
    assert cooldown.remaining("192.0.2.1", 45.0) == 0.0
    assert cooldown.remaining("192.0.2.2", 40.0) == 0.0  # another address is not touched


def test_an_address_calm_for_forget_seconds_starts_afresh() -> None:
    cooldown = Cooldown(1.0, forget=60.0)
    assert cooldown.strike("192.0.2.1", 0.0) == 1.0
    assert cooldown.strike("192.0.2.1", 59.0) == 2.0
    assert cooldown.strike("192.0.2.1", 119.5) == 1.0  # 60.5 s after the last cut


def test_off_and_addressless_peers_never_cool_down() -> None:
    assert Cooldown(None).strike("192.0.2.1", 0.0) == 0.0
    assert Cooldown(None).remaining("192.0.2.1", 0.0) == 0.0
    cooldown = Cooldown(1.0)
    assert cooldown.strike(None, 0.0) == 0.0
    assert cooldown.remaining(None, 0.0) == 0.0
    assert len(cooldown) == 0


def test_it_remembers_a_bounded_number_of_addresses_oldest_cut_first_out() -> None:
    cooldown = Cooldown(10.0, size=3)
    for i, now in enumerate((0.0, 1.0, 2.0)):
        cooldown.strike(f"192.0.2.{i}", now)
    cooldown.strike("192.0.2.0", 3.0)  # cut again: now the most recent
    cooldown.strike("192.0.2.9", 4.0)  # the fourth address pushes out the oldest cut
    assert len(cooldown) == 3
    assert cooldown.remaining("192.0.2.1", 4.0) == 0.0
    assert cooldown.remaining("192.0.2.0", 4.0) > 0
    assert cooldown.remaining("192.0.2.9", 4.0) > 0


@pytest.mark.parametrize(
    ("peername", "key"),
    [
        (("192.0.2.7", 5000), "192.0.2.7"),
        (("2001:db8:1:2:3:4:5:6", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::1", 6000, 0, 0), "2001:db8:1:2::/64"),  # same /64
        (("::ffff:192.0.2.7", 5000, 0, 0), "192.0.2.7"),  # IPv4-mapped
        (("fe80::1%lo", 5000, 0, 1), "fe80::/64"),  # scoped
        ("/run/number-service.sock", None),  # a Unix socket
        (None, None),
        (("not-an-address", 1), None),
    ],
)
def test_addresses_cool_down_per_ipv4_address_and_per_ipv6_64(peername: Any, key: Any) -> None:
    assert address_key(peername) == key


# --- a real server ------------------------------------------------------------------------


@pytest.fixture
def serve() -> Any:
    srv = start_server(
        0,
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--max-resets",
        str(RESETS),
        "--flood-cooldown",
        str(COOLDOWN),
    )
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        reap(srv.proc)


async def cut(port: int) -> bytes:
    """Break --max-resets on a new connection; the GOAWAY's debug data."""
    async with await H2Client.connect(port) as h2:
        for _ in range(RESETS + 3):
            h2.reset(h2.open_stream())
        await h2.read_until(lambda: h2.goaway is not None)
    assert h2.goaway is not None
    assert h2.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    return h2.goaway.additional_data or b""


async def refused(port: int, *, send: bool = True) -> tuple[bool, int | None, bytes]:
    """A raw connection that sends a preface and a reset (or, ``send`` false,
    nothing): whether the server closed it, and the code and debug data of its
    GOAWAY (None: none)."""
    async with await RawSocket.connect(port) as sock:
        if send:
            await sock.send(PREFACE + SETTINGS_FRAME + frame(RST_STREAM, 0, 1, bytes(4)))
        got = await sock.read()
    goaway = got.goaway()
    if goaway is None:
        return got.closed, None, b""
    return got.closed, goaway.error_code, goaway.additional_data or b""


def records(srv: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for line in srv.stderr.drain():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"level": "RAW", "message": line})
    return out


async def test_a_cut_address_is_refused_for_the_cooldown_and_others_carry_on(
    serve: ServerProcess,
) -> None:
    client = NumberClient(HOST, serve.port, timeout=10)
    async with client, client.session() as session:
        assert await session.add(5) == 5  # connected before the flood
        serve.stderr.drain()
        started = time.monotonic()
        await cut(serve.port)
        closed, code, reason = await refused(serve.port)
        assert time.monotonic() - started < COOLDOWN, "too slow to see the cool-down"
        assert closed
        assert code == ErrorCodes.ENHANCE_YOUR_CALM
        assert reason.startswith(b"cooling down after a flood from this address"), reason
        assert b"--flood-cooldown" in reason
        assert await session.add(2) == 7  # the connection made before carries on
        await asyncio.sleep(COOLDOWN + 0.2)
        fresh = NumberClient(HOST, serve.port, timeout=10)
        async with fresh, fresh.session() as other:  # the cool-down is over
            assert await other.add(3) == 3
    await asyncio.sleep(0.3)  # the last lines are out
    logged = records(serve)
    warnings = [r for r in logged if r.get("level") == "WARNING"]
    assert len(warnings) == 1, warnings  # the cut; the refusal is no warning
    message = str(warnings[0]["message"])
    assert f"new connections from {HOST} refused for {COOLDOWN:g} s (--flood-cooldown)" in (
        message
    ), message
    debug = [r for r in logged if "cooling down after a flood" in str(r.get("message"))]
    assert len(debug) == 1, debug
    assert debug[0]["level"] == "DEBUG", debug
    assert not [r for r in logged if "Traceback" in json.dumps(r)]


async def test_a_second_cut_doubles_the_cooldown(serve: ServerProcess) -> None:
    await cut(serve.port)
    await asyncio.sleep(COOLDOWN + 0.2)
    await cut(serve.port)  # let in again, and cut again
    await asyncio.sleep(COOLDOWN + 0.2)  # the first cool-down's length: not over yet
    closed, code, reason = await refused(serve.port)
    assert closed
    assert code == ErrorCodes.ENHANCE_YOUR_CALM, (code, reason)
    assert reason.startswith(b"cooling down"), reason
    await asyncio.sleep(COOLDOWN)  # now over: 2 x COOLDOWN since the second cut
    assert b"streams reset" in await cut(serve.port)  # let in again
    await asyncio.sleep(0.3)
    messages = [str(r["message"]) for r in records(serve) if r.get("level") == "WARNING"]
    lengths = [m.rsplit("refused for ", 1)[1].split(" s ")[0] for m in messages]
    assert lengths == [f"{COOLDOWN:g}", f"{2 * COOLDOWN:g}", f"{4 * COOLDOWN:g}"], messages


async def test_with_the_cooldown_off_a_cut_address_comes_straight_back() -> None:
    srv = start_server(0, "--max-resets", str(RESETS), "--flood-cooldown", "0")
    try:
        for _ in range(3):
            assert b"streams reset" in await cut(srv.port)
    finally:
        assert srv.stop() == 0
        reap(srv.proc)


def cooling_server() -> contextlib.AbstractAsyncContextManager[tuple[Server, int]]:
    """An in-process server whose first cut cools its address down for 30 s; it and
    its port."""
    return ext_serving(Limits(max_resets=RESETS, flood_cooldown=30.0))


async def test_refused_connections_held_open_at_once_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past REFUSED_HELD refused connections waiting for their client to close, the
    next is closed at once (its GOAWAY still written): an attacker that connects in
    parallel cannot make the server hold a socket for each."""
    monkeypatch.setattr(connections, "REFUSED_HELD", 2)
    async with cooling_server() as (server, port):
        await cut(port)
        held = [await RawSocket.connect(port) for _ in range(2)]
        for each in held:  # refused, FIN sent, held open until the client closes
            got = await each.read(lambda r: r.goaway() is not None)
            assert got.goaway() is not None
        live = server.connections
        assert live.held == 2
        # It sends nothing: a close with bytes unread would be a reset, GOAWAY lost.
        closed, code, reason = await refused(port, send=False)
        assert closed
        assert code == ErrorCodes.ENHANCE_YOUR_CALM, (code, reason)
        assert live.held == 2
        assert live.cooled == 3
        for each in held:
            await each.close()
        await asyncio.sleep(0.2)
        assert live.held == 0


class GoneTransport(asyncio.Transport):
    """A client's socket reset between the refusal's GOAWAY and its FIN: the
    kernel then answers shutdown() with ENOTCONN, as it did for 1 in ~1,000 refused
    connections of an attacker that aborts as soon as it reads the GOAWAY."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


async def test_a_client_gone_before_its_refusal_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with cooling_server() as (server, port):
        await cut(port)
        protocol = server._protocol_factory()  # what asyncio calls per connection
        transport = GoneTransport()
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            protocol.connection_made(transport)  # raised OSError before the fix
        assert b"cooling down" in transport.written
        assert transport.aborted
        assert server.connections.held == 0
        protocol.connection_lost(None)
        loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
        assert not loud, [r.getMessage() for r in loud][:3]
