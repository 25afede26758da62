"""grpcio's health and reflection clients as a separate process: the foreign peer.

grpcio-health-checking and grpclib register the same health.proto symbols in
protobuf's default pool, so they cannot share a process with our server.

    python grpcio_probe.py check HOST:PORT SERVICE      -> SERVING / NOT_SERVING / NOT_FOUND
    python grpcio_probe.py watch HOST:PORT SERVICE      -> one status per line, as they come
    python grpcio_probe.py describe HOST:PORT           -> JSON, via the descriptor database
    python grpcio_probe.py list HOST:PORT VERSION       -> service names, via v1 or v1alpha
"""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT = 10.0


def check(channel: grpc.Channel, service: str) -> None:
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT)
    except grpc.RpcError as err:
        print(err.code().name)
    else:
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def watch(channel: grpc.Channel, service: str) -> None:
    request = health_pb2.HealthCheckRequest(service=service)
    for reply in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=30):
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), flush=True)


def describe(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    services = sorted(database.get_services())
    method = pool.FindServiceByName("tutorial.NumberService").FindMethodByName("AccumulateNumbers")
    messages = {
        m.full_name: [(f.name, f.number, f.type) for f in m.fields]
        for m in (method.input_type, method.output_type)
    }
    print(
        json.dumps(
            {
                "services": services,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
                "input": method.input_type.full_name,
                "output": method.output_type.full_name,
                "messages": messages,
            }
        )
    )


def list_services(channel: grpc.Channel, version: str) -> None:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for response in call(iter([request]), timeout=TIMEOUT):
        for service in response.list_services_response.service:
            print(service.name)


def main(command: str, target: str, *args: str) -> None:
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        if command == "check":
            check(channel, *args)
        elif command == "watch":
            watch(channel, *args)
        elif command == "describe":
            describe(channel)
        elif command == "list":
            list_services(channel, *args)
        else:
            sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
