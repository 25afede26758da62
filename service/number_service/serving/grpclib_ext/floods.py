"""HTTP/2 flood accounting, sans I/O: what one connection's frames cost, and when to stop.

:class:`FrameAccounting` reads the frame headers of what a client sends (before h2
sees it) and of what the server writes, counts what the flood advisories of 2019
and 2023 abuse, and returns a :class:`Verdict` (a GOAWAY error code and the reason)
once a limit of :class:`FloodLimits` is passed. It does no I/O and knows nothing of
h2's or grpclib's internals: :class:`~.connections.Connection` feeds it and turns a
verdict into a GOAWAY, the close and one warning.

It also cuts what a client sends into slices of whole frames, at most
``frames_per_turn`` (a HEADERS frame counting as :data:`HEADERS_COST`) and
:data:`TURN_BYTES` per event-loop turn, so that one connection cannot hold the loop
(the rest waits for the next turn, with reading paused), and refuses a frame longer
than SETTINGS_MAX_FRAME_SIZE as soon as its header arrives (h2 would buffer it whole).

The rules, after Envoy's http2_protocol_options, grpc-go's ping policy and nginx's
and Envoy's answer to Rapid Reset (CVE-2023-44487):

- empty frames: more than ``max_empty_frames`` DATA, HEADERS or CONTINUATION frames
  in a row with no payload and no END_STREAM (CVE-2019-9518);
- PRIORITY: more than ``max_priority_frames`` per stream opened, plus one stream's
  worth (CVE-2019-9513);
- WINDOW_UPDATE: more than 5 + 2 x (streams opened + ``max_window_updates`` x DATA
  frames sent), Envoy's formula;
- PING: a PING less than ``min_ping_interval`` seconds after the previous one, with
  no HEADERS or DATA sent in between, is a strike; more than :data:`PING_STRIKES`
  strikes, grpc-go's ``too_many_pings`` (CVE-2019-9512);
- SETTINGS: more than ``max_settings`` SETTINGS frames with no HEADERS or DATA sent
  in between (CVE-2019-9515);
- resets: streams reset (RST_STREAM, by either side) before the server answered
  them (no HEADERS sent on them; refused and malformed streams too): more than
  ``max_resets``, once they are more than half the streams opened (Rapid Reset,
  CVE-2023-44487; streams the server resets, CVE-2019-9514);
- queued control frames: more than ``max_queued_control_frames`` PING, SETTINGS and
  RST_STREAM frames written while the socket still holds unsent bytes, i.e. while
  the client does not read;
- header blocks of more than h2's :data:`CONTINUATION_BACKLOG` frames (the
  CONTINUATION flood of 2024; h2 would stop there too, with a PROTOCOL_ERROR).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from h2.errors import ErrorCodes
from h2.frame_buffer import CONTINUATION_BACKLOG

from ..settings import flag

PREFACE_SIZE = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", before the first frame
HEADER_SIZE = 9
#: What a HEADERS frame counts for in ``frames_per_turn``: decoding its HPACK block
#: and opening its stream cost h2 ~4 times what a small DATA frame does (measured
#: ~30 us against ~8 us), and a turn's slice should take about as long whatever it holds.
HEADERS_COST = 4
#: Bytes of frames handed to h2 per turn, at most (one frame always goes): h2 and
#: grpclib copy what they are given two or three times, and 100 frames of 16 KiB were
#: ~5 MB of copies per turn, which left the heap fragmented.
TURN_BYTES = 64 * 1024
PING_STRIKES = 2  # grpc-go's maxPingStrikes: the third strike closes the connection
DEFAULT_FRAME_SIZE = 16_384  # SETTINGS_MAX_FRAME_SIZE's initial value, h2's too
STREAMS_KEPT = 10_000  # streams followed at most (h2 allows 100 open; a safety cap)

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PING, WINDOW_UPDATE, CONTINUATION = 0x6, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
_CONTROL = (PING, SETTINGS, RST_STREAM)

# Per-stream state bits.
_ANSWERED, _LOCAL_END, _REMOTE_END = 1, 2, 4


class Verdict(NamedTuple):
    """Why a connection must go: the GOAWAY's error code and a reason naming the limit."""

    code: ErrorCodes
    reason: str


class FloodLimits:
    """What one connection's frames may be; None: that rule is off."""

    __slots__ = (
        "frames_per_turn",
        "max_empty_frames",
        "max_priority_frames",
        "max_queued_control_frames",
        "max_resets",
        "max_settings",
        "max_window_updates",
        "min_ping_interval",
    )

    def __init__(
        self,
        *,
        max_empty_frames: int | None = None,
        max_priority_frames: int | None = None,
        max_window_updates: int | None = None,
        min_ping_interval: float | None = None,
        max_settings: int | None = None,
        max_resets: int | None = None,
        max_queued_control_frames: int | None = None,
        frames_per_turn: int | None = None,
    ) -> None:
        self.max_empty_frames = max_empty_frames  # in a row
        self.max_priority_frames = max_priority_frames  # per stream opened
        self.max_window_updates = max_window_updates  # per DATA frame sent
        self.min_ping_interval = min_ping_interval  # seconds, without data sent
        self.max_settings = max_settings  # without data sent
        self.max_resets = max_resets  # on streams not answered
        self.max_queued_control_frames = max_queued_control_frames
        self.frames_per_turn = frames_per_turn  # frames handed to h2 per loop turn


class Take(NamedTuple):
    """What :meth:`FrameAccounting.received` allows of the bytes it was given."""

    end: int  # bytes from the start that are whole frames to hand to h2 now
    more: bool  # whole frames are left after ``end``: hand them on a later turn
    verdict: Verdict | None  # a frame at ``end`` broke a limit: close instead


class FrameAccounting:
    """The flood accounting of one connection (see the module)."""

    def __init__(
        self,
        limits: FloodLimits,
        *,
        max_frame_size: int = DEFAULT_FRAME_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.max_frame_size = max_frame_size  # what the server accepts (its SETTINGS)
        self.clock = clock
        self.verdict: Verdict | None = None  # the first limit broken, if any
        self.frames = 0  # frames received, in all
        self.received_bytes = 0  # their bytes, headers included
        self.opened = 0  # streams the client opened
        self.data_sent = 0  # DATA frames the server sent
        self.resets = 0  # RST_STREAM on streams not answered, either way
        self._preface = PREFACE_SIZE  # bytes of the preface still to come
        self._highest = 0  # the highest stream id the client opened
        self._streams: dict[int, int] = {}  # open streams: state bits
        self._empty = 0  # empty frames in a row
        self._priority = 0
        self._window_updates = 0
        self._strikes = 0
        self._last_ping: float | None = None
        self._settings = 0  # SETTINGS since the server last sent HEADERS or DATA
        self._block = 0  # frames of the header block in progress (0: none)
        self._queued = 0  # control frames written while the socket was not drained
        self._out_skip = 0  # bytes of an outbound frame's payload still to come
        self._out_head = b""  # an outbound frame header cut by the end of a write

    # --- what the client sends -----------------------------------------------------------

    def received(self, data: bytes | bytearray | memoryview) -> Take:
        """Account the whole frames at the start of ``data`` (which starts where the
        last call's ``end`` was), at most ``frames_per_turn`` of them."""
        if self.verdict is not None:
            return Take(0, False, self.verdict)
        size = len(data)
        pos = 0
        if self._preface:
            pos = min(self._preface, size)
            self._preface -= pos
            if self._preface:
                return Take(pos, False, None)
        budget = self.limits.frames_per_turn
        count = 0
        start = pos
        while size - pos >= HEADER_SIZE:
            if budget is not None and (count >= budget or pos - start >= TURN_BYTES):
                return Take(pos, self._whole_frame_at(data, pos), None)
            length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            if length > self.max_frame_size:
                return self._cut(
                    pos,
                    ErrorCodes.FRAME_SIZE_ERROR,
                    f"a frame of {length} bytes, over SETTINGS_MAX_FRAME_SIZE "
                    f"{self.max_frame_size}",
                )
            if size - pos - HEADER_SIZE < length:
                break
            kind = data[pos + 3]
            flags = data[pos + 4]
            if kind == DATA and not flags and length:  # most frames: what _frame does
                self.frames += 1
                self._empty = 0
            else:
                stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
                payload = length
                if flags & PADDED and kind in (DATA, HEADERS) and length:
                    payload -= 1 + data[pos + HEADER_SIZE]
                verdict = self._frame(kind, flags, stream_id, payload)
                if verdict is not None:
                    return Take(pos, False, verdict)
            pos += HEADER_SIZE + length
            self.received_bytes += HEADER_SIZE + length
            count += HEADERS_COST if kind == HEADERS else 1
        return Take(pos, False, None)

    def _whole_frame_at(self, data: bytes | bytearray | memoryview, pos: int) -> bool:
        length = int.from_bytes(data[pos : pos + 3], "big")
        return len(data) - pos >= HEADER_SIZE + min(length, self.max_frame_size + 1)

    def _cut(self, pos: int, code: ErrorCodes, reason: str) -> Take:
        self.verdict = Verdict(code, reason)
        return Take(pos, False, self.verdict)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: int) -> Verdict | None:
        """Account one inbound frame; the verdict if it breaks a limit."""
        self.frames += 1
        limits = self.limits
        if kind in (DATA, HEADERS, CONTINUATION):
            if kind == HEADERS and flags & PRIORITY_FLAG:
                payload -= 5
            if payload <= 0 and not (kind != CONTINUATION and flags & END_STREAM):
                self._empty += 1
                limit = limits.max_empty_frames
                if limit is not None and self._empty > limit:
                    return self._broken(
                        f"{self._empty} empty frames in a row ({flag('max_empty_frames')} {limit})"
                    )
            else:
                self._empty = 0
            if kind == HEADERS:
                self._headers(flags, stream_id)
            elif kind == CONTINUATION:
                if self._block:
                    self._block += 1
                    if self._block > CONTINUATION_BACKLOG:
                        return self._broken(
                            f"a header block of more than {CONTINUATION_BACKLOG} frames "
                            "(h2's limit)"
                        )
                if flags & END_HEADERS:
                    self._block = 0
            elif flags & END_STREAM:
                self._end(stream_id, _REMOTE_END)
        elif kind == PRIORITY:
            self._priority += 1
            limit = limits.max_priority_frames
            if limit is not None and self._priority > limit * (1 + self.opened):
                return self._broken(
                    f"{self._priority} PRIORITY frames for {self.opened} streams "
                    f"({flag('max_priority_frames')} {limit} per stream)"
                )
        elif kind == WINDOW_UPDATE:
            self._window_updates += 1
            limit = limits.max_window_updates
            allowed = 5 + 2 * (self.opened + (limit or 0) * self.data_sent)
            if limit is not None and self._window_updates > allowed:
                return self._broken(
                    f"{self._window_updates} WINDOW_UPDATE frames for {self.data_sent} "
                    f"DATA frames sent ({flag('max_window_updates')} {limit} per DATA frame)"
                )
        elif kind == PING and not flags & ACK:
            interval = limits.min_ping_interval
            if interval is not None:
                now = self.clock()
                if self._last_ping is not None and now - self._last_ping < interval:
                    self._strikes += 1
                    if self._strikes > PING_STRIKES:
                        return self._broken(
                            f"too_many_pings: {self._strikes + 1} PINGs less than "
                            f"{interval:g} s apart with no data sent "
                            f"({flag('min_ping_interval')} {interval:g})"
                        )
                self._last_ping = now
        elif kind == SETTINGS and not flags & ACK:
            self._settings += 1
            limit = limits.max_settings
            if limit is not None and self._settings > limit:
                return self._broken(
                    f"{self._settings} SETTINGS frames with no data sent "
                    f"({flag('max_settings')} {limit})"
                )
        elif kind == RST_STREAM:
            # Once per stream: after a reset, each frame still in flight on it makes
            # the other side's h2 answer RST_STREAM again, a normal race.
            state = self._streams.pop(stream_id, None)
            if state is not None and not state & _ANSWERED:
                return self._reset()
        return None

    def _headers(self, flags: int, stream_id: int) -> None:
        if not flags & END_HEADERS:
            self._block = 1
        if stream_id > self._highest and stream_id % 2:
            self._highest = stream_id
            self.opened += 1
            streams = self._streams
            if len(streams) >= STREAMS_KEPT:
                del streams[next(iter(streams))]
            streams[stream_id] = _REMOTE_END if flags & END_STREAM else 0
        elif flags & END_STREAM:
            self._end(stream_id, _REMOTE_END)

    def _end(self, stream_id: int, side: int) -> None:
        state = self._streams.get(stream_id)
        if state is None:
            return
        state |= side
        if state & _LOCAL_END and state & _REMOTE_END:
            del self._streams[stream_id]
        else:
            self._streams[stream_id] = state

    def _reset(self) -> Verdict | None:
        self.resets += 1
        limit = self.limits.max_resets
        if limit is not None and self.resets > limit and 2 * self.resets > self.opened:
            return self._broken(
                f"{self.resets} streams reset before they were answered, of "
                f"{self.opened} opened ({flag('max_resets')} {limit})"
            )
        return None

    def _broken(self, reason: str) -> Verdict:
        self.verdict = Verdict(ErrorCodes.ENHANCE_YOUR_CALM, reason)
        return self.verdict

    # --- what the server sends ------------------------------------------------------------

    def sent(self, data: bytes, *, unsent: int = 0) -> Verdict | None:
        """Account the frames of one write to the socket; ``unsent`` is what the
        socket's buffer held after it (not 0: the client is not reading)."""
        if self.verdict is not None:
            return self.verdict
        view = memoryview(data)
        pos = min(self._out_skip, len(view))
        self._out_skip -= pos
        if self._out_head:
            view = memoryview(self._out_head + data[pos:])
            pos = 0
            self._out_head = b""
        size = len(view)
        control = 0
        verdict = None
        while pos < size:
            if size - pos < HEADER_SIZE:
                self._out_head = bytes(view[pos:])
                break
            length = int.from_bytes(view[pos : pos + 3], "big")
            kind = view[pos + 3]
            flags = view[pos + 4]
            stream_id = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            if kind in (DATA, HEADERS):
                if kind == DATA:
                    self.data_sent += 1
                self._strikes = 0
                self._last_ping = None
                self._settings = 0
                state = self._streams.get(stream_id)
                if state is not None:
                    self._streams[stream_id] = state | _ANSWERED
                    if flags & END_STREAM:
                        self._end(stream_id, _LOCAL_END)
            elif kind in _CONTROL:
                control += 1
                if kind == RST_STREAM:
                    state = self._streams.pop(stream_id, None)
                    if state is not None and not state & _ANSWERED:
                        verdict = verdict or self._reset()
            end = pos + HEADER_SIZE + length
            if end > size:
                self._out_skip = end - size
            pos = end
        if unsent:
            self._queued += control
            limit = self.limits.max_queued_control_frames
            if limit is not None and self._queued > limit and verdict is None:
                verdict = self._broken(
                    f"{self._queued} control frames queued for a client that does not "
                    f"read ({flag('max_queued_control_frames')} {limit})"
                )
        else:
            self._queued = 0
        return verdict
