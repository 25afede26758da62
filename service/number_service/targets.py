"""Where a client's calls go: its targets, their addresses, and a round robin over the
connections that are up.

A target is ``"host:port"`` (an IPv6 address in brackets: ``"[::1]:50051"``), or a
host alone with the default port. A host name may resolve to several addresses:
each gets its own connection (a grpclib Channel), and the name is resolved again
when one of its connections ends or cannot be made. New calls go round robin over
the addresses whose connection is up; those that are down are reconnected in the
background, with backoff, and one is connected at once only when none is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from grpclib.client import Channel

from .serving.grpclib_ext import client as client_ext

#: Background reconnects of an address that is down: the first at once, then after
#: these many seconds, doubling up to the cap (jittered by 20% either way).
RECONNECT_BACKOFF = 0.2
RECONNECT_BACKOFF_MAX = 5.0

# getaddrinfo's errors that say the resolver is in trouble, not that the name is
# unknown: worth trying again. Any other (EAI_NONAME, EAI_NODATA ...) is an answer.
_RESOLVER_TROUBLE = frozenset({socket.EAI_AGAIN, socket.EAI_MEMORY, socket.EAI_SYSTEM})


@dataclass(frozen=True)
class Target:
    """A host (name or address) and port that calls may go to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_address(self) -> bool:
        """Whether ``host`` is an IP address already (nothing to resolve)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_targets(spec: str | Sequence[str], port: int | None, default_port: int) -> list[Target]:
    """The targets ``spec`` names: with ``port``, ``spec`` is one host, as given;
    otherwise ``"host:port"``, ``"[v6]:port"`` or ``"host"`` (``default_port``), one
    or more, in a sequence or separated by commas. Raises ValueError naming the bad one."""
    if port is not None:
        if not isinstance(spec, str):
            raise TypeError("with a port, give one host, not a list of targets")
        return [Target(spec, _check_port(port, spec))]
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [part.strip() for item in items for part in item.split(",")]
    targets = [parse_target(part, default_port) for part in parts if part]
    if not targets:
        raise ValueError(f"no target in {spec!r}: give host:port")
    return targets


def parse_target(text: str, default_port: int) -> Target:
    """One ``"host:port"``, ``"[v6]:port"``, ``"[v6]"``, bare ``"v6"`` or ``"host"``."""
    host, port_text = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"target {text!r}: an IPv6 address goes in brackets: [::1]:50051")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"target {text!r} has no host")
    if not port_text:
        return Target(host, default_port)
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"target {text!r}: port {port_text!r} is not a number") from None
    return Target(host, _check_port(port, text))


def _check_port(port: int, where: str) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"target {where!r}: port {port} is not in 1-65535")
    return port


def hopeless(err: OSError) -> bool:
    """Whether connecting again cannot help: a TLS failure (a certificate that is
    not trusted or not for this host, a server that does not speak TLS), or a host
    name that does not resolve."""
    if isinstance(err, ssl.SSLError):
        return True
    return isinstance(err, socket.gaierror) and err.errno not in _RESOLVER_TROUBLE


class UnreachableError(OSError):
    """No address of any target could be connected to: ``failures`` says, for each
    one tried (an address, or a target that did not resolve), what went wrong."""

    def __init__(self, failures: list[tuple[Target, str | None, OSError]]) -> None:
        super().__init__("; ".join(f"{target}: {err}" for target, _, err in failures))
        self.failures = failures  # (target, the address tried or None, the error)

    @property
    def hopeless(self) -> bool:
        """Whether trying again cannot help any of them (see :func:`hopeless`)."""
        return all(hopeless(err) for _, _, err in self.failures)


# Makes the Channel of one address: (address, port, the target it came from).
ChannelMaker = Callable[[str, int, Target], Channel]


@dataclass(eq=False)
class Address:
    """One address of a target, and the grpclib Channel that connects to it."""

    target: Target
    host: str  # an IP address, or the target's own host for a channel given whole
    port: int
    channel: Channel
    ok: bool = True  # its last connect succeeded (what tells "up" for a plain Channel)
    was_up: bool = False  # it was connected when last looked at
    failures: int = 0  # connects failed in a row
    retry_at: float = 0.0  # loop time before which no background reconnect is tried
    reconnecting: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        if not self.port:  # a channel given whole: host is its name
            return self.host
        own = str(Target(self.host, self.port))
        return own if own == str(self.target) else f"{self.target} ({own})"

    def up(self) -> bool:
        """Whether its connection is there and takes new calls."""
        state = client_ext.connected(self.channel)
        return self.ok if state is None else state

    async def connect(self) -> None:
        """Connect now (at once if connected); raises the OSError if it cannot."""
        try:
            await self.channel.__connect__()
        except OSError:
            self.ok = False
            self.failures += 1
            base = min(RECONNECT_BACKOFF * 2 ** (self.failures - 1), RECONNECT_BACKOFF_MAX)
            delay = base * random.uniform(0.8, 1.2)
            self.retry_at = asyncio.get_running_loop().time() + delay
            raise
        self.ok = self.was_up = True
        self.failures = 0


@dataclass(eq=False)
class _Resolved:
    """A target and what it resolved to last."""

    target: Target
    addresses: list[Address] = field(default_factory=list)
    stale: bool = True  # resolve it again before the next pick
    error: OSError | None = None  # why the last resolution failed


class Pool:
    """The addresses of a client's targets and a round robin over those that are up."""

    def __init__(self, targets: Sequence[Target], make_channel: ChannelMaker) -> None:
        self._resolved = [_Resolved(target) for target in targets]
        self._make_channel = make_channel
        self._owned = True
        self._next = 0  # where the next round starts
        self._lock = asyncio.Lock()  # one resolution at a time
        self._old: list[Address] = []  # addresses a name no longer resolves to
        self._closed = False

    @classmethod
    def over(cls, channel: Channel, name: str) -> Pool:
        """A pool of the one channel given, which it never resolves, retires or closes."""
        target = Target(name, 0)
        pool = cls([target], lambda host, port, target: channel)
        pool._owned = False
        pool._resolved[0].addresses = [Address(target, name, 0, channel)]
        pool._resolved[0].stale = False
        return pool

    @property
    def addresses(self) -> list[Address]:
        """Every address now in the round robin."""
        return [address for entry in self._resolved for address in entry.addresses]

    async def pick(self, avoid: Address | None = None) -> Address:
        """The next address in the round robin whose connection is up, other than
        ``avoid`` where there is one; if none is up, the first one that connects.
        Raises :class:`UnreachableError` if none does."""
        if self._closed:
            raise RuntimeError("the client is closed")
        await self._refresh()
        addresses = self.addresses
        failures: list[tuple[Target, str | None, OSError]] = [
            (entry.target, None, entry.error)
            for entry in self._resolved
            if entry.error is not None and not entry.addresses
        ]
        if not addresses:
            raise UnreachableError(failures)
        start = self._next % len(addresses)
        self._next = start + 1
        order = addresses[start:] + addresses[:start]
        for address in order:
            if not address.up():
                if address.was_up:  # its connection went since: resolve again
                    address.was_up = False
                    self._stale(address)
                self._reconnect_later(address)
        for address in order:
            if address is not avoid and address.up():
                return address
        for address in sorted(order, key=lambda address: address is avoid):  # avoid last
            if address.up():
                return address
            try:
                await address.connect()
            except OSError as err:
                failures.append((address.target, str(address), err))
                self._stale(address)
                continue
            return address
        raise UnreachableError(failures)

    def retire(self, address: Address) -> None:
        """``address``'s connection takes no new calls (its streams carry on)."""
        if self._owned:
            client_ext.retire(address.channel)

    def close(self) -> None:
        """Close every connection this pool made (none of a channel given whole)."""
        self._closed = True
        for address in [*self.addresses, *self._old]:
            if address.reconnecting is not None:
                address.reconnecting.cancel()
            if self._owned:
                address.channel.close()

    def _stale(self, address: Address) -> None:
        for entry in self._resolved:
            if address in entry.addresses and not entry.target.is_address:
                entry.stale = True

    async def _refresh(self) -> None:
        """Resolve again the targets that are stale (all of them, the first time)."""
        if not any(entry.stale for entry in self._resolved):
            return
        async with self._lock:
            for entry in self._resolved:
                if entry.stale:
                    await self._resolve(entry)

    async def _resolve(self, entry: _Resolved) -> None:
        target = entry.target
        if target.is_address:
            found = [(target.host, target.port)]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM
                )
            except OSError as err:  # keep the addresses it had: they may still serve
                entry.error = err
                return
            found = list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))
        entry.error = None
        entry.stale = False
        kept: dict[tuple[str, int], Address | None] = {
            (address.host, address.port): address for address in entry.addresses
        }
        entry.addresses = [kept.pop(key, None) or self._address(target, *key) for key in found]
        for gone in kept.values():  # its streams finish; it takes no new calls
            assert gone is not None
            self.retire(gone)
            self._old.append(gone)

    def _address(self, target: Target, host: str, port: int) -> Address:
        return Address(target, host, port, self._make_channel(host, port, target))

    def _reconnect_later(self, address: Address) -> None:
        """Connect ``address`` in the background, unless it is at it or backing off."""
        if (
            not self._owned
            or len(self.addresses) < 2  # one address: the pick connects it itself
            or address.reconnecting is not None
            or asyncio.get_running_loop().time() < address.retry_at
        ):
            return

        async def reconnect() -> None:
            with contextlib.suppress(OSError):
                await address.connect()

        def done(task: asyncio.Task[None]) -> None:
            address.reconnecting = None

        address.reconnecting = asyncio.create_task(reconnect())
        address.reconnecting.add_done_callback(done)
