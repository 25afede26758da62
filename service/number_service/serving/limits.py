"""Resource limits of a server: every limit and its validation (the defaults are
``settings.py``'s; the flags that set them, ``options.py``'s).

:class:`Limits` holds them; the grpclib extensions enforce them (grpclib 0.4.9 has
no knob for any of them except keepalive, whose options are experimental and
underscore-named):

- every stream (``grpclib_ext.BatchingStream``) answers a request message over
  ``max_message_size`` with RESOURCE_EXHAUSTED as soon as its 5-byte gRPC length
  prefix arrives, so the body is never decoded; and ends a stream that sends no
  request for ``stream_idle_timeout`` seconds (:meth:`Limits.stream_limits`);
- every connection (``grpclib_ext.Connection``) is refused over ``max_connections``
  with a GOAWAY, advertises ``max_concurrent_streams`` in the server's HTTP/2
  SETTINGS (a stream over it gets RST_STREAM REFUSED_STREAM), and is closed with a
  GOAWAY once it has had no stream for ``idle_timeout`` seconds
  (:meth:`Limits.connection_limits`);
- every connection also defends against HTTP/2 floods (``grpclib_ext.floods``): it
  hands h2 at most ``max_frames_per_turn`` frames per event-loop turn (fairness
  between connections), and closes a connection that breaks a flood limit with a
  GOAWAY ENHANCE_YOUR_CALM and one warning: empty frames, PRIORITY, WINDOW_UPDATE,
  PING and SETTINGS floods, streams reset before they are answered (Rapid Reset),
  control frames queued for a client that does not read (:meth:`Limits.flood_limits`);
  and then refuses new connections from that address for ``flood_cooldown`` seconds,
  doubling with each further cut (``grpclib_ext/cooldown.py``);
- every stream counts the request bytes it holds (received, not yet handed to the
  handler, a partial message included) against a budget of its connection
  (``max_connection_buffer``) and of the process (``max_process_buffer``): a
  stream whose bytes would go over either ends with RESOURCE_EXHAUSTED and frees
  them. What the client may send beyond that is HTTP/2 flow control's: grpclib's
  windows, 4 MiB per connection.

With grpclib or h2 releases the extensions were not written for, the server is plain
grpclib's and only keepalive applies. Keepalive pings (and closing a peer that does
not answer them) are grpclib's own, configured by :meth:`Limits.grpclib_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpclib.config import Configuration

from .grpclib_ext import ConnectionLimits, FloodLimits, StreamLimits
from .settings import (
    DEFAULT_FLOOD_COOLDOWN,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEPALIVE_TIME,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTION_BUFFER,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_EMPTY_FRAMES,
    DEFAULT_MAX_FRAMES_PER_TURN,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_MESSAGES_PER_TURN,
    DEFAULT_MAX_PRIORITY_FRAMES,
    DEFAULT_MAX_PROCESS_BUFFER,
    DEFAULT_MAX_QUEUED_CONTROL_FRAMES,
    DEFAULT_MAX_RESETS,
    DEFAULT_MAX_SETTINGS,
    DEFAULT_MAX_WINDOW_UPDATES,
    DEFAULT_MIN_PING_INTERVAL,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
)


@dataclass(frozen=True)
class Limits:
    """Every resource limit of a server; None turns an optional one off."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # bytes of one request message
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS  # per connection
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS  # open at once, per process
    keepalive_time: float | None = DEFAULT_KEEPALIVE_TIME  # seconds between pings
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT  # close if the ping's ACK is late
    # Close a connection without streams after this long. Off by default: a grpclib
    # client (ours too) fails a call that races with that close, where grpcio and
    # grpc-go retry it; keepalive reaps dead and silent peers anyway.
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    stream_idle_timeout: float | None = None  # end a stream with no request for this long
    # Under TLS: close a connection whose TLS handshake is not done after this long
    # (asyncio's ssl_handshake_timeout). Such a connection is not yet counted by
    # max_connections nor seen by keepalive: both start once the handshake is done.
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    # HTTP/2 flood limits of each connection (see grpclib_ext/floods.py for the rules).
    max_empty_frames: int | None = DEFAULT_MAX_EMPTY_FRAMES  # in a row
    max_priority_frames: int | None = DEFAULT_MAX_PRIORITY_FRAMES  # per stream opened
    max_window_updates: int | None = DEFAULT_MAX_WINDOW_UPDATES  # per DATA frame sent
    min_ping_interval: float | None = DEFAULT_MIN_PING_INTERVAL  # seconds, without data
    max_settings: int | None = DEFAULT_MAX_SETTINGS  # without data sent
    max_resets: int | None = DEFAULT_MAX_RESETS  # streams reset before an answer
    # Seconds new connections from an address whose connection was cut for a flood
    # are refused; doubled for each further cut within 5 min, 60 s at most.
    flood_cooldown: float | None = DEFAULT_FLOOD_COOLDOWN
    max_queued_control_frames: int | None = DEFAULT_MAX_QUEUED_CONTROL_FRAMES
    max_frames_per_turn: int | None = DEFAULT_MAX_FRAMES_PER_TURN
    max_messages_per_turn: int | None = DEFAULT_MAX_MESSAGES_PER_TURN  # all its streams'
    # Request bytes held (received, not yet handed to a handler), per connection and
    # per process; a stream that would go over ends with RESOURCE_EXHAUSTED.
    max_connection_buffer: int | None = DEFAULT_MAX_CONNECTION_BUFFER
    max_process_buffer: int | None = DEFAULT_MAX_PROCESS_BUFFER

    def __post_init__(self) -> None:
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 (there is no off)")
        if not 1 <= self.max_concurrent_streams <= 2**31 - 1:
            raise ValueError("max_concurrent_streams must be 1 to 2147483647")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1 (None: no cap)")
        for name in (
            "max_empty_frames",
            "max_priority_frames",
            "max_window_updates",
            "max_settings",
            "max_resets",
            "max_queued_control_frames",
            "max_frames_per_turn",
            "max_messages_per_turn",
            "max_connection_buffer",
            "max_process_buffer",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number, at least 1 (None: off)")
        for name in (
            "min_ping_interval",
            "keepalive_time",
            "keepalive_timeout",
            "idle_timeout",
            "stream_idle_timeout",
            "tls_handshake_timeout",
            "flood_cooldown",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (None: off)")

    def stream_limits(self) -> StreamLimits:
        """The limits every stream enforces itself."""
        return StreamLimits(
            max_message_size=self.max_message_size,
            idle_timeout=self.stream_idle_timeout,
            max_connection_buffer=self.max_connection_buffer,
            max_process_buffer=self.max_process_buffer,
            messages_per_turn=self.max_messages_per_turn,
        )

    def connection_limits(self) -> ConnectionLimits:
        """The limits every connection enforces."""
        return ConnectionLimits(
            max_connections=self.max_connections,
            max_concurrent_streams=self.max_concurrent_streams,
            idle_timeout=self.idle_timeout,
            floods=self.flood_limits(),
            cooldown=self.flood_cooldown,
        )

    def flood_limits(self) -> FloodLimits:
        """The HTTP/2 flood limits every connection enforces."""
        return FloodLimits(
            max_empty_frames=self.max_empty_frames,
            max_priority_frames=self.max_priority_frames,
            max_window_updates=self.max_window_updates,
            min_ping_interval=self.min_ping_interval,
            max_settings=self.max_settings,
            max_resets=self.max_resets,
            max_queued_control_frames=self.max_queued_control_frames,
            frames_per_turn=self.max_frames_per_turn,
        )

    def grpclib_config(self) -> Configuration:
        """grpclib's Configuration with our keepalive: ping every ``keepalive_time``
        seconds, with or without streams, and close a connection whose peer does
        not answer within ``keepalive_timeout``.

        grpclib's other defaults would stop pinging after two pings without data
        sent, and leave 300 s between pings; either would let a dead peer of a
        silent stream go unnoticed, so both are lifted.
        """
        if self.keepalive_time is None:
            # grpclib's server default would ping every 2 h; off means off.
            return Configuration(_keepalive_time=None)
        return Configuration(
            _keepalive_time=self.keepalive_time,
            _keepalive_timeout=self.keepalive_timeout,
            _keepalive_permit_without_calls=True,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=self.keepalive_time,
        )
