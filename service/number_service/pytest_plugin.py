"""pytest fixtures for projects that use NumberService (loaded via the pytest11 entry point).

    async def test_sums(number_client):            # in-process, grpclib.testing.ChannelFor
        assert [s async for s in number_client.accumulate([1, 2])] == [1, 3]

    async def test_over_tcp(number_server, number_server_client):
        ...                                         # a real server on 127.0.0.1:<ephemeral>

The fixtures are async; they need pytest-asyncio (``pip install number-service[pytest]``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - only without the [pytest] extra

    def pytest_configure(config: pytest.Config) -> None:
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(
                "number-service fixtures need pytest-asyncio: pip install 'number-service[pytest]'"
            ),
            stacklevel=2,
        )

else:
    from grpclib.server import Server
    from grpclib.testing import ChannelFor

    from .client import NumberClient
    from .codec import NumberCodec
    from .server import build_server
    from .service import NumberService
    from .serving import Serving, address_of, bind

    @dataclass(frozen=True)
    class RunningServer:
        """A started server: where it listens, and the server itself."""

        host: str
        port: int
        instance: Serving

        @property
        def server(self) -> Server:
            """The grpclib Server, e.g. for ``grpclib.events.listen``."""
            return self.instance.server

    @pytest_asyncio.fixture
    async def number_client() -> AsyncIterator[NumberClient]:
        """A client wired to an in-process NumberService, no sockets involved."""
        async with ChannelFor([NumberService()], codec=NumberCodec()) as channel:
            yield NumberClient.over(channel)

    @pytest_asyncio.fixture
    async def number_server() -> AsyncIterator[RunningServer]:
        """A real server (with health, reflection and metrics) on an ephemeral
        127.0.0.1 port; shut down afterwards, ending streams left with UNAVAILABLE."""
        sock = bind("127.0.0.1", 0)
        instance = build_server()
        await instance.start(sock)
        host, port = address_of(sock)
        try:
            yield RunningServer(host, port, instance)
        finally:
            await instance.shutdown(grace=0)

    @pytest_asyncio.fixture
    async def number_server_client(number_server: RunningServer) -> AsyncIterator[NumberClient]:
        """A client connected over loopback TCP to ``number_server``."""
        async with NumberClient(number_server.host, number_server.port) as client:
            yield client
