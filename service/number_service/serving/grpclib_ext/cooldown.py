"""Cool-downs for flooding addresses, sans I/O: a cut attacker may not come straight back.

A flood limit closes one connection after a bounded number of frames, but an attacker
that connects again at once gets that many frames again, every time: at ~100 new
connections a second, what each costs before its cut (the TCP accept, h2's and
grpclib's set-up, up to a limit's worth of frames) starves every other client as the
flood itself would. So an address whose connection was cut for a flood (a GOAWAY
ENHANCE_YOUR_CALM) has its new connections refused for a while, at once and before any
HTTP/2 set-up: 1 s after the first cut (``base``), twice as long after each further cut
within ``forget`` seconds of the last, at most ``cap``. Connections it already has
carry on.

An address is an IPv4 address, or the /64 of an IPv6 one (one host or site can use a
whole /64). Clients behind one NAT, or one proxy, share an address: they share its
cool-down too. A server behind a proxy that pools every client's calls over its own
connections turns it off (``base`` None).

:class:`Cooldown` keeps at most ``size`` addresses, the least recently cut forgotten
first, so an attacker with many addresses cannot grow it.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

DEFAULT_CAP = 60.0  # seconds an address cools down at most
DEFAULT_FORGET = 300.0  # seconds after its last cut an address starts afresh
DEFAULT_SIZE = 4096  # addresses remembered at most


class Cooldown:
    """Which addresses are cooling down after a flood, and until when (see the module)."""

    __slots__ = ("_addresses", "base", "cap", "forget", "size")

    def __init__(
        self,
        base: float | None,
        *,
        cap: float = DEFAULT_CAP,
        forget: float = DEFAULT_FORGET,
        size: int = DEFAULT_SIZE,
    ) -> None:
        self.base = base  # seconds after the first cut; None: no cool-down
        self.cap = cap
        self.forget = forget
        self.size = size
        # address -> (cuts in a row, time of the last, end of its cool-down)
        self._addresses: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def strike(self, address: str | None, now: float) -> float:
        """A connection from ``address`` was cut for a flood at ``now``: start (or
        lengthen) its cool-down. Returns the cool-down's length in seconds (0: none)."""
        if self.base is None or address is None:
            return 0.0
        cuts, last, _ = self._addresses.pop(address, (0, now, now))
        cuts = cuts + 1 if now - last < self.forget else 1
        length: float = min(self.base * 2.0 ** (cuts - 1), self.cap)
        self._addresses[address] = (cuts, now, now + length)
        while len(self._addresses) > self.size:
            self._addresses.popitem(last=False)
        return length

    def remaining(self, address: str | None, now: float) -> float:
        """Seconds left of ``address``'s cool-down at ``now`` (0: it may connect)."""
        if address is None:
            return 0.0
        entry = self._addresses.get(address)
        if entry is None:
            return 0.0
        return max(0.0, entry[2] - now)

    def __len__(self) -> int:
        return len(self._addresses)


def address_key(peername: Any) -> str | None:
    """What a connection's ``peername`` cools down as: its IPv4 address, or its IPv6
    address's /64 (an IPv4-mapped IPv6 address counts as the IPv4 one); None for a
    peer without an IP address (a Unix socket)."""
    if not isinstance(peername, tuple) or not peername:
        return None
    host = peername[0]
    if isinstance(host, str) and host.count(".") == 3 and ":" not in host:
        return host  # IPv4, as the kernel writes it (skips ipaddress: ~15 us)
    try:
        ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
