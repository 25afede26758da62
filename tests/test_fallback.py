"""With grpclib or h2 releases the grpclib extensions were not written for, the server
says so in one WARNING line and serves as plain grpclib does: every call is still
answered right, the extensions' limits are simply absent, and shutdown still ends
(on Python 3.12+ plain grpclib's wait_closed() would wait for every client).

The other version is faked: ``importlib.metadata.version`` answers another h2.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2server import MAX_STREAM_ID, ScriptedServer
from processes import EXIT_TIMEOUT, HOST, reap, start_server

from number_service import INT32_MAX, NumberClient, build_server
from number_service.serving import grpclib_ext
from number_service.serving.build import STOP_WAIT
from number_service.serving.grpclib_ext import client as client_ext
from number_service.serving.run import address_of, bind

TIMEOUT = 10.0
FAKE_H2 = "9.9.9"
WARNING = f"installed h2 {FAKE_H2} (written for {grpclib_ext.WRITTEN_FOR['h2']})"


def fake_version(real: Callable[[str], str]) -> Callable[[str], str]:
    def version(name: str) -> str:
        return FAKE_H2 if name == "h2" else real(name)

    return version


@pytest.fixture
def other_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "version", fake_version(metadata.version))


@pytest.mark.usefixtures("other_h2")
def test_another_h2_is_named_in_the_mismatch() -> None:
    assert grpclib_ext.mismatch() == f"h2 {FAKE_H2} (written for {grpclib_ext.WRITTEN_FOR['h2']})"


@pytest.mark.usefixtures("other_h2")
async def test_another_h2_serves_plain_grpclib_right_and_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One WARNING line naming the versions; a plain grpclib server (no connection
    counts); sums, an overflow's status and a drained stream's UNAVAILABLE as ever;
    and the shutdown ends though a client keeps its connection open."""
    caplog.set_level(logging.INFO, logger="number_service")
    built = build_server()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert WARNING in warnings[0]
    assert "plain grpclib" in warnings[0]
    assert not isinstance(built.server, grpclib_ext.Server)
    assert built.connections is None

    sock = bind(HOST, 0)
    await built.start(sock)
    # Not resumed: the drained stream's UNAVAILABLE is what this test looks at.
    client = NumberClient(*address_of(sock), timeout=TIMEOUT, resume=False)
    try:
        assert [s async for s in client.accumulate([1, 2, 3])] == [1, 3, 6]
        with pytest.raises(GRPCError) as overflow:
            async for _ in client.accumulate([INT32_MAX, 1]):
                pass
        assert overflow.value.status is Status.OUT_OF_RANGE
        async with client.session() as session:
            assert await session.add(5) == 5
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(built.shutdown(grace=0.2), 0.2 + STOP_WAIT + TIMEOUT)
            assert loop.time() - started < 0.2 + STOP_WAIT + 2
            with pytest.raises(GRPCError) as cut:
                await session.add(1)
        # The client is under the same version check: plain grpclib's word, which
        # (in its exit from the call) reads the status in the trailers the server
        # sent before its reset.
        assert cut.value.status is Status.UNAVAILABLE
        assert "server shut down before this stream finished" in str(cut.value.message)
    finally:
        client.close()


SITECUSTOMIZE = f"""
from importlib import metadata
_real = metadata.version
metadata.version = lambda name: {FAKE_H2!r} if name == "h2" else _real(name)
"""


async def test_serve_with_another_h2_warns_once_answers_and_exits_0(tmp_path: Path) -> None:
    """``number-service serve`` with another h2: the one WARNING line, right sums over
    TCP, and SIGTERM ends it (exit 0) while a client still holds its connection."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    server = start_server(0, "--grace", "0", env={"PYTHONPATH": str(tmp_path)})
    try:
        async with NumberClient(HOST, server.port, timeout=TIMEOUT) as client:
            assert [s async for s in client.accumulate([4, 5])] == [4, 9]
            server.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.proc.wait, STOP_WAIT + EXIT_TIMEOUT)
        assert code == 0
        text = server.stderr.rest()
        warnings = [line for line in text.splitlines() if " WARNING " in line]
        assert any(WARNING in line for line in warnings), text
        assert sum("plain grpclib" in line for line in warnings) == 1, text
        assert "Traceback" not in text
    finally:
        reap(server.proc)


def test_another_h2_leaves_the_client_plain_grpclib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's workarounds step aside too: no status read from the trailers
    behind a reset, no GOAWAY read from h2's state; plain grpclib's word stands."""

    class Call:  # a call whose server sent OUT_OF_RANGE before it reset the stream
        _stream = object()  # grpclib's protocol stream: the call was sent

        def _maybe_raise(self) -> None:
            raise GRPCError(Status.OUT_OF_RANGE, "from the trailers")

    call: Any = Call()
    found = client_ext.servers_status(call)
    assert found is not None
    assert found.status is Status.OUT_OF_RANGE
    monkeypatch.setattr(metadata, "version", fake_version(metadata.version))
    assert client_ext.servers_status(call) is None
    assert client_ext.goaway_received(call) is False


@pytest.mark.usefixtures("other_h2")
async def test_another_h2_leaves_grpclibs_goaway_and_the_stream_is_resumed() -> None:
    """With another h2 the client makes grpclib's own Channels: a GOAWAY fails every
    stream of its connection, as plain grpclib does, and cannot tell whether one is
    up; the session cut so is resumed on the other server all the same."""
    async with (
        ScriptedServer() as a,
        ScriptedServer() as b,
        NumberClient([a.target, b.target], timeout=TIMEOUT) as client,
    ):
        async with client.session() as session:
            assert await session.add(1) == 1
            assert not isinstance(client.channel, client_ext.Channel)
            assert client_ext.connected(client.channel) is None
            (record,) = a.streams + b.streams
            drained, other = (a, b) if record in a.streams else (b, a)
            drained.stop_listening()
            await drained.goaway(last_stream_id=MAX_STREAM_ID)
            assert await session.add(2) == 3
        assert record.end != "ok"  # grpclib failed it
        assert [r.received for r in other.streams] == [[1, 2]]  # the sum, then 2
