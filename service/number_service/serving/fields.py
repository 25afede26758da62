"""The fields of a betterproto2 message class, read once from betterproto2's metadata.

Only public pieces are used: ``dataclasses.fields``, ``betterproto2.FieldMetadata`` and
the type hints of the generated class (for the classes of message, enum and map
fields). No ``DESCRIPTOR`` is needed, so any betterproto2 output will do.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

import betterproto2


@dataclass(frozen=True, slots=True)
class Field:
    """One protobuf field, or the key or value of a map entry."""

    number: int
    name: str  # the Python attribute ("key" and "value" in a map entry)
    proto_type: str  # betterproto2.TYPE_*; the entry's own type for maps
    repeated: bool = False
    oneof: str | None = None  # the oneof group (a synthetic one for proto3 optional)
    message: type[betterproto2.Message] | None = None  # the class read from the wire
    unwrap: bool = False  # a wrapper type that betterproto2 shows as a plain value
    enum: type[Any] | None = None
    key: Field | None = None  # maps only
    value: Field | None = None  # maps only


def is_message_class(cls: object) -> bool:
    """True for betterproto2 message classes (not grpclib's protobuf ones)."""
    return isinstance(cls, type) and issubclass(cls, betterproto2.Message)


@cache
def fields_of(cls: type[betterproto2.Message]) -> tuple[Field, ...]:
    """The fields of ``cls`` in definition order."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    found = []
    for item in dataclasses.fields(cast(Any, cls)):  # generated classes are dataclasses
        meta = betterproto2.FieldMetadata.get(item)
        hint = hints[item.name]
        if meta.map_meta is not None:
            key_hint, value_hint = typing.get_args(hint)
            key_meta, value_meta = meta.map_meta
            key = _field(key_meta, "key", key_hint)
            value = _field(value_meta, "value", value_hint)
            found.append(Field(meta.number, item.name, meta.proto_type, key=key, value=value))
            continue
        if meta.repeated or _is_optional(hint):
            hint = typing.get_args(hint)[0]
        found.append(_field(meta, item.name, hint))
    return tuple(found)


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _field(meta: betterproto2.FieldMetadata, name: str, hint: Any) -> Field:
    message = enum = None
    if meta.unwrap is not None:
        message = meta.unwrap()
    elif meta.proto_type == betterproto2.TYPE_MESSAGE:
        message = hint
    elif meta.proto_type == betterproto2.TYPE_ENUM:
        enum = hint
    return Field(
        meta.number,
        name,
        meta.proto_type,
        repeated=bool(meta.repeated),
        oneof=meta.group,
        message=message,
        unwrap=meta.unwrap is not None,
        enum=enum,
    )
