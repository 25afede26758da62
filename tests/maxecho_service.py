"""MaxEcho: a second service, defined only under tests/, served by the serving layer.

It is what someone who copies this project would write for their own proto
(tests/proto/maxecho/maxecho.proto, generated into tests/gen/maxecho_gen by
``./dev regen``): the generated base's async methods, over betterproto2 messages,
and nothing else. How requests are read, answers written, limits kept, streams
drained, counted and logged is the serving layer's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from maxecho_gen.testing.maxecho import EchoReply, EchoRequest, Max, MaxEchoBase, Value

SERVICE = "testing.maxecho.MaxEcho"
RUNNING_MAX = f"/{SERVICE}/RunningMax"
ECHO = f"/{SERVICE}/Echo"
#: Echo's answer to this text is an error status, so that errors can be tested too.
REFUSED = "refuse me"


class MaxEcho(MaxEchoBase):
    """RunningMax answers each value with the largest so far on its stream; Echo
    sends the text back (and refuses :data:`REFUSED` with INVALID_ARGUMENT)."""

    async def running_max(self, messages: AsyncIterator[Value]) -> AsyncIterator[Max]:
        largest: int | None = None
        async for message in messages:
            largest = message.value if largest is None else max(largest, message.value)
            yield Max(max=largest)

    async def echo(self, message: EchoRequest) -> EchoReply:
        if message.text == REFUSED:
            raise GRPCError(Status.INVALID_ARGUMENT, f"text {REFUSED!r} is refused; send another")
        return EchoReply(text=message.text)
