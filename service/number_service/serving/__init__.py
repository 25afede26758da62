"""The serving layer: serves any betterproto2 service on grpclib, ready for production.

    await serve(lambda: [MyService()], ServeConfig(port=50051, name="my-service"))

Nothing here knows which service it serves: an application (the package around it,
say) uses this layer, never the other way round (an import-linter contract checks it). What grpclib
lacks and a production server needs lives here: batched reads and coalesced writes
per stream, limits, a graceful drain, stream tracking, metrics, logs, health and
reflection, TLS and workers, and the options of a command that serves
(:mod:`.options`: flags, defaults, help, the ServeConfig they make). Every use of
grpclib's and h2's private attributes is in :mod:`.grpclib_ext`.
"""

from .build import Serving
from .codec import StrictCodec
from .grpclib_ext import make_server
from .limits import Limits
from .run import ServeConfig, address_of, bind, serve
from .streams import Servable, StreamRecord, Streams
from .tls import TLSConfig, client_context, server_context

__all__ = [
    "Limits",
    "Servable",
    "ServeConfig",
    "Serving",
    "StreamRecord",
    "Streams",
    "StrictCodec",
    "TLSConfig",
    "address_of",
    "bind",
    "client_context",
    "make_server",
    "serve",
    "server_context",
]
