"""The gRPC side of NumberService: the generated base bound to the accumulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from number_service_gen.tutorial import NumberRequest, NumberResponse, NumberServiceBase

from .accumulator import Accumulator, SumOutOfRangeError
from .messages import response

#: Full method path on the wire, identical to the Go original's.
ACCUMULATE_NUMBERS = "/tutorial.NumberService/AccumulateNumbers"

_YIELD_EVERY = 32  # responses between two turns given to the event loop
_UNDECODABLE = "request could not be decoded as tutorial.NumberRequest: "


class NumberService(NumberServiceBase):
    """Answers every request on a stream with the sum so far; streams share nothing."""

    async def accumulate_numbers(
        self, number_request_iterator: AsyncIterator[NumberRequest]
    ) -> AsyncIterator[NumberResponse]:
        # The generated handler sends each yielded response before this generator
        # resumes, so every answer goes out before the next request is read.
        acc = Accumulator()
        answered = 0
        async for request in _decoded(number_request_iterator):
            num = request.num  # once: each betterproto attribute read costs ~1 us
            if type(num) is not int:  # betterproto's own decoder lets this through
                raise GRPCError(Status.INTERNAL, _UNDECODABLE + "num is not an int32")
            try:
                total = acc.add(num)
            except SumOutOfRangeError as err:
                raise GRPCError(Status.OUT_OF_RANGE, str(err)) from None
            yield response(total)  # a NumberResponse(sum=total), built without its hooks
            answered += 1
            if answered % _YIELD_EVERY == 0:
                # With requests buffered and send window open, grpclib's awaits all
                # complete at once: without this, one pipelined stream could hold
                # the event loop (other streams, cancellation) for seconds.
                await asyncio.sleep(0)


async def _decoded(requests: AsyncIterator[NumberRequest]) -> AsyncIterator[NumberRequest]:
    """Yield requests; turn a request that cannot be read into a gRPC status.

    grpclib decodes each message inside the request iterator and reports any codec
    exception as a bare UNKNOWN with a logged traceback. grpc-go answers INTERNAL
    with a message; so do we, whatever codec the server was built with. Only
    :class:`~number_service.codec.NumberCodec` (used by ``create_server``) judges
    the bytes exactly as Google's parser does.
    """
    while True:
        try:
            request = await anext(requests)
        except StopAsyncIteration:
            return
        except (GRPCError, StreamTerminatedError):
            raise
        except NotImplementedError as err:  # grpclib's answer to a compressed message
            raise GRPCError(
                Status.UNIMPLEMENTED, f"request could not be read: {err}; send it uncompressed"
            ) from None
        except Exception as err:
            raise GRPCError(Status.INTERNAL, f"{_UNDECODABLE}{err}") from None
        yield request
