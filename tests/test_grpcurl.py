"""grpcurl, a client built on grpc-go, against our server: the Go peer, via reflection.

grpcurl needs no .proto: it learns the service from server reflection, as grpcui
and Postman do, so these tests cover reflection end to end as well.
"""

from __future__ import annotations

import json

import pytest
from grpcurl_peer import grpcurl as run_grpcurl
from grpcurl_peer import json_values

from number_service.pytest_plugin import RunningServer

METHOD = "tutorial.NumberService/AccumulateNumbers"


async def grpcurl(server: RunningServer, *args: str, data: str | None = None) -> tuple[int, str]:
    """Run grpcurl against ``server``; its exit code and combined output."""
    return await run_grpcurl(server.host, server.port, *args, data=data)


async def test_lists_services(number_server: RunningServer) -> None:
    code, out = await grpcurl(number_server, "list")
    assert code == 0, out
    assert set(out.split()) >= {"tutorial.NumberService", "grpc.health.v1.Health"}


async def test_describes_the_method(number_server: RunningServer) -> None:
    code, out = await grpcurl(number_server, "describe", "tutorial.NumberService")
    assert code == 0, out
    assert (
        "rpc AccumulateNumbers ( stream .tutorial.NumberRequest ) "
        "returns ( stream .tutorial.NumberResponse );"
    ) in out
    code, out = await grpcurl(number_server, "describe", "tutorial.NumberRequest")
    assert code == 0, out
    assert "int32 num = 1;" in out


async def test_calls_the_stream(number_server: RunningServer) -> None:
    code, out = await grpcurl(number_server, METHOD, data='{"num": 5} {"num": 7} {"num": -2}')
    assert code == 0, out
    # proto3 JSON leaves out a zero sum
    assert [value.get("sum", 0) for value in json_values(out)] == [5, 12, 10]


async def test_overflow_status(number_server: RunningServer) -> None:
    code, out = await grpcurl(number_server, METHOD, data='{"num": 2147483647} {"num": 1}')
    assert code != 0
    assert "Code: OutOfRange" in out
    assert "sum 2147483647 + num 1" in out


@pytest.mark.parametrize("service", ["", "tutorial.NumberService"])
async def test_health(number_server: RunningServer, service: str) -> None:
    data = json.dumps({"service": service})
    code, out = await grpcurl(number_server, "grpc.health.v1.Health/Check", data=data)
    assert code == 0, out
    assert json.loads(out) == {"status": "SERVING"}
