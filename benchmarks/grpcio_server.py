"""NumberService on grpcio's asyncio server (grpc.aio): the benchmark's reference peer.

    python -m benchmarks.grpcio_server --port 0

The same service as ours, written the way a grpcio user would: protobuf classes
generated from proto/ by grpcio-tools (into a temporary directory, at start), the
generated servicer base, an async generator handler. grpcio is a dev dependency
only; this module is never part of the service. It prints ``listening on
127.0.0.1:PORT`` on stderr when ready and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def generate(out: Path) -> tuple[Any, Any]:
    """number_pb2 and number_pb2_grpc, generated into ``out`` and imported."""
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_ROOT / "tutorial" / "number.proto"),
        ]
    )
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with {status}")
    sys.path.insert(0, str(out))
    return (
        importlib.import_module("tutorial.number_pb2"),
        importlib.import_module("tutorial.number_pb2_grpc"),
    )


async def serve(host: str, port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="grpcio-peer-") as tmp:
        pb2, pb2_grpc = generate(Path(tmp))

    class NumberService(pb2_grpc.NumberServiceServicer):  # type: ignore[misc, name-defined]
        async def AccumulateNumbers(  # noqa: N802 (grpcio's generated name)
            self, request_iterator: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[Any]:
            total = 0
            async for request in request_iterator:
                total += request.num
                if not INT32_MIN <= total <= INT32_MAX:
                    await context.abort(grpc.StatusCode.OUT_OF_RANGE, "sum leaves int32")
                yield pb2.NumberResponse(sum=total)

    server = grpc.aio.server()
    pb2_grpc.add_NumberServiceServicer_to_server(NumberService(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
