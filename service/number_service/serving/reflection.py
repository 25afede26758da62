"""Server reflection that describes any betterproto2 service from its own descriptors.

betterproto2 (with the ``google_protobuf_descriptors`` option) gives every generated
message a ``DESCRIPTOR``; grpclib's health and reflection messages are protobuf
classes, which have one too. The files those descriptors come from (with their
imports) are copied into one pool, so clients can list and describe every service a
server serves, and nothing is kept beside the generated code.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from google.protobuf import descriptor, descriptor_pool
from grpclib.reflection.service import ServerReflection


def fill(pool: descriptor_pool.DescriptorPool, services: Collection[Any]) -> None:
    """Add to ``pool`` the .proto files of every message that ``services`` take or give."""
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a pool takes a file after its imports
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for service in services:
        for handler in service.__mapping__().values():
            for message_type in (handler.request_type, handler.reply_type):
                found = getattr(message_type, "DESCRIPTOR", None)
                if isinstance(found, descriptor.Descriptor):
                    add(found.file)


def with_reflection(services: Collection[Any]) -> list[Any]:
    """``services`` plus grpc.reflection.v1 and v1alpha describing them (and themselves)."""
    pool = descriptor_pool.DescriptorPool()
    extended = ServerReflection.extend(services, pool=pool)
    fill(pool, extended)  # before anyone can ask: the server has not started
    return extended
