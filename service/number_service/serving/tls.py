"""TLS and mutual TLS: the SSL contexts of the server and the client, from PEM files.

    ServeConfig(tls=TLSConfig("server.pem", "server.key"))                # TLS
    ServeConfig(tls=TLSConfig("server.pem", "server.key", "clients.pem"))  # mTLS
    NumberClient(host, port, ssl=client_context(ca="ca.pem"))
    NumberClient(host, port, ssl=client_context(ca="ca.pem", cert="me.pem", key="me.key"))

Both sides use TLS 1.2 or newer and offer ALPN ``h2``, as gRPC over HTTP/2 requires
(grpcio refuses a server that does not select ``h2``). A file that cannot be used
raises :class:`TLSFileError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

StrPath = str | Path


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be read or used; the message names it."""


@dataclass(frozen=True)
class TLSConfig:
    """The server's TLS files; with ``client_ca``, clients must present a certificate
    issued by it (mutual TLS). Paths, not a context, so that the config can be copied
    to other processes."""

    cert: str  # PEM: the server's certificate, then any intermediates
    key: str  # PEM: its private key
    client_ca: str | None = None  # PEM: CA certificate(s) that client certificates must chain to

    @property
    def mode(self) -> str:
        """``tls``, or ``mtls`` when client certificates are required."""
        return "tls" if self.client_ca is None else "mtls"

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key, self.client_ca)


def server_context(cert: StrPath, key: StrPath, client_ca: StrPath | None = None) -> ssl.SSLContext:
    """A server context for ``cert`` and ``key``; with ``client_ca``, client
    certificates are required and must chain to it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _h2_ready(ctx)
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, client_ca, "client CA")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca: StrPath | None = None, cert: StrPath | None = None, key: StrPath | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (default: the system's
    CAs) and its host name or IP address; ``cert`` and ``key`` are the client's own
    certificate for mutual TLS (both or neither)."""
    if (cert is None) != (key is None):
        raise TLSFileError("a client certificate needs its key, and a key its certificate")
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:  # only the given CA is trusted, not the system's
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
        _load_ca(ctx, ca, "CA")
    _h2_ready(ctx)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def _h2_ready(ctx: ssl.SSLContext) -> None:
    """What HTTP/2 asks of TLS (RFC 9113 section 9.2): 1.2 or newer, no renegotiation,
    and ALPN ``h2``."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["h2"])


def _load_ca(ctx: ssl.SSLContext, path: StrPath, what: str) -> None:
    _readable(path, what)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as err:
        raise TLSFileError(
            f"{what} file {str(path)!r} holds no usable PEM certificate: {_reason(err)}"
        ) from None


def _load_chain(ctx: ssl.SSLContext, cert: StrPath, key: StrPath) -> None:
    _readable(cert, "certificate")
    _readable(key, "key")
    try:
        # Parse the certificate alone first, so that a bad one is told from a bad key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as err:
        raise TLSFileError(
            f"certificate file {str(cert)!r} holds no usable PEM certificate: {_reason(err)}"
        ) from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        raise TLSFileError(
            f"key file {str(key)!r} is not a usable PEM private key for certificate "
            f"{str(cert)!r}: {_reason(err)}"
        ) from None


def _readable(path: StrPath, what: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as err:
        raise TLSFileError(f"cannot read {what} file {str(path)!r}: {err.strerror}") from None


def _reason(err: ssl.SSLError) -> str:
    """OpenSSL's reason, e.g. ``KEY_VALUES_MISMATCH``, without the C source location."""
    return str(err.reason or err.strerror or err)
