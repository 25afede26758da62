"""The server's own address on a stream's connection, which grpclib's ``Peer`` does not say.

Private attribute used here, with what it stands in for:

- ``grpclib.protocol.Peer._transport``: the connection's transport, for its
  ``sockname``. ``Peer`` offers ``addr()`` (the remote address) and ``cert()`` only;
  a span's server address (``net.host.ip``/``net.host.port``) needs the local one,
  the address the client really reached when the server listens on ``0.0.0.0``.

With releases other than :data:`~.WRITTEN_FOR`, :func:`local_address` says None.
"""

from __future__ import annotations

from functools import cache

from grpclib.protocol import Peer

from . import mismatch


def local_address(peer: Peer) -> tuple[str, int] | None:
    """The local (server) address of ``peer``'s connection: host and port, or None."""
    if not _written_for_these():
        return None
    transport = getattr(peer, "_transport", None)
    address = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(address, tuple) or len(address) < 2:
        return None  # a Unix socket, say
    return str(address[0]), int(address[1])


@cache
def _written_for_these() -> bool:
    """Whether the installed releases are :data:`~.WRITTEN_FOR` (asked once: it is
    asked for every stream, and reading package metadata takes a while)."""
    return mismatch() is None
