"""Closing a listening TCP socket without resetting a connection the kernel completed.

Closing a listening socket resets (TCP RST) every connection the kernel completed
but the process had not accepted yet, and every handshake still under way (the
client has its SYN-ACK, so it thinks itself connected). A client that already sent
its request on one sees that request fail, and nginx does not retry a request it has
sent: it answers 502 ("recv() failed (104: Connection reset by peer) while reading
response header from upstream"). The drain accepts what the backlog holds before it
closes, which leaves two windows: a connection completed between the last accept()
and the close(), and a handshake whose last ACK comes after the close. :func:`shut`
closes both: a socket filter that drops every SYN (and nothing else) makes the
kernel start no new handshake on the socket, while those under way complete into
the backlog; :data:`SETTLE` seconds later (one round trip is enough) the backlog is
swept, and the socket closed. A client whose SYN was dropped sends it again (after
~1 s), finds the port closed and gets a refused connection, which nginx
(``grpc_next_upstream error``) and gRPC clients try again elsewhere.

Linux only (``SO_ATTACH_FILTER`` with a classic BPF program, no privilege needed;
for a TCP socket the program sees the TCP header first, IPv4 and IPv6 alike);
elsewhere :func:`shut` does nothing and the windows stay.
"""

from __future__ import annotations

import ctypes
import socket
import sys

SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h; Python's socket module lacks it
SETTLE = 0.05  # seconds after shut() for handshakes under way to reach the backlog

# Classic BPF opcodes (linux/bpf_common.h).
_LD_B_ABS = 0x30  # A = the byte at offset k (of the TCP header)
_AND_K = 0x54  # A &= k
_JEQ_K = 0x15  # A == k ? skip jt : skip jf
_RET_K = 0x06  # return k: the bytes to keep, 0 drops the packet
_TCP_FLAGS = 13  # offset of the flags byte in the TCP header
_SYN, _ACK = 0x02, 0x10


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


#: Drop a SYN without ACK (a new handshake), keep every other packet whole.
_DROP_SYN = (_SockFilter * 5)(
    _SockFilter(_LD_B_ABS, 0, 0, _TCP_FLAGS),
    _SockFilter(_AND_K, 0, 0, _SYN | _ACK),
    _SockFilter(_JEQ_K, 0, 1, _SYN),
    _SockFilter(_RET_K, 0, 0, 0),
    _SockFilter(_RET_K, 0, 0, 0xFFFFFFFF),
)
_PROGRAM = _SockFprog(len(_DROP_SYN), ctypes.cast(_DROP_SYN, ctypes.POINTER(_SockFilter)))


def shut(sock: socket.socket) -> bool:
    """Make the listening ``sock`` start no new handshake from now on (see the
    module); those under way still complete, and what its backlog holds stays, to be
    accepted (after :data:`SETTLE` s) before it is closed. False where this cannot be
    done (not Linux, a closed socket)."""
    if not sys.platform.startswith("linux") or sock.fileno() == -1:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(_PROGRAM))
    except OSError:
        return False
    return True
