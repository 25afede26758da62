"""The ``number-service`` command, run as real subprocesses against a real server.

Every process here listens on or connects to 127.0.0.1 only, runs under a timeout
and is reaped at the end of its test. The console script is the one installed in
the virtualenv that runs the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from number_service import NumberClient

EXE = Path(sys.executable).parent / "number-service"
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0  # seconds for `serve` to print its ready line
RUN_TIMEOUT = 30.0  # seconds for a whole short command
EXIT_TIMEOUT = 5.0  # seconds for a process to exit once it has been told to
LINE_TIMEOUT = 10.0  # seconds to wait for one line of streamed output
READY_LINE = re.compile(r"listening on 127\.0\.0\.1:(\d+)\s*$")
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The CLI must flush each line itself; an inherited setting would hide that.
    env.pop("PYTHONUNBUFFERED", None)
    return env


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Lines:
    """A text pipe read line by line on a daemon thread, so reads can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line)
        except (OSError, ValueError):  # the pipe was closed under us at cleanup
            pass
        finally:
            self._queue.put(None)

    def get(self, timeout: float = LINE_TIMEOUT) -> str | None:
        """The next line, or None at end of file; fails the test after ``timeout``."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line within {timeout} s; got so far: {self.text()!r}")
        if line is not None:
            self.seen.append(line)
        return line

    def rest(self, timeout: float = EXIT_TIMEOUT) -> str:
        """Everything up to end of file (call once the process has exited)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return self.text()

    def text(self) -> str:
        return "".join(self.seen)


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(EXE), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _reap(proc: subprocess.Popen[str]) -> None:
    """Make sure ``proc`` is gone and its pipes are closed, whatever happened."""
    if proc.stdin is not None and not proc.stdin.closed:
        with contextlib.suppress(OSError):  # it may have exited already
            proc.stdin.close()
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(EXIT_TIMEOUT)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command to the end; stdin is ``stdin`` or else empty, never the tty."""
    if stdin is None:
        return subprocess.run(
            [str(EXE), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=_env(),
            check=False,
        )
    return subprocess.run(
        [str(EXE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=_env(),
        check=False,
    )


def _assert_one_error_line(stderr: str, *needles: str) -> None:
    """stderr is exactly one ``number-service: ...`` line naming every needle."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("number-service: "), stderr
    for needle in needles:
        assert needle in lines[0], stderr


class ServerProcess:
    """A running ``number-service serve`` and the port its ready line named."""

    def __init__(self, proc: subprocess.Popen[str], stderr: Lines, port: int) -> None:
        self.proc = proc
        self.stderr = stderr
        self.port = port

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code; fail (and kill) if it does not exit."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            _reap(self.proc)
            pytest.fail(
                f"serve did not exit within {EXIT_TIMEOUT} s of {sig.name}; "
                f"stderr: {self.stderr.rest()!r}"
            )


def _start_server(port: int = 0) -> ServerProcess:
    proc = subprocess.Popen(
        [str(EXE), "serve", "--host", HOST, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stderr is not None
        stderr = Lines(proc.stderr)
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            line = stderr.get(left)  # fails the test, with stderr so far, on timeout
            if line is None:
                pytest.fail(
                    f"serve exited ({proc.wait(EXIT_TIMEOUT)}) before it was ready; "
                    f"stderr: {stderr.text()!r}"
                )
            if match := READY_LINE.search(line):
                return ServerProcess(proc, stderr, int(match.group(1)))
        pytest.fail(f"serve printed no ready line in {READY_TIMEOUT} s; stderr: {stderr.text()!r}")
    except BaseException:
        _reap(proc)
        raise


@pytest.fixture
def server() -> Iterator[int]:
    """A ``number-service serve`` on 127.0.0.1:<free port>; yields the port.

    Teardown sends SIGTERM and requires exit code 0 within a few seconds.
    """
    srv = _start_server()
    try:
        yield srv.port
    finally:
        code = srv.stop(signal.SIGTERM)
        stderr = srv.stderr.rest()
        _reap(srv.proc)
        assert code == 0, f"serve exited {code} on SIGTERM; stderr: {stderr!r}"
        assert "Traceback" not in stderr, stderr


def _sums(stdout: str) -> list[int]:
    return [int(line) for line in stdout.splitlines()]


# --- serve -------------------------------------------------------------------------


def test_ready_line_names_the_port_it_really_listens_on(server: int) -> None:
    assert 0 < server < 65536
    with socket.create_connection((HOST, server), timeout=5):
        pass
    result = _run("accumulate", "--host", HOST, "--port", str(server), "4", "6")
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [4, 10]


def test_ready_line_names_a_fixed_port() -> None:
    port = _free_port()
    srv = _start_server(port)
    try:
        assert srv.port == port
        assert srv.stop(signal.SIGTERM) == 0
    finally:
        _reap(srv.proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_exits_0_on_signal(sig: signal.Signals) -> None:
    srv = _start_server()
    try:
        result = _run("accumulate", "--port", str(srv.port), "1")
        assert result.returncode == 0, result.stderr
        assert srv.stop(sig) == 0, srv.stderr.rest()
        stderr = srv.stderr.rest()
        assert "Traceback" not in stderr, stderr
        assert "stopped" in stderr.splitlines()[-1], stderr
    finally:
        _reap(srv.proc)


def test_serve_exits_0_on_sigterm_while_a_stream_is_open() -> None:
    srv = _start_server()
    client = _popen("accumulate", "--port", str(srv.port), "-")
    try:
        assert client.stdin is not None
        assert client.stdout is not None
        out = Lines(client.stdout)
        client.stdin.write("3\n")
        client.stdin.flush()
        assert out.get() == "3\n"
        assert srv.stop(signal.SIGTERM) == 0, srv.stderr.rest()
        assert "Traceback" not in srv.stderr.rest()
    finally:
        _reap(client)
        _reap(srv.proc)


def test_serve_on_a_port_in_use_fails_with_one_line(server: int) -> None:
    result = _run("serve", "--host", HOST, "--port", str(server))
    assert result.returncode == 1
    _assert_one_error_line(result.stderr, f"{HOST}:{server}", "in use")
    # The server that holds the port is unharmed.
    again = _run("accumulate", "--port", str(server), "2")
    assert again.returncode == 0, again.stderr
    assert _sums(again.stdout) == [2]


# --- accumulate ----------------------------------------------------------------------


def test_accumulate_arguments_including_negative(server: int) -> None:
    result = _run("accumulate", "--port", str(server), "1", "2", "3", "-5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n3\n6\n1\n"
    assert result.stderr == ""


def test_accumulate_leading_negative_argument_and_int32_bounds(server: int) -> None:
    result = _run("accumulate", "--port", str(server), str(INT32_MIN), str(INT32_MAX), "-5")
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [INT32_MIN, -1, -6]


@pytest.mark.parametrize("dash", [["-"], []], ids=["dash", "no-numbers"])
def test_accumulate_from_stdin(server: int, dash: list[str]) -> None:
    seq = "".join(f"{n}\n" for n in range(1, 11))
    result = _run("accumulate", "--port", str(server), *dash, stdin=seq)
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [1, 3, 6, 10, 15, 21, 28, 36, 45, 55]


def test_accumulate_stdin_skips_blank_lines_and_trims(server: int) -> None:
    result = _run("accumulate", "--port", str(server), "-", stdin="1\n\n  2  \n-4")
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [1, 3, -1]


def test_accumulate_empty_stdin_prints_nothing(server: int) -> None:
    result = _run("accumulate", "--port", str(server), "-", stdin="")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_accumulate_streams_each_sum_before_the_next_number(server: int) -> None:
    proc = _popen("accumulate", "--host", HOST, "--port", str(server), "-")
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        proc.stdin.write("5\n")
        proc.stdin.flush()
        assert out.get() == "5\n"  # before "7" is even written
        proc.stdin.write("7\n")
        proc.stdin.flush()
        assert out.get() == "12\n"
        proc.stdin.close()
        assert proc.wait(EXIT_TIMEOUT) == 0, err.rest()
        assert out.get(EXIT_TIMEOUT) is None
        assert err.rest() == ""
    finally:
        _reap(proc)


@pytest.mark.parametrize(
    ("stdin", "needles"),
    [
        ("1\nabc\n3\n", ["line 2", "'abc'", "not an integer"]),
        ("1\n\n2.5\n", ["line 3", "'2.5'"]),  # blank lines count
        ("1\n2147483648\n", ["line 2", "2147483648", "outside int32"]),
        ("-2147483649\n", ["line 1", "-2147483649", "outside int32"]),
    ],
    ids=["word", "after-blank", "above-int32", "below-int32"],
)
def test_accumulate_bad_stdin_line_exits_2(server: int, stdin: str, needles: list[str]) -> None:
    result = _run("accumulate", "--port", str(server), "-", stdin=stdin)
    assert result.returncode == 2
    _assert_one_error_line(result.stderr, *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["1", "x", "3"], ["argument 2", "'x'", "not an integer"]),
        (["1.5"], ["argument 1", "'1.5'"]),
        (["1", "2147483648"], ["argument 2", "2147483648", "outside int32"]),
        (["-2147483649"], ["argument 1", "-2147483649", "outside int32"]),
    ],
    ids=["word", "float", "above-int32", "below-int32"],
)
def test_accumulate_bad_argument_exits_2_before_sending(
    server: int, args: list[str], needles: list[str]
) -> None:
    result = _run("accumulate", "--port", str(server), *args)
    assert result.returncode == 2
    assert result.stdout == ""  # checked whole before anything is sent
    _assert_one_error_line(result.stderr, *needles)


def test_accumulate_reports_the_servers_status(server: int) -> None:
    result = _run("accumulate", "--port", str(server), str(INT32_MAX), "1")
    assert result.returncode == 1
    assert _sums(result.stdout) == [INT32_MAX]
    _assert_one_error_line(result.stderr, "OUT_OF_RANGE")


def test_accumulate_without_a_server_is_unavailable() -> None:
    port = _free_port()
    result = _run("accumulate", "--host", HOST, "--port", str(port), "1")
    assert result.returncode == 1
    assert result.stdout == ""
    _assert_one_error_line(result.stderr, "UNAVAILABLE", f"{HOST}:{port}")


# The call ends (failure, deadline, Ctrl-C) while stdin is still open: the command
# must exit at once, not wait for another line.


@pytest.mark.parametrize(
    ("args", "first", "status"),
    [
        (["-"], f"{INT32_MAX}\n1\n", "OUT_OF_RANGE"),
        (["--timeout", "0.5", "-"], "", "DEADLINE_EXCEEDED"),
    ],
    ids=["server-error", "deadline"],
)
def test_accumulate_exits_on_a_failed_call_while_stdin_is_open(
    server: int, args: list[str], first: str, status: str
) -> None:
    proc = _popen("accumulate", "--port", str(server), *args)
    try:
        assert proc.stdin is not None
        assert proc.stderr is not None
        err = Lines(proc.stderr)
        proc.stdin.write(first)
        proc.stdin.flush()
        try:
            code = proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"accumulate still running {EXIT_TIMEOUT} s after the call failed")
        assert code == 1
        _assert_one_error_line(err.rest(), status)
    finally:
        _reap(proc)


def test_accumulate_exits_on_sigint_while_stdin_is_open(server: int) -> None:
    proc = _popen("accumulate", "--port", str(server), "-")
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        proc.stdin.write("3\n")
        proc.stdin.flush()
        assert out.get() == "3\n"
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"accumulate still running {EXIT_TIMEOUT} s after SIGINT")
        assert code != 0
        assert "Traceback" not in err.rest()
    finally:
        _reap(proc)


# --- help and version -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["Usage: number-service [OPTIONS] COMMAND", "serve", "accumulate"]),
        (["-h"], ["Usage: number-service [OPTIONS] COMMAND", "--version"]),
        (["serve", "--help"], ["Usage: number-service serve", "--host", "--port", "--log-level"]),
        (["accumulate", "--help"], ["Usage: number-service accumulate", "NUMBERS", "--timeout"]),
        (["accumulate", "-h"], ["Usage: number-service accumulate", "--port"]),
    ],
    ids=["group", "group-h", "serve", "accumulate", "accumulate-h"],
)
def test_help(args: list[str], expected: list[str]) -> None:
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    for text in expected:
        assert text in result.stdout
    assert result.stderr == ""


def test_version() -> None:
    version = importlib.metadata.version("number-service")
    result = _run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"number-service, version {version}"


def test_no_command_is_a_usage_error() -> None:
    result = _run("no-such-command")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Usage:" in result.stderr


# --- the client library against a server process that dies ---------------------------


async def test_client_gets_unavailable_when_the_server_is_killed() -> None:
    """SIGKILL mid-stream: the client raises UNAVAILABLE promptly instead of hanging."""
    srv = _start_server()
    try:
        async with NumberClient(HOST, srv.port) as client:
            got: list[int] = []
            with pytest.raises(GRPCError) as caught:
                async with asyncio.timeout(LINE_TIMEOUT), client.session() as session:
                    got.append(await session.add(1))
                    srv.proc.kill()
                    srv.proc.wait(EXIT_TIMEOUT)
                    while True:  # the first sends may still reach the socket buffer
                        got.append(await session.add(1))
        assert got[0] == 1
        assert caught.value.status is Status.UNAVAILABLE
    finally:
        _reap(srv.proc)
