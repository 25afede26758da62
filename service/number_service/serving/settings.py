"""The settings of :class:`.run.ServeConfig` and :class:`.limits.Limits`: their
defaults (those that are not off), and the command-line flag that sets each
(:func:`flag`), in a module that imports nothing.

They live apart from those classes, and from the click options of
:mod:`.options`, so that any module of the layer can name a flag in a status or a
log line ("raise --max-message-size"), ``grpclib_ext`` included, without importing
click or, in a cycle, the modules that enforce the limits.
"""

from __future__ import annotations

# ServeConfig
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_GRACE = 10.0
DEFAULT_NAME = "grpc-server"

# Limits
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # gRPC's default maximum received message
DEFAULT_MAX_CONCURRENT_STREAMS = 100  # h2's and grpclib's until now; gRPC core's too
DEFAULT_MAX_CONNECTIONS = 1000  # below the usual `ulimit -n` of 1024
DEFAULT_KEEPALIVE_TIME = 300.0  # seconds between pings on each connection
DEFAULT_KEEPALIVE_TIMEOUT = 20.0  # seconds for a ping's answer; gRPC's default
DEFAULT_IDLE_TIMEOUT = None  # off, as gRPC's MaxConnectionIdle: see Limits.idle_timeout
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS client has to finish its handshake
# Flood limits, after Envoy's http2_protocol_options and grpc-go's ping policy.
DEFAULT_MAX_EMPTY_FRAMES = 1  # Envoy's max_consecutive_inbound_frames_with_empty_payload
DEFAULT_MAX_PRIORITY_FRAMES = 100  # Envoy's max_inbound_priority_frames_per_stream
DEFAULT_MAX_WINDOW_UPDATES = 10  # Envoy's max_inbound_window_update_frames_per_data_frame_sent
DEFAULT_MIN_PING_INTERVAL = 300.0  # grpc-go's keepalive.EnforcementPolicy MinTime (5 min)
DEFAULT_MAX_SETTINGS = 10  # SETTINGS frames with no data sent in between
DEFAULT_MAX_RESETS = 100  # streams reset before they are answered (Rapid Reset)
DEFAULT_FLOOD_COOLDOWN = 1.0  # seconds an address is refused after its first flood cut
DEFAULT_MAX_QUEUED_CONTROL_FRAMES = 1000  # Envoy's max_outbound_control_frames
DEFAULT_MAX_FRAMES_PER_TURN = 100  # frames of one connection handed to h2 per loop turn
DEFAULT_MAX_MESSAGES_PER_TURN = 64  # requests one connection's streams take per loop turn
DEFAULT_MAX_CONNECTION_BUFFER = 16 * 1024 * 1024  # request bytes held per connection
DEFAULT_MAX_PROCESS_BUFFER = 256 * 1024 * 1024  # request bytes held by all connections


def flag(setting: str) -> str:
    """The command-line flag of ``setting`` (a ServeConfig or Limits field), for a
    message that tells a person what to change: ``flag("max_connections")`` is
    ``"--max-connections"``. Every serve command built with :mod:`.options` has it
    (its table derives each flag from this; tests/test_options.py checks the names)."""
    return "--" + setting.replace("_", "-")
