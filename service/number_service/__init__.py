"""NumberService on grpclib: server, typed client library, CLI and pytest plugin."""

from .accumulator import INT32_MAX, INT32_MIN, Accumulator, SumOutOfRangeError, check_int32
from .client import NumberClient, Retry, Session
from .service import ACCUMULATE_NUMBERS, NumberService
from .serving.run import NumberServer, ServeConfig, create_server, serve
from .serving.tls import TLSConfig, client_context, server_context

__all__ = [
    "ACCUMULATE_NUMBERS",
    "INT32_MAX",
    "INT32_MIN",
    "Accumulator",
    "NumberClient",
    "NumberServer",
    "NumberService",
    "Retry",
    "ServeConfig",
    "Session",
    "SumOutOfRangeError",
    "TLSConfig",
    "check_int32",
    "client_context",
    "create_server",
    "serve",
    "server_context",
]
