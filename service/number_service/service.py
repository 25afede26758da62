"""The gRPC side of NumberService: the generated base bound to the accumulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpclib.const import Handler
from grpclib.exceptions import GRPCError, StreamTerminatedError

from number_service_gen.tutorial import NumberRequest, NumberResponse, NumberServiceBase

from . import statuses
from .accumulator import Accumulator, SumOutOfRangeError
from .fastpath import BatchedAccumulate

#: Full method path on the wire, identical to the Go original's.
ACCUMULATE_NUMBERS = "/tutorial.NumberService/AccumulateNumbers"

_YIELD_EVERY = 32  # responses between two turns given to the event loop


class NumberService(NumberServiceBase):
    """Answers every request on a stream with the sum so far; streams share nothing."""

    def __init__(
        self,
        *,
        stream_idle_timeout: float | None = None,
        batched: BatchedAccumulate | None = None,
    ) -> None:
        """``stream_idle_timeout``: end a stream that sends no request for this many
        seconds with DEADLINE_EXCEEDED (None: wait as long as the client likes).

        ``batched``: serve AccumulateNumbers with this batched handler (fastpath.py)
        when the server's codec is NumberCodec, instead of the generated handler and
        :meth:`accumulate_numbers`; ``NumberServer.build`` does. It bypasses grpclib's
        RecvMessage/SendMessage events: its ``count`` reports the messages instead.
        """
        self.stream_idle_timeout = stream_idle_timeout
        self.batched = batched

    def __mapping__(self) -> dict[str, Handler]:
        mapping = super().__mapping__()
        if self.batched is not None:
            generated = mapping[ACCUMULATE_NUMBERS]
            fast = self.batched.handler(generated.func)
            mapping[ACCUMULATE_NUMBERS] = generated._replace(func=fast)
        return mapping

    async def accumulate_numbers(
        self, messages: AsyncIterator[NumberRequest]
    ) -> AsyncIterator[NumberResponse]:
        # The generated handler sends each yielded response before this generator
        # resumes, so every answer goes out before the next request is read.
        acc = Accumulator()
        answered = 0
        requests = _decoded(messages, self.stream_idle_timeout)
        async for request in requests:
            num = request.num
            if type(num) is not int:  # betterproto2's lenient decoder can give a list
                raise statuses.undecodable("num is not an int32")
            try:
                total = acc.add(num)
            except SumOutOfRangeError as err:
                raise statuses.out_of_range(err) from None
            yield NumberResponse(sum=total)
            answered += 1
            if answered % _YIELD_EVERY == 0:
                # With requests buffered and send window open, grpclib's awaits all
                # complete at once: without this, one pipelined stream could hold
                # the event loop (other streams, cancellation) for seconds.
                await asyncio.sleep(0)


async def _decoded(
    requests: AsyncIterator[NumberRequest], idle_timeout: float | None = None
) -> AsyncIterator[NumberRequest]:
    """Yield requests; turn a request that cannot be read into a gRPC status.

    grpclib decodes each message inside the request iterator and reports any codec
    exception as a bare UNKNOWN with a logged traceback. grpc-go answers INTERNAL
    with a message; so do we, whatever codec the server was built with. Only
    :class:`~number_service.codec.NumberCodec` (used by ``create_server``) judges
    the bytes exactly as Google's parser does.

    With ``idle_timeout``, waiting longer than that for the next request ends the
    stream with DEADLINE_EXCEEDED: the client's own deadline is the usual way for
    a call to time out, so the same status, with a message naming the flag.
    """
    while True:
        try:
            if idle_timeout is None:
                request = await anext(requests)
            else:
                async with asyncio.timeout(idle_timeout):
                    request = await anext(requests)
        except StopAsyncIteration:
            return
        except TimeoutError:
            assert idle_timeout is not None
            raise statuses.idle(idle_timeout) from None
        except (GRPCError, StreamTerminatedError):
            raise
        except NotImplementedError as err:  # grpclib's answer to a compressed message
            raise statuses.compressed(err) from None
        except Exception as err:
            raise statuses.undecodable(err) from None
        yield request
