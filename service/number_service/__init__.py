"""NumberService on grpclib: server, typed client library, CLI and pytest plugin.

The serving layer it is built on, which would serve any betterproto2 service, is
:mod:`number_service.serving`.
"""

from .accumulator import INT32_MAX, INT32_MIN, Accumulator, SumOutOfRangeError, check_int32
from .client import NumberClient, Resume, Retry, Session
from .codec import NumberCodec
from .server import NumberServer, ServeConfig, build_server, create_server, serve
from .service import ACCUMULATE_NUMBERS, NumberService
from .serving import Limits, Serving, TLSConfig, client_context, server_context

__all__ = [
    "ACCUMULATE_NUMBERS",
    "INT32_MAX",
    "INT32_MIN",
    "Accumulator",
    "Limits",
    "NumberClient",
    "NumberCodec",
    "NumberServer",
    "NumberService",
    "Resume",
    "Retry",
    "ServeConfig",
    "Serving",
    "Session",
    "SumOutOfRangeError",
    "TLSConfig",
    "build_server",
    "check_int32",
    "client_context",
    "create_server",
    "serve",
    "server_context",
]
