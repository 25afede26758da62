"""The gRPC statuses that end a stream whose requests cannot be served, worded once.

Both AccumulateNumbers handlers (the generated one in ``service.py``, the batched
one in ``fastpath.py``) and the message-size limit (``limits.py``) answer with
these, so a client sees the same status and message whichever path served it.
"""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .accumulator import SumOutOfRangeError

#: What grpclib says of a compressed message (NotImplementedError), which we echo.
COMPRESSION_NOT_IMPLEMENTED = "Compression not implemented"


def undecodable(reason: object) -> GRPCError:
    """INTERNAL for a request that cannot be read as a NumberRequest (as grpc-go)."""
    return GRPCError(
        Status.INTERNAL, f"request could not be decoded as tutorial.NumberRequest: {reason}"
    )


def compressed(reason: object = COMPRESSION_NOT_IMPLEMENTED) -> GRPCError:
    """UNIMPLEMENTED for a compressed request: the server reads none."""
    return GRPCError(
        Status.UNIMPLEMENTED, f"request could not be read: {reason}; send it uncompressed"
    )


def out_of_range(err: SumOutOfRangeError) -> GRPCError:
    """OUT_OF_RANGE for a sum that would leave int32; the message says the numbers."""
    return GRPCError(Status.OUT_OF_RANGE, str(err))


def too_large(size: int, max_size: int) -> GRPCError:
    """RESOURCE_EXHAUSTED for a request message over the server's limit."""
    return GRPCError(
        Status.RESOURCE_EXHAUSTED,
        f"request message of {size} bytes is larger than the server's limit "
        f"of {max_size} bytes; send smaller messages or raise --max-message-size",
    )


def idle(idle_timeout: float) -> GRPCError:
    """DEADLINE_EXCEEDED for a stream that sent no request for ``idle_timeout`` s."""
    return GRPCError(
        Status.DEADLINE_EXCEEDED,
        f"no request for {idle_timeout:g} s (--stream-idle-timeout); "
        "the sums so far are valid, start a new stream to continue",
    )
