"""Socket addresses as text, for log lines and messages: ``host:port``, ``[::1]:port``."""

from __future__ import annotations

import ipaddress

_MAPPED = "::ffff:"  # how an IPv4 peer of a dual-stack IPv6 socket appears


def host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A peer's address from ``getpeername()`` as ``host:port``; an IPv4 peer of a
    dual-stack socket (``::ffff:127.0.0.1``) as the IPv4 address it is."""
    host = str(address[0])
    if host.startswith(_MAPPED):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            host = str(mapped)
    return host_port(host, int(address[1]))
