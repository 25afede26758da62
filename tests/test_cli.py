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
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from processes import (
    EXE,
    EXIT_TIMEOUT,
    HOST,
    LINE_TIMEOUT,
    Lines,
    assert_one_error_line,
    free_port,
    popen,
    reap,
    run,
    start_server,
)

from number_service import INT32_MAX, INT32_MIN, NumberClient


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """A ``number-service serve`` on 127.0.0.1:<free port>; yields the port.

    One for the module: the server keeps nothing from one stream to the next, and
    each start and stop costs a second or two of a loaded CI machine (19 uses).
    Teardown sends SIGTERM and requires exit code 0 within a few seconds, and no
    traceback in anything the server logged for any of the tests.
    """
    srv = start_server()
    try:
        yield srv.port
    finally:
        code = srv.stop(signal.SIGTERM)
        stderr = srv.stderr.rest()
        reap(srv.proc)
        assert code == 0, f"serve exited {code} on SIGTERM; stderr: {stderr!r}"
        assert "Traceback" not in stderr, stderr


def _sums(stdout: str) -> list[int]:
    return [int(line) for line in stdout.splitlines()]


# --- serve -------------------------------------------------------------------------


def test_ready_line_names_the_port_it_really_listens_on(server: int) -> None:
    assert 0 < server < 65536
    with socket.create_connection((HOST, server), timeout=5):
        pass
    result = run("accumulate", "--host", HOST, "--port", str(server), "4", "6")
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [4, 10]


def test_ready_line_names_a_fixed_port() -> None:
    port = free_port()
    srv = start_server(port)
    try:
        assert srv.port == port
        assert srv.stop(signal.SIGTERM) == 0
    finally:
        reap(srv.proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_exits_0_on_signal(sig: signal.Signals) -> None:
    srv = start_server()
    try:
        result = run("accumulate", "--port", str(srv.port), "1")
        assert result.returncode == 0, result.stderr
        assert srv.stop(sig) == 0, srv.stderr.rest()
        stderr = srv.stderr.rest()
        assert "Traceback" not in stderr, stderr
        assert "stopped" in stderr.splitlines()[-1], stderr
    finally:
        reap(srv.proc)


def test_serve_drains_then_exits_0_on_sigterm_while_a_stream_is_open() -> None:
    """A stream that outlives the grace period ends UNAVAILABLE; serve still exits 0."""
    srv = start_server(0, "--grace", "1")
    client = popen("accumulate", "--port", str(srv.port), "-")
    try:
        assert client.stdin is not None
        assert client.stdout is not None
        assert client.stderr is not None
        out, err = Lines(client.stdout), Lines(client.stderr)
        client.stdin.write("3\n")
        client.stdin.flush()
        assert out.get() == "3\n"
        started = time.monotonic()
        assert srv.stop(signal.SIGTERM) == 0, srv.stderr.rest()
        assert time.monotonic() - started < 1 + 1
        assert "Traceback" not in srv.stderr.rest()
        assert client.wait(EXIT_TIMEOUT) == 1
        assert_one_error_line(err.rest(), "UNAVAILABLE", "shut down")
    finally:
        reap(client)
        reap(srv.proc)


def test_serve_on_a_port_in_use_fails_with_one_line(server: int) -> None:
    result = run("serve", "--host", HOST, "--port", str(server))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"{HOST}:{server}", "in use")
    # The server that holds the port is unharmed.
    again = run("accumulate", "--port", str(server), "2")
    assert again.returncode == 0, again.stderr
    assert _sums(again.stdout) == [2]


# --- accumulate ----------------------------------------------------------------------


def test_accumulate_arguments_including_negative(server: int) -> None:
    result = run("accumulate", "--port", str(server), "1", "2", "3", "-5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n3\n6\n1\n"
    assert result.stderr == ""


def test_accumulate_leading_negative_argument_and_int32_bounds(server: int) -> None:
    result = run("accumulate", "--port", str(server), str(INT32_MIN), str(INT32_MAX), "-5")
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [INT32_MIN, -1, -6]


@pytest.mark.parametrize("dash", [["-"], []], ids=["dash", "no-numbers"])
def test_accumulate_from_stdin(server: int, dash: list[str]) -> None:
    seq = "".join(f"{n}\n" for n in range(1, 11))
    result = run("accumulate", "--port", str(server), *dash, stdin=seq)
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [1, 3, 6, 10, 15, 21, 28, 36, 45, 55]


def test_accumulate_stdin_skips_blank_lines_and_trims(server: int) -> None:
    result = run("accumulate", "--port", str(server), "-", stdin="1\n\n  2  \n-4")
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [1, 3, -1]


def test_accumulate_empty_stdin_prints_nothing(server: int) -> None:
    result = run("accumulate", "--port", str(server), "-", stdin="")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_accumulate_streams_each_sum_before_the_next_number(server: int) -> None:
    proc = popen("accumulate", "--host", HOST, "--port", str(server), "-")
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
        reap(proc)


@pytest.mark.parametrize(
    ("stdin", "sums", "needles"),
    [
        ("1\nabc\n3\n", [1], ["line 2", "'abc'", "not an integer"]),
        ("1\n\n2.5\n", [1], ["line 3", "'2.5'"]),  # blank lines count
        ("1\n\n2\nx\n", [1, 3], ["line 4", "'x'", "not an integer"]),
        ("1\n2147483648\n", [1], ["line 2", "2147483648", "outside int32"]),
        ("-2147483649\n", [], ["line 1", "-2147483649", "outside int32"]),
    ],
    ids=["word", "after-blank", "after-two", "above-int32", "below-int32"],
)
def test_accumulate_bad_stdin_line_exits_2_after_the_sums_before_it(
    server: int, stdin: str, sums: list[int], needles: list[str]
) -> None:
    """As the server does: every sum answered is printed, then the error."""
    result = run("accumulate", "--port", str(server), "-", stdin=stdin)
    assert result.returncode == 2
    assert _sums(result.stdout) == sums
    assert_one_error_line(result.stderr, *needles)


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
    result = run("accumulate", "--port", str(server), *args)
    assert result.returncode == 2
    assert result.stdout == ""  # checked whole before anything is sent
    assert_one_error_line(result.stderr, *needles)


def test_accumulate_reports_the_servers_status(server: int) -> None:
    result = run("accumulate", "--port", str(server), str(INT32_MAX), "1")
    assert result.returncode == 1
    assert _sums(result.stdout) == [INT32_MAX]
    assert_one_error_line(result.stderr, "OUT_OF_RANGE")


def test_accumulate_without_a_server_is_unavailable() -> None:
    port = free_port()
    result = run("accumulate", "--host", HOST, "--port", str(port), "1")
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_error_line(result.stderr, "UNAVAILABLE", f"{HOST}:{port}")


# --- targets and options ---------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["comma", "repeated", "env"], ids=["comma", "repeated", "environment"]
)
def test_accumulate_takes_several_targets(server: int, how: str) -> None:
    """``--target A,B``, ``--target A --target B`` or NUMBER_SERVICE_TARGET="A,B",
    where nothing listens on A: the call goes to B, so both were taken."""
    a, b = f"{HOST}:{free_port()}", f"{HOST}:{server}"
    env: dict[str, str] = {}
    if how == "comma":
        args = ["--target", f"{a},{b}"]
    elif how == "repeated":
        args = ["--target", a, "--target", b]
    else:
        args = []
        env = {"NUMBER_SERVICE_TARGET": f"{a},{b}"}
    for _ in range(3):
        result = run("accumulate", *args, "1", "-5", "3", env=env)
        assert result.returncode == 0, result.stderr
        assert _sums(result.stdout) == [1, -4, -1]
        assert result.stderr == ""


def test_accumulate_with_every_target_down_names_each() -> None:
    ports = [free_port(), free_port()]
    result = run("accumulate", "--target", ",".join(f"{HOST}:{p}" for p in ports), "1")
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "UNAVAILABLE", *(f"{HOST}:{p}" for p in ports))


def test_host_and_port_win_over_the_environments_target(server: int) -> None:
    env = {"NUMBER_SERVICE_TARGET": f"{HOST}:{free_port()}"}
    result = run("accumulate", "--port", str(server), "7", env=env)
    assert result.returncode == 0, result.stderr
    assert _sums(result.stdout) == [7]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--foo", "1"], ["No such option", "'--foo'"]),
        (["1", "--foo=3"], ["No such option", "'--foo'"]),
        (["-x"], ["No such option", "'-x'"]),
        (["--taget", "h:1", "1"], ["No such option", "'--taget'", "--target"]),
        (["--target", "h:x", "1"], ["'--target'", "port 'x' is not a number"]),
        (["--target", "h:1", "--host", "h", "1"], ["--target", "--host", "not both"]),
    ],
    ids=["unknown", "unknown-with-value", "unknown-short", "misspelt", "bad-target", "both"],
)
def test_accumulate_usage_errors_name_the_option(args: list[str], needles: list[str]) -> None:
    """Unknown options are usage errors naming them (not "'--foo' is not an
    integer"), while negative numbers stay numbers."""
    result = run("accumulate", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_error_line(result.stderr, *needles)
    assert "not an integer" not in result.stderr


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
    proc = popen("accumulate", "--port", str(server), *args)
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
        assert_one_error_line(err.rest(), status)
    finally:
        reap(proc)


@contextlib.contextmanager
def accumulating_from_stdin(server: int) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """``accumulate -`` with stdin left open, once it has answered a first number;
    the process and its stderr's lines. Reaped at the end."""
    proc = popen("accumulate", "--port", str(server), "-")
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        proc.stdin.write("3\n")
        proc.stdin.flush()
        assert out.get() == "3\n"
        yield proc, err
    finally:
        reap(proc)


def test_accumulate_exits_on_sigint_while_stdin_is_open(server: int) -> None:
    with accumulating_from_stdin(server) as (proc, err):
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"accumulate still running {EXIT_TIMEOUT} s after SIGINT")
        assert code != 0
        assert "Traceback" not in err.rest()


def _cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far, all its threads (ns-precise, Linux)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir()) / 1e9


def _wait_for_cpu(proc: subprocess.Popen[str], timeout: float) -> float:
    """Reap ``proc`` within ``timeout`` s (else fail); the CPU seconds it used in all."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            pytest.fail(f"accumulate still running {timeout} s after SIGINT")
        time.sleep(0.01)


def test_accumulate_leaves_at_once_on_sigint(server: int) -> None:
    """Ctrl-C costs the command next to no CPU: on a loaded machine every ms of it is
    several of waiting. The interpreter's full teardown (some 430 modules) cost it
    50-130 ms, and a CI run saw accumulate still running 5 s after SIGINT."""
    with accumulating_from_stdin(server) as (proc, err):
        time.sleep(0.2)  # the first sum's work done: the CPU counted is the exit's
        before = _cpu_seconds(proc.pid)
        proc.send_signal(signal.SIGINT)
        spent = _wait_for_cpu(proc, EXIT_TIMEOUT) - before
        assert proc.returncode == 130
        assert err.rest() == "number-service: interrupted\n"
        assert spent < 0.03, f"accumulate used {spent * 1000:.0f} ms of CPU after SIGINT"


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
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    for text in expected:
        assert text in result.stdout
    assert result.stderr == ""


def test_version() -> None:
    version = importlib.metadata.version("number-service")
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"number-service, version {version}"


def test_no_command_is_a_usage_error() -> None:
    result = run("no-such-command")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "No such command 'no-such-command'", "--help")


def test_no_arguments_show_the_help() -> None:
    result = run()
    assert result.returncode == 2
    assert "Usage: number-service [OPTIONS] COMMAND" in result.stderr
    assert "Traceback" not in result.stderr


# --- the client library against a server process that dies ---------------------------


async def test_client_gets_unavailable_when_the_server_is_killed() -> None:
    """SIGKILL mid-stream: the client raises UNAVAILABLE promptly instead of hanging."""
    srv = start_server()
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
        reap(srv.proc)


# --- output and addresses ------------------------------------------------------------


def test_accumulate_into_a_full_disk_is_one_line(server: int) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [str(EXE), "accumulate", "--port", str(server), "1", "2"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "cannot write the sums")


def test_accumulate_into_a_closed_pipe_stops_quietly(server: int) -> None:
    proc = popen("accumulate", "--port", str(server), "-")
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        err = Lines(proc.stderr)
        proc.stdin.write("1\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "1\n"
        proc.stdout.close()  # like `| head -1`
        proc.stdin.write("".join(f"{n}\n" for n in range(10_000)))
        proc.stdin.close()
        assert proc.wait(EXIT_TIMEOUT) == 141  # 128 + SIGPIPE, as `yes | head` ends
        assert err.rest() == ""
    finally:
        reap(proc)


def test_serve_on_an_unknown_host_is_one_clear_line() -> None:
    result = run("serve", "--host", "no.such.host.invalid", "--port", "0")
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "cannot listen on no.such.host.invalid:0")
    assert "Unknown error" not in result.stderr


def test_ready_line_shows_even_when_only_warnings_are_logged() -> None:
    srv = start_server(0, "--log-level", "warning")
    try:
        assert srv.port > 0  # start_server found the ready line
        assert srv.stop(signal.SIGTERM) == 0
    finally:
        reap(srv.proc)
