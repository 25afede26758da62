"""Running ``number-service`` as real processes in tests: start, read, stop, reap.

Every process listens on or connects to 127.0.0.1 only, runs under a timeout and
is reaped by the test that started it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

EXE = Path(sys.executable).parent / "number-service"
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0  # seconds for `serve` to print its ready line
RUN_TIMEOUT = 30.0  # seconds for a whole short command
EXIT_TIMEOUT = 5.0  # seconds for a process to exit once it has been told to
LINE_TIMEOUT = 10.0  # seconds to wait for one line of streamed output
READY_LINE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def env_without_buffering() -> dict[str, str]:
    env = dict(os.environ)
    # The CLI must flush each line itself; an inherited setting would hide that.
    env.pop("PYTHONUNBUFFERED", None)
    return env


def free_port() -> int:
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

    def wait_for(self, text: str, timeout: float = LINE_TIMEOUT) -> str:
        """Read lines until one contains ``text``; return it (fails the test on timeout)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.get(left)
            if line is None:
                break
            if text in line:
                return line
        pytest.fail(f"no line with {text!r}; got so far: {self.text()!r}")

    def drain(self) -> list[str]:
        """The lines that have arrived and not been read yet, without waiting."""
        lines: list[str] = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return lines
            if line is None:  # end of file: leave it for get()
                self._queue.put(None)
                return lines
            self.seen.append(line)
            lines.append(line)

    def text(self) -> str:
        return "".join(self.seen)


def popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(EXE), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_buffering(),
    )


def reap(proc: subprocess.Popen[str]) -> None:
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


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command to the end; stdin is ``stdin`` or else empty, never the tty."""
    if stdin is None:
        return subprocess.run(
            [str(EXE), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env={**env_without_buffering(), **(env or {})},
            check=False,
        )
    return subprocess.run(
        [str(EXE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env_without_buffering(),
        check=False,
    )


def assert_one_error_line(stderr: str, *needles: str) -> None:
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
            reap(self.proc)
            pytest.fail(
                f"serve did not exit within {EXIT_TIMEOUT} s of {sig.name}; "
                f"stderr: {self.stderr.rest()!r}"
            )


def start_server(port: int = 0, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``number-service serve`` on 127.0.0.1, once its ready line names the port."""
    proc = subprocess.Popen(
        [str(EXE), "serve", "--host", HOST, "--port", str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**env_without_buffering(), **(env or {})},
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
        reap(proc)
        raise
