"""An OTLP/gRPC trace receiver that counts spans: the far end of a benchmark with tracing on.

    python -m benchmarks.otlp_sink --port 4317

Serves opentelemetry-proto's TraceService on grpcio (both dev dependencies), on
127.0.0.1 only, and answers every export at once, so that a traced server under
load pays for making, batching, encoding and sending its spans, as it would with a
real collector, and nothing more. It prints ``listening on 127.0.0.1:PORT`` on
stderr when ready and, on SIGTERM or SIGINT, the spans and exports it received on
stdout (one JSON line), then stops. With ``--seconds`` it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

HOST = "127.0.0.1"


class Counter(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts the spans of every export request, and answers it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans = 0
        self.exports = 0

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        spans = sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        with self.lock:
            self.spans += spans
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    args = parser.parse_args(argv)
    counter = Counter()
    executor = ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{HOST}:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {HOST}:{port}", file=sys.stderr, flush=True)
    stop.wait(args.seconds)
    server.stop(grace=1.0).wait(5.0)
    executor.shutdown(wait=True, cancel_futures=True)
    print(json.dumps({"spans": counter.spans, "exports": counter.exports}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
