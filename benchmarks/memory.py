"""Memory per idle open stream, by owner: a tracemalloc breakdown of our server.

    ./dev run python -m benchmarks.memory                 # 2,000 streams on 20 connections
    ./dev run python -m benchmarks.memory --streams 10000 --top 25 --json

The server (``number_service.build_server()``, what ``number-service serve`` serves) runs
in this process under tracemalloc; the clients run in a child process (our
``NumberClient``), so nothing of theirs is counted. The child connects, warms every
connection up with one stream, and waits; the server takes a snapshot (after a
``gc.collect()``); the child opens ``--streams`` streams, each sends one number, checks
its sum and waits; a second snapshot; then every stream sends a second number, checks
it and ends OK.

The difference between the snapshots, divided by the streams, is what one idle open
stream holds, attributed to the source file that allocated each block (tracemalloc's
innermost frame), grouped by owner:

- h2 (h2, hpack, hyperframe), grpclib, asyncio;
- serving (ours): ``number_service/serving/`` (grpclib_ext included);
- handler chain: the service's and the generated code's frames (``number_service/``
  outside serving, ``number_service_gen``, betterproto2): the coroutine and
  generator objects of a waiting handler are allocated where they are called;
- other.

A coroutine object is counted where it is created (the caller's line), so one made by
grpclib for our handler counts as grpclib's: ``--top`` lists the largest lines, to see.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import socket
import sys
import tracemalloc
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
OWNERS = ("h2", "grpclib", "asyncio", "serving (ours)", "handler chain", "other")


def owner(filename: str) -> str:
    """Which owner a source file's allocations count for (see the module)."""
    path = filename.replace(os.sep, "/")
    if "/betterproto2/" in path:  # before grpclib: its grpclib glue is the handler's
        return "handler chain"
    if any(f"/{lib}/" in path for lib in ("h2", "hpack", "hyperframe")):
        return "h2"
    if "/grpclib/" in path:
        return "grpclib"
    if "/asyncio/" in path:
        return "asyncio"
    if "/number_service/serving/" in path:
        return "serving (ours)"
    if any(p in path for p in ("/number_service/", "/number_service_gen/", "/betterproto2/")):
        return "handler chain"
    return "other"


def breakdown(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, streams: int, top: int
) -> dict[str, Any]:
    """Bytes per stream by owner, and the ``top`` lines that grew most."""
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")
    by_owner = dict.fromkeys(OWNERS, 0.0)
    for stat in diff:
        frame = stat.traceback[0]
        by_owner[owner(frame.filename)] += stat.size_diff / streams
    lines = [
        {
            "bytes_per_stream": stat.size_diff / streams,
            "blocks_per_stream": stat.count_diff / streams,
            "owner": owner(stat.traceback[0].filename),
            "where": f"{short(stat.traceback[0].filename)}:{stat.traceback[0].lineno}",
        }
        for stat in diff[:top]
    ]
    return {
        "streams": streams,
        "bytes_per_stream": sum(by_owner.values()),
        "by_owner": by_owner,
        "top": lines,
    }


def short(filename: str) -> str:
    """A source file's path from its package (``asyncio/locks.py``, ``h2/stream.py``)."""
    path = filename.replace(os.sep, "/")
    found = re.search(r"/(?:site-packages|service|gen|lib/python3\.\d+)/(.*)$", path)
    return found.group(1) if found else path


async def measure(streams: int, connections: int, top: int) -> dict[str, Any]:
    from number_service import build_server

    serving = build_server()
    sock = socket.create_server((HOST, 0))
    port = sock.getsockname()[1]
    await serving.start(sock)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--client",
        str(port),
        "--streams",
        str(streams),
        "--connections",
        str(connections),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None

    async def expect(word: str) -> None:
        line = (await asyncio.wait_for(child.stdout.readline(), 600)).decode().strip()  # type: ignore[union-attr]
        if line != word:
            raise RuntimeError(f"client said {line!r}, not {word!r}")

    async def settled() -> tracemalloc.Snapshot:
        await asyncio.sleep(0.3)
        gc.collect()
        return tracemalloc.take_snapshot()

    try:
        await expect("connected")
        before = await settled()
        child.stdin.write(b"open\n")
        await expect("open")
        after = await settled()
        child.stdin.write(b"end\n")
        await expect("ended")
        code = await asyncio.wait_for(child.wait(), 60)
        if code != 0:
            raise RuntimeError(f"client exited {code}")
    finally:
        if child.returncode is None:
            child.kill()
        serving.server.close()
        await serving.server.wait_closed()
    return breakdown(before, after, streams, top)


async def client(port: int, streams: int, connections: int) -> None:
    """The child: connections, then idle streams, then their end; says each step."""
    from number_service import NumberClient

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def wait_for(word: str) -> None:
        line = (await stdin.readline()).decode().strip()
        if line != word:
            raise RuntimeError(f"told {line!r}, not {word!r}")

    def say(word: str) -> None:
        print(word, flush=True)

    clients = [NumberClient(HOST, port, timeout=600) for _ in range(connections)]
    opened = 0
    all_open, release = asyncio.Event(), asyncio.Event()

    async def one(k: int) -> None:
        nonlocal opened
        async with clients[k % connections].session() as session:
            if await session.add(k) != k:
                raise RuntimeError(f"stream {k}: wrong sum")
            opened += 1
            if opened == streams:
                all_open.set()
            await release.wait()
            if await session.add(-2 * k) != -k:
                raise RuntimeError(f"stream {k}: wrong second sum")

    try:
        for c in clients:
            async with c.session() as session:
                if await session.add(1) != 1:
                    raise RuntimeError("warm-up: wrong sum")
        say("connected")
        await wait_for("open")
        tasks = [asyncio.create_task(one(k)) for k in range(1, streams + 1)]
        waiter = asyncio.create_task(all_open.wait())
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        say("open")
        await wait_for("end")
        release.set()
        await asyncio.gather(*tasks)
        say("ended")
    finally:
        for c in clients:
            c.close()


def describe(found: dict[str, Any]) -> str:
    lines = [
        f"tracemalloc, {found['streams']} idle open streams: "
        f"{found['bytes_per_stream'] / 1024:.2f} KiB per stream "
        f"({found['bytes_per_stream']:.0f} B)"
    ]
    for name, size in found["by_owner"].items():
        lines.append(f"  {name:15} {size:8.0f} B")
    if found["top"]:
        lines.append("  largest lines (B per stream, blocks per stream):")
        for line in found["top"]:
            lines.append(
                f"    {line['bytes_per_stream']:7.0f} {line['blocks_per_stream']:5.1f}  "
                f"{line['owner']:15} {line['where']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=20, help="at most 100 streams each")
    parser.add_argument("--top", type=int, default=15, help="largest lines to list")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        asyncio.run(client(args.client, args.streams, args.connections))
        return 0
    tracemalloc.start(1)
    found = asyncio.run(measure(args.streams, args.connections, args.top))
    print(json.dumps(found, indent=2) if args.json else describe(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
