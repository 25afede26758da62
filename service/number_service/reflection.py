"""Server reflection for betterproto services, which register no protobuf descriptors.

The descriptors come from ``number_service_gen/descriptors.binpb``, a
FileDescriptorSet that ``tools/codegen.py`` writes from ``proto/`` beside the
generated code (and checks for drift with it). Health's and reflection's own
descriptors are added so that clients can describe every service listed.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2


def descriptors() -> descriptor_pool.DescriptorPool:
    """A pool with our .proto files and those of health and reflection."""
    data = resources.files("number_service_gen").joinpath("descriptors.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    for module in (health_pb2, reflection_v1_pb2, reflection_v1alpha_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def with_reflection(services: Collection[Any]) -> list[Any]:
    """``services`` plus grpc.reflection.v1 and v1alpha describing them."""
    return ServerReflection.extend(services, pool=descriptors())
