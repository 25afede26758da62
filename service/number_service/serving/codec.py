"""StrictCodec: grpclib's codec for betterproto2 messages, strict both ways.

Decoding judges the bytes as Google's parser does (wire.py) and raises WireError for
what it rejects; turning that into a gRPC status is the server's business, not the
codec's. Encoding is ``bytes(message)``, but refuses a value that does not fit its
field type: betterproto2 writes an int32 of 2**31 as a 5-byte varint that every peer
reads as -2**31, and a uint32 of -1 as 10 bytes. Messages that are not betterproto2's
(grpclib's health and reflection classes are Google's) go through grpclib's ProtoCodec.
"""

from __future__ import annotations

import struct
from typing import Any

import betterproto2
from grpclib.encoding.proto import ProtoCodec

from . import wire
from .fields import Field, fields_of, is_message_class

_I32 = (-(2**31), 2**31 - 1)
_U32 = (0, 2**32 - 1)
_I64 = (-(2**63), 2**63 - 1)
_U64 = (0, 2**64 - 1)
_RANGES = {
    betterproto2.TYPE_INT32: _I32,
    betterproto2.TYPE_SINT32: _I32,
    betterproto2.TYPE_SFIXED32: _I32,
    betterproto2.TYPE_ENUM: _I32,
    betterproto2.TYPE_UINT32: _U32,
    betterproto2.TYPE_FIXED32: _U32,
    betterproto2.TYPE_INT64: _I64,
    betterproto2.TYPE_SINT64: _I64,
    betterproto2.TYPE_SFIXED64: _I64,
    betterproto2.TYPE_UINT64: _U64,
    betterproto2.TYPE_FIXED64: _U64,
}
_FLOAT = struct.Struct("<f")


class StrictCodec(ProtoCodec):
    """Content subtype "proto": Google-exact decoding, range-checked encoding."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if not is_message_class(message_type):
            return super().encode(message, message_type)
        if not isinstance(message, message_type):
            raise TypeError(f"message must be of type {message_type!r}, not {type(message)!r}")
        check_ranges(message)
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        if not is_message_class(message_type):
            return super().decode(data, message_type)
        return wire.decode(data, message_type)


def check_ranges(message: betterproto2.Message) -> None:
    """Raise ValueError if a value of ``message`` (nested ones too) does not fit its field."""
    where = type(message).__name__
    for f in fields_of(type(message)):
        value = getattr(message, f.name)
        if value is None:
            continue
        if f.key is not None and f.value is not None:
            for key, item in value.items():
                _check(f.key, key, f"{where}.{f.name} key")
                _check(f.value, item, f"{where}.{f.name}[{key!r}]")
        elif f.repeated:
            for item in value:
                _check(f, item, f"{where}.{f.name}[]")
        else:
            _check(f, value, f"{where}.{f.name}")


def _check(f: Field, value: Any, where: str) -> None:
    limits = _RANGES.get(f.proto_type)
    if limits is not None:
        if isinstance(value, bool) or not isinstance(value, int):  # as protobuf refuses
            raise TypeError(f"{where} must be an int for {f.proto_type}, not {value!r}")
        low, high = limits
        if not low <= value <= high:
            raise ValueError(f"{where} = {value} does not fit {f.proto_type} [{low}, {high}]")
    elif f.proto_type == betterproto2.TYPE_FLOAT:  # protobuf would write inf instead
        try:
            _FLOAT.pack(value)
        except OverflowError:
            raise ValueError(f"{where} = {value!r} does not fit float") from None
    elif f.message is not None:
        if f.unwrap:  # a plain value shown for a wrapper message: check it as the wrapper
            value = f.message.from_wrapped(value)  # type: ignore[attr-defined]
        check_ranges(value)
