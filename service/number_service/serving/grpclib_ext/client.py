"""Client-side workarounds: what a grpclib client call knows but does not say publicly.

Private attributes used here, with what each stands in for:

- ``grpclib.client.Stream._maybe_raise()``: the status in trailers the server sent
  before it reset the stream. grpclib then raises "Stream reset by remote party" from
  ``send_message``, ``recv_message`` and ``recv_trailing_metadata`` alike, though the
  trailers were received; grpclib #75 fixed this for ``recv_initial_metadata`` only,
  and its own ``Stream.__aexit__`` reads such trailers with this method.
- ``grpclib.client.Stream._stream._h2_connection``: whether the call's connection got
  a GOAWAY. grpclib says "Connection lost" even then, if the close that follows the
  GOAWAY is read before the call's task runs (its second reason overwrites the
  first), and has no public way to ask.

With releases other than :data:`~.WRITTEN_FOR`,
each function gives what plain grpclib tells: no status, no GOAWAY.
"""

from __future__ import annotations

from typing import Any

from grpclib.client import Stream
from grpclib.exceptions import GRPCError
from h2.connection import ConnectionState

from . import mismatch


def servers_status(call: Stream[Any, Any]) -> GRPCError | None:
    """The non-OK status in trailers the server sent on ``call``, if any came.

    A server ends a stream the client still sends on with trailers and then
    RST_STREAM (gRPC's HTTP/2 protocol); grpclib reports the reset, not the status.
    """
    if mismatch() is not None:
        return None
    try:
        call._maybe_raise()
    except GRPCError as err:
        return err
    return None


def goaway_received(call: Stream[Any, Any] | None) -> bool:
    """Whether the connection of ``call`` got a GOAWAY: h2 is CLOSED only after a
    GOAWAY, sent or received, and a grpclib client never sends one."""
    if call is None or mismatch() is not None:
        return False
    h2 = getattr(getattr(call, "_stream", None), "_h2_connection", None)
    return h2 is not None and h2.state_machine.state is ConnectionState.CLOSED
