"""Closing a listening TCP socket without resetting a connection the kernel completed.

Closing a listening socket resets (TCP RST) every connection the kernel completed
but the process had not accepted yet. A client that already sent its request on one
sees that request fail, and nginx does not retry a request it has sent: it answers
502 ("recv() failed (104: Connection reset by peer) while reading response header
from upstream"). The drains accept what the backlog holds before they close, which
leaves a window: a connection completed between the last accept() and the close()
is reset. :func:`shut` closes that window first: a socket filter that drops every
packet makes the kernel ignore new connection attempts on the socket (a SYN is
dropped, as when the backlog is full), so that the backlog can only shrink. A client
whose SYN was dropped sends it again (after ~1 s), finds the port closed and gets a
refused connection, which nginx (``grpc_next_upstream error``) and gRPC clients try
again elsewhere.

Linux only (``SO_ATTACH_FILTER`` with a classic BPF program, no privilege needed);
elsewhere :func:`shut` does nothing and the window stays.
"""

from __future__ import annotations

import ctypes
import socket
import sys

SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h; Python's socket module lacks it
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k (the bytes to keep: none)


class _SockFilter(ctypes.Structure):
    """struct sock_filter: one classic BPF instruction."""

    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: a classic BPF program (the kernel copies it)."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_DROP_ALL = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, 0))
_PROGRAM = _SockFprog(1, ctypes.cast(_DROP_ALL, ctypes.POINTER(_SockFilter)))


def shut(sock: socket.socket) -> bool:
    """Make the listening ``sock`` take no new connection from now on (see the
    module); what its backlog holds stays, to be accepted before it is closed.
    False where this cannot be done (not Linux, a closed socket)."""
    if not sys.platform.startswith("linux") or sock.fileno() == -1:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(_PROGRAM))
    except OSError:
        return False
    return True
