"""The README's client example runs as written, against a real server."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest
from processes import free_port

from number_service import NumberClient, Retry
from number_service.pytest_plugin import RunningServer

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


async def test_client_example(number_server: RunningServer) -> None:
    (example,) = [block for block in python_blocks() if "NumberClient(" in block]
    assert '"127.0.0.1", 50051' in example
    script = example.replace('"127.0.0.1", 50051', f'"127.0.0.1", {number_server.port}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == [str(n * (n + 1) // 2) for n in range(1, 11)]


async def test_embedding_example_exits_on_sigterm_while_a_client_stays_connected() -> None:
    """The README's plain grpclib server (graceful_exit, wait_closed) stops on SIGTERM
    although a client keeps its connection open: from Python 3.12.1 wait_closed()
    waits for every connection, and grpclib's close() leaves them to the client."""
    (example,) = [block for block in python_blocks() if "graceful_exit" in block]
    assert "port: int = 50051" in example
    port = free_port()
    script = example.replace("port: int = 50051", f"port: int = {port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
    )
    try:
        retry = Retry(attempts=100, initial_backoff=0.05, max_backoff=0.2)  # while it starts
        async with NumberClient("127.0.0.1", port, timeout=30, retry=retry) as client:
            assert [s async for s in client.accumulate([1, 2])] == [1, 3]
            proc.send_signal(signal.SIGTERM)  # the connection stays open meanwhile
            try:
                await asyncio.wait_for(proc.wait(), EXIT_IN)
            except TimeoutError:
                pytest.fail(f"the example still runs {EXIT_IN} s after SIGTERM")
        assert proc.returncode == 0
        assert proc.stderr is not None
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


EXIT_IN = 5.0  # seconds for the example to exit on SIGTERM (it takes ~0.1)
