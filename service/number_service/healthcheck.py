"""A gRPC health check client: what ``number-service health`` and a Docker HEALTHCHECK run.

It asks ``grpc.health.v1.Health/Check`` through grpclib's own generated stub, so it
checks exactly what Kubernetes' ``grpc:`` probes and ``grpc_health_probe`` check,
without another binary in the image.
"""

from __future__ import annotations

import os
import socket
import ssl as _ssl

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

DEFAULT_TIMEOUT = 5.0


class UnhealthyError(Exception):
    """The server is not SERVING, or could not be asked; the message says which, in a line."""


async def check(
    host: str,
    port: int,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    *,
    ssl: _ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> None:
    """Return if ``service`` ("" means the whole server) is SERVING; raise UnhealthyError if not.

    ``ssl``: a client context (``tls.client_context``) for a TLS or mTLS server;
    ``server_name``: the name its certificate must be issued for, if not ``host``.
    """
    where = f"{host}:{port}"
    # grpclib's only way to set the TLS server name (its docs say "for testing"; a
    # health check of 127.0.0.1 against the service's certificate is the same need).
    config = Configuration(ssl_target_name_override=server_name)
    channel = Channel(host, port, ssl=ssl, config=config)
    try:
        reply = await HealthStub(channel).Check(
            HealthCheckRequest(service=service), timeout=timeout
        )
    except GRPCError as err:
        if err.status is Status.NOT_FOUND:  # grpclib sends no message with it
            raise UnhealthyError(f"{where}: the server does not know service {service!r}") from None
        detail = f": {err.message}" if err.message else ""
        raise UnhealthyError(f"{where}: health check failed: {err.status.name}{detail}") from None
    except TimeoutError:
        raise UnhealthyError(f"{where}: no answer within {timeout:g} s") from None
    except StreamTerminatedError as err:
        # What a TLS server does to a plaintext client, or mTLS to a refused certificate.
        hint = "an mTLS server drops clients it does not accept" if ssl else "TLS server? use --tls"
        raise UnhealthyError(f"{where}: connection lost during the check: {err} ({hint})") from None
    except _ssl.SSLCertVerificationError as err:  # an OSError, but its errno says nothing
        raise UnhealthyError(
            f"{where}: cannot verify the server's certificate: {err.verify_message or err.reason} "
            "(see --tls-ca, --tls-server-name)"
        ) from None
    except _ssl.SSLError as err:
        raise UnhealthyError(f"{where}: TLS failed: {err.reason or err}") from None
    except socket.gaierror as err:  # its errno is not an os.strerror one
        raise UnhealthyError(f"{where}: cannot resolve {host!r}: {err.strerror}") from None
    except OSError as err:  # refused, unreachable
        reason = os.strerror(err.errno) if err.errno else str(err) or type(err).__name__
        raise UnhealthyError(f"{where}: cannot connect: {reason}") from None
    finally:
        channel.close()
    status = HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != HealthCheckResponse.SERVING:
        name = repr(service) if service else "the server"
        raise UnhealthyError(f"{where}: {name} is {status}")
