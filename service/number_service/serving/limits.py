"""Resource limits of a server: every limit, its default and its validation.

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
  (:meth:`Limits.connection_limits`).

With grpclib or h2 releases the extensions were not written for, the server is plain
grpclib's and only keepalive applies. Keepalive pings (and closing a peer that does
not answer them) are grpclib's own, configured by :meth:`Limits.grpclib_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpclib.config import Configuration

from .grpclib_ext import ConnectionLimits, StreamLimits

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # gRPC's default maximum received message
DEFAULT_MAX_CONCURRENT_STREAMS = 100  # h2's and grpclib's until now; gRPC core's too
DEFAULT_MAX_CONNECTIONS = 1000  # below the usual `ulimit -n` of 1024
DEFAULT_KEEPALIVE_TIME = 300.0  # seconds between pings on each connection
DEFAULT_KEEPALIVE_TIMEOUT = 20.0  # seconds for a ping's answer; gRPC's default
DEFAULT_IDLE_TIMEOUT = None  # off, as gRPC's MaxConnectionIdle: see Limits.idle_timeout
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS client has to finish its handshake


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

    def __post_init__(self) -> None:
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 (there is no off)")
        if not 1 <= self.max_concurrent_streams <= 2**31 - 1:
            raise ValueError("max_concurrent_streams must be 1 to 2147483647")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1 (None: no cap)")
        for name in (
            "keepalive_time",
            "keepalive_timeout",
            "idle_timeout",
            "stream_idle_timeout",
            "tls_handshake_timeout",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (None: off)")

    def stream_limits(self) -> StreamLimits:
        """The limits every stream enforces itself."""
        return StreamLimits(
            max_message_size=self.max_message_size, idle_timeout=self.stream_idle_timeout
        )

    def connection_limits(self) -> ConnectionLimits:
        """The limits every connection enforces."""
        return ConnectionLimits(
            max_connections=self.max_connections,
            max_concurrent_streams=self.max_concurrent_streams,
            idle_timeout=self.idle_timeout,
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
