"""The README's client example runs as written, against a real server."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

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
