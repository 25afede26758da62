"""The gRPC side of NumberService: the generated base bound to the accumulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from number_service_gen.tutorial import NumberRequest, NumberResponse, NumberServiceBase

from .accumulator import Accumulator, SumOutOfRangeError

#: Full method path on the wire, identical to the Go original's.
ACCUMULATE_NUMBERS = "/tutorial.NumberService/AccumulateNumbers"


class NumberService(NumberServiceBase):
    """Answers every request on a stream with the sum so far; streams share nothing.

    This is the only code that decides sums, overflow and per-stream errors, on every
    path. How requests are read and answers written (in batches, within limits) is
    the serving layer's business (``number_service.serving``), not this class's.
    """

    async def accumulate_numbers(
        self, messages: AsyncIterator[NumberRequest]
    ) -> AsyncIterator[NumberResponse]:
        acc = Accumulator()
        async for request in messages:
            num = request.num
            if type(num) is not int:  # betterproto2's own codec reads a list for some bytes
                raise GRPCError(
                    Status.INTERNAL,
                    "request could not be decoded as tutorial.NumberRequest: num is not an int32",
                )
            try:
                total = acc.add(num)
            except SumOutOfRangeError as err:
                raise GRPCError(Status.OUT_OF_RANGE, str(err)) from None
            yield NumberResponse(sum=total)
