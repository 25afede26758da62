"""grpclib's server request handler, serving every stream with :class:`BatchingStream`.

:func:`request_handler` is grpclib 0.4.9's ``grpclib.server.request_handler``
(server.py:368-478) with three changes, each of which could go upstream as it is:

- the stream is a :class:`~.stream.BatchingStream` (batched reads, coalesced writes,
  per-stream limits);
- a request whose deadline is already over when it is handled ends with
  DEADLINE_EXCEEDED; grpclib raises inside ``DeadlineWrapper.start`` before its
  wrapper is armed, so it logs "Timeout occurred" with a traceback and answers UNKNOWN;
- malformed request headers (RFC 9113 sections 8.2 and 8.3.1: a missing, empty,
  repeated or unknown pseudo-header, a pseudo-header after a regular one, an empty
  or upper-case name, a connection-specific header, a NUL, CR or LF in a value, a
  ``:scheme`` other than http or https) get RST_STREAM(PROTOCOL_ERROR) at once:
  grpclib turns h2's header validation off, and a missing ``:method`` or ``:path``
  was a ``KeyError`` traceback and a stream left open.

Its ``Handler`` also forgets each stream's task as soon as it ends: grpclib keeps
done and cancelled tasks until every 10th new stream (``__gc_interval__``), and a
cancelled handler's traceback holds its stream, with every byte it had buffered.

:class:`Handler` is grpclib's per-connection ``Handler`` running that function. grpclib
has no hook for either, so both use its private parts as its own do: its module
function ``grpclib.server._abort`` (the error answers), the events dispatcher class
``grpclib.events._DispatchServerEvents``, and ``Handler._tasks`` (the stream tasks
its ``cancel`` and ``close`` use) and ``_cancelled`` (those cancelled, which its
``wait_closed`` waits for).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from grpclib import const, protocol
from grpclib import server as grpclib_server
from grpclib.const import Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import _DispatchServerEvents
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.metadata import Deadline, decode_metadata
from grpclib.utils import Wrapper
from h2.errors import ErrorCodes

from .lean import LeanWrapper
from .stream import BatchingStream, Budget, Counter, StreamLimits, Turn

log = logging.getLogger("grpclib.server")  # grpclib's own logger, as its handler's

_Headers = list[tuple[str, str]]
GRPC_CONTENT_TYPE = "application/grpc"


async def request_handler(
    mapping: dict[str, const.Handler],
    h2_stream: protocol.Stream,
    headers: _Headers,
    codec: CodecBase,
    status_details_codec: StatusDetailsCodecBase | None,
    dispatch: _DispatchServerEvents,
    release_stream: Callable[[], Any],
    limits: StreamLimits,
    counter: Counter | None,
    budget: Budget | None = None,
    turn: Turn | None = None,
    forget: Callable[[protocol.Stream], None] | None = None,
) -> None:
    """Handle one request (see the module docstring for what differs from grpclib's);
    ``forget(h2_stream)`` is called at the very end, with ``release_stream()``.

    ``headers`` must have passed :func:`malformed` (``Handler.accept`` resets a
    stream whose headers do not, without starting a task for it)."""
    try:
        # The checks are a function of their own: this coroutine's frame lives as
        # long as the stream, and each of its local variables is a slot in it.
        route = _route(mapping, headers, codec)
        # Let the request's header list (h2's decoded name and value strings, ~1.7 KB) go.
        del headers
        if isinstance(route, _Refusal):
            await grpclib_server._abort(h2_stream, *route)
            return
        deadline = route.deadline

        stream: BatchingStream[Any, Any] = BatchingStream(
            h2_stream,
            route.method_name,
            route.handler.cardinality,
            route.handler.request_type,
            route.handler.reply_type,
            codec=codec,
            status_details_codec=status_details_codec,
            dispatch=dispatch,
            deadline=deadline,
            user_agent=route.user_agent,
            limits=limits,
            counter=counter,
            budget=budget,
            turn=turn,
        )
        async with stream:
            # grpclib's Wrapper() or DeadlineWrapper() (their start() is not used).
            wrapper = h2_stream.wrapper = LeanWrapper()
            timer: asyncio.TimerHandle | None = None  # the deadline's, once armed
            try:
                stream.metadata, method_func = await dispatch.recv_request(
                    route.metadata,
                    route.handler.func,
                    method_name=route.method_name,
                    deadline=deadline,
                    content_type=route.content_type,
                    user_agent=route.user_agent,
                    peer=stream.peer,
                )
                del route  # its content-type string, say
                if deadline is not None:
                    remaining = deadline.time_remaining()
                    if not remaining:
                        raise GRPCError(Status.DEADLINE_EXCEEDED, "Deadline exceeded")
                    # DeadlineWrapper.start(deadline) without its generator-based
                    # context manager (~300 B held per open stream): the same timer.
                    timer = asyncio.get_running_loop().call_later(remaining, _expire, wrapper)
                try:
                    with wrapper:
                        try:
                            await method_func(stream)
                        finally:
                            stream.finish()
                finally:
                    if timer is not None:
                        timer.cancel()
            except GRPCError:
                raise
            except TimeoutError:
                if wrapper.cancel_failed:
                    log.exception("Failed to handle cancellation")
                    raise GRPCError(Status.DEADLINE_EXCEEDED) from None
                elif wrapper.cancelled:
                    log.info("Deadline exceeded")
                    raise GRPCError(Status.DEADLINE_EXCEEDED) from None
                else:
                    log.exception("Timeout occurred")
                    raise
            except StreamTerminatedError as err:
                if wrapper.cancel_failed:
                    log.exception("Failed to handle cancellation")
                    raise
                else:
                    assert wrapper.cancelled
                    log.info("Request was cancelled: %s", err)
                    raise
            except Exception:
                log.exception("Application error")
                raise
    except ProtocolError:
        log.exception("Application error")
    except Exception:
        log.exception("Server error")
    finally:
        release_stream()
        if forget is not None:
            forget(h2_stream)


class _Route(NamedTuple):
    """What a stream's request headers say, once they pass :func:`_route`."""

    handler: const.Handler
    method_name: str
    deadline: Deadline | None
    metadata: Any  # grpclib's decode_metadata(headers): a MultiDict
    user_agent: str | None
    content_type: str


class _Refusal(NamedTuple):
    """The answer to a request that is refused: ``grpclib.server._abort``'s arguments."""

    h2_status: int
    grpc_status: Status | None = None
    grpc_message: str | None = None


def _route(
    mapping: dict[str, const.Handler], headers: _Headers, codec: CodecBase
) -> _Route | _Refusal:
    """grpclib's request_handler's checks of the request headers, in its order."""
    headers_map = dict(headers)
    if headers_map[":method"] != "POST":
        return _Refusal(405)
    content_type = headers_map.get("content-type")
    if content_type is None:
        return _Refusal(415, Status.UNKNOWN, "Missing content-type header")
    base_content_type, _, sub_type = content_type.partition("+")
    sub_type = sub_type or ProtoCodec.__content_subtype__
    if base_content_type != GRPC_CONTENT_TYPE or sub_type != codec.__content_subtype__:
        return _Refusal(415, Status.UNKNOWN, "Unacceptable content-type header")
    if headers_map.get("te") != "trailers":
        return _Refusal(400, Status.UNKNOWN, 'Required "te: trailers" header is missing')
    method_name = headers_map[":path"]
    handler = mapping.get(method_name)
    if handler is None:
        return _Refusal(200, Status.UNIMPLEMENTED, "Method not found")
    try:
        deadline = Deadline.from_headers(headers)
    except ValueError:
        return _Refusal(200, Status.UNKNOWN, "Invalid grpc-timeout header")
    return _Route(
        handler,
        method_name,
        deadline,
        decode_metadata(headers),
        headers_map.get("user-agent"),
        content_type,
    )


def _expire(wrapper: Wrapper) -> None:
    """The deadline is over: what grpclib's ``DeadlineWrapper.start`` timer does."""
    wrapper.cancel(TimeoutError("Deadline exceeded"))


_PSEUDO = frozenset((":method", ":scheme", ":path", ":authority"))
_REQUIRED = (":method", ":scheme", ":path")
_SCHEMES = frozenset(("http", "https"))
# Connection-specific header fields (RFC 9113 section 8.2.2); "te" may only say "trailers".
_CONNECTION_SPECIFIC = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade")
)


def malformed(headers: _Headers) -> str | None:
    """What makes request ``headers`` malformed (RFC 9113 sections 8.2, 8.3.1), or
    None. h2 would check most of this, but grpclib turns its validation off (and h2
    makes it a connection error, where a malformed request is a stream error)."""
    pseudo: dict[str, str] = {}
    regular = False
    for name, value in headers:
        if not name:
            return "an empty header name"
        if name[0] == ":":
            if regular:
                return f"{name} after a regular header"
            if name not in _PSEUDO:
                return f"unknown pseudo-header {name}"
            if name in pseudo:
                return f"{name} twice"
            pseudo[name] = value
        else:
            regular = True
            if name != name.lower():
                return f"upper-case header name {name!r}"
            if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
                return f"connection-specific header {name}"
        if "\x00" in value or "\r" in value or "\n" in value:
            return f"NUL, CR or LF in {name}"
    for name in _REQUIRED:
        if name not in pseudo:
            return f"no {name}"
    if not pseudo[":path"] or not pseudo[":method"]:
        return "an empty :path or :method"
    if pseudo[":scheme"] not in _SCHEMES:
        return f":scheme {pseudo[':scheme']!r}"
    return None


class Handler(grpclib_server.Handler):
    """grpclib's per-connection Handler, running :func:`request_handler` for each stream."""

    def __init__(
        self,
        *args: Any,
        limits: StreamLimits,
        counter: Counter | None = None,
        budget: Budget | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.counter = counter
        self.budget = budget  # the request bytes this connection's streams may hold
        per_turn = limits.messages_per_turn
        self.turn = None if per_turn is None else Turn(per_turn)  # their share of a loop turn

    def open_tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks of this connection's streams that are not done, started or not:
        grpclib's ``Handler._tasks``, which it has no public view of (grpclib #148)."""
        return [task for task in self._tasks.values() if not task.done()]

    def accept(
        self,
        stream: protocol.Stream,
        headers: _Headers,
        release_stream: Callable[[], Any],
    ) -> None:
        self.__gc_step__()
        # The one check of the headers (request_handler relies on it): a malformed
        # request gets no task, only its RST_STREAM.
        if malformed(headers) is not None:
            stream.reset_nowait(ErrorCodes.PROTOCOL_ERROR)
            release_stream()
            return
        self._tasks[stream] = self.loop.create_task(
            request_handler(
                self.mapping,
                stream,
                headers,
                self.codec,
                self.status_details_codec,
                self.dispatch,
                release_stream,
                self.limits,
                self.counter,
                self.budget,
                self.turn,
                self._forget,
            )
        )

    def _forget(self, stream: protocol.Stream) -> None:
        """A stream's task is ending (its last step): drop it now, not at grpclib's next
        sweep (and without a done callback, a partial and a list per open stream)."""
        task = asyncio.current_task()
        if self._tasks.get(stream) is task:
            del self._tasks[stream]
        if task is not None:
            self._cancelled.discard(task)

    def cancel(self, stream: protocol.Stream) -> None:
        """grpclib's cancel, for a task that may already be forgotten."""
        task = self._tasks.pop(stream, None)
        if task is not None and not task.done():
            task.cancel()
            self._cancelled.add(task)
            # A task cancelled before its first step never runs its finally (_forget).
            task.add_done_callback(self._cancelled.discard)
