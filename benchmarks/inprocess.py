"""Short streams in one process, no sockets: a per-stream cost figure for small changes.

    ./dev run python -m benchmarks.inprocess                    # us per short stream
    ./dev run python -m benchmarks.inprocess --profile out.prof # and a cProfile of it

Our whole server (``number_service.build_server()``: metrics, logs, stream tracking,
batched streams, coalesced writes) and a grpclib client talk through in-memory
transports, as ``grpclib.testing.ChannelFor`` wires them (it builds a plain grpclib
Server, so it cannot serve ours). Each stream is the ``short`` bench mode's: open,
5 lock-step numbers, close; ``--concurrency`` of them at a time on one connection.
The figure (``us_per_stream``) is the process's CPU time per stream (not wall time:
the machine may be shared), client and server together on one core, so a
change to the server shows as a smaller difference than it makes to the server
alone; it is for before/after comparisons on one machine, not for the docs' tables.
Every sum is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import time
from typing import Any

from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.protocol import H2Protocol

from number_service.codec import NumberCodec
from number_service.server import build_server
from number_service_gen.tutorial import NumberRequest, NumberResponse

METHOD = "/tutorial.NumberService/AccumulateNumbers"
NUMBERS = 5  # per stream, as the bench's short mode


class MemoryTransport(asyncio.Transport):
    """One direction of an in-memory connection: what is written arrives at ``peer``
    on the next loop turn (as ``grpclib.testing``'s transport does)."""

    def __init__(self, peer: H2Protocol, name: tuple[str, int]) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._peer = peer
        self._name = name
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._closing:
            self._loop.call_soon(self._peer.data_received, bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return self._name
        return default


async def short_streams(channel: Channel, count: int, numbers: int = NUMBERS) -> None:
    """``count`` short streams of ``numbers`` lock-step numbers each, one after another,
    each sum checked."""
    sent = [1 + k % 5 for k in range(numbers)]
    for _ in range(count):
        async with channel.request(
            METHOD, Cardinality.STREAM_STREAM, NumberRequest, NumberResponse
        ) as stream:
            total = 0
            for number in sent:
                await stream.send_message(NumberRequest(num=number))
                total += number
                reply = await stream.recv_message()
                assert reply is not None
                assert reply.sum == total, (reply, total)
            await stream.end()
            assert await stream.recv_message() is None


async def run(
    streams: int, concurrency: int, profile: str | None, numbers: int = NUMBERS
) -> dict[str, Any]:
    serving = build_server()
    server = serving.server
    server._server = _FakeServer()  # what grpclib.testing.ChannelFor does
    server._server_closed_fut = asyncio.get_running_loop().create_future()
    server_protocol = server._protocol_factory()
    channel = Channel(codec=NumberCodec())
    client_protocol = channel._protocol_factory()
    channel._protocol = client_protocol
    client_protocol.connection_made(MemoryTransport(server_protocol, ("127.0.0.1", 50051)))
    server_protocol.connection_made(MemoryTransport(client_protocol, ("127.0.0.1", 40000)))
    per_task = streams // concurrency
    await asyncio.gather(*(short_streams(channel, 20) for _ in range(concurrency)))  # warm-up
    # CPU time, not wall time: on a shared machine the wall clock counts other processes.
    profiler = cProfile.Profile(time.process_time) if profile else None
    if profiler is not None:
        profiler.enable()
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(short_streams(channel, per_task, numbers) for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    channel.close()
    done = per_task * concurrency
    return {"streams": done, "seconds": elapsed, "us_per_stream": cpu / done * 1e6}


class _FakeServer(asyncio.AbstractServer):
    """A listening server that is not there (grpclib.testing's _Server)."""

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def is_serving(self) -> bool:
        return True

    async def start_serving(self) -> None:
        pass

    async def serve_forever(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--numbers", type=int, default=NUMBERS, help="per stream")
    parser.add_argument("--rounds", type=int, default=3, help="runs; the best is reported")
    parser.add_argument("--profile", help="write a cProfile of the last round here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = []
    for index in range(args.rounds):
        last = index == args.rounds - 1
        profile = args.profile if last else None
        results.append(asyncio.run(run(args.streams, args.concurrency, profile, args.numbers)))
    best = min(results, key=lambda r: r["us_per_stream"])
    if args.json:
        print(json.dumps({"best": best, "rounds": results}))
    else:
        rounds = ", ".join(f"{r['us_per_stream']:.1f}" for r in results)
        print(f"{best['us_per_stream']:.1f} us per short stream (best of {rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
