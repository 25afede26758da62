"""The README's client example runs as written, against a real server."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest
from processes import free_port

from number_service import NumberClient, NumberServer, Retry, Serving, build_server
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


async def test_stub_example(number_server: RunningServer) -> None:
    """The generated stub, shown beside NumberClient in "Which client", runs as written."""
    (example,) = [block for block in python_blocks() if "NumberServiceStub(" in block]
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


async def test_serving_another_service_example_serves_and_stops() -> None:
    """The README's example of the serving layer on its own, with NumberService in
    the place of "your service": it logs its ready line, answers, and SIGTERM drains
    and stops it (exit 0)."""
    (example,) = [block for block in python_blocks() if "from my_service import" in block]
    port = free_port()
    script = re.sub(
        r"from my_service import MyService.*\n",
        "from number_service import NumberService as MyService\n",
        example,
    ).replace("port=50052", f"port={port}")
    assert "MyService" in script
    assert f"port={port}" in script
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        ready = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"number_service.serving listening on 127.0.0.1:" in ready, ready
        async with NumberClient("127.0.0.1", port, timeout=30) as client:
            assert [s async for s in client.accumulate([1, 2])] == [1, 3]
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await proc.wait() == 0
        assert b"stopped" in rest
        assert b"Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_number_server_build_is_build_server() -> None:
    """``NumberServer.build()``, the earlier name, still gives the embeddable pieces."""
    assert isinstance(NumberServer.build(), Serving)
    assert isinstance(build_server(), Serving)


LAYOUT_ROOT = "service/number_service/"


def test_the_layout_section_names_every_file_of_the_package() -> None:
    """README's Layout lists each module of service/number_service, nested as on disk,
    and nothing that is not there."""
    block = re.search(r"## Layout\n.*?```\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert block is not None
    listed: set[str] = set()
    parents: list[str] = []
    inside = False
    for line in block.group(1).splitlines():
        if line.startswith(LAYOUT_ROOT):
            inside = True
            continue
        if inside and not line.startswith("  "):
            break
        name = line.split()[0] if line.strip() else ""
        if not inside or not name.endswith((".py", "/")):
            continue  # a description's second line
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        parents[depth:] = [name]
        listed.add("".join(parents))
    root = README.parent / LAYOUT_ROOT
    on_disk = {
        str(path.relative_to(root)) + ("/" if path.is_dir() else "")
        for path in root.rglob("*")
        if (path.suffix == ".py" or path.is_dir()) and "__pycache__" not in path.parts
    }
    assert listed == on_disk
