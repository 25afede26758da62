"""Protobuf wire bytes judged exactly as Google's parser (upb) judges them, for any
betterproto2 message class.

betterproto2's decoder is lenient where Google's is not (a length may run past the
end of the message, a group or a field sent with another wire type is misread), so a
server must judge request bytes itself. :func:`check` walks the bytes with a table of
the message's fields (built once per class from betterproto2's metadata, see
fields.py) and raises :class:`WireError` with a short reason for anything upb
rejects:

- a truncated or over-long varint (a tag over 5 bytes or 32 bits, a length over 5
  bytes, a value over 10 bytes), field number 0 outside a group, wire types 6 and 7,
  an unmatched end-group or a group that is not ended;
- a length or fixed-size field that runs past the end of its message;
- invalid UTF-8 in a string field (proto3), map keys and values included;
- a packed fixed32/fixed64 field whose length is not a multiple of 4/8, a packed
  varint that is cut short;
- nested messages, map entries and groups together deeper than 100 (upb's default).

Everything else is accepted as upb accepts it: unknown fields (groups included) are
kept, a known field with another wire type is an unknown field, repeated scalars may
come packed or not.

Reading is where betterproto2 0.10 and Google part even on valid bytes: betterproto2
replaces a singular message sent twice (Google merges), sets two members of a oneof,
misreads groups and known fields sent with another wire type (reads the group's
contents as fields, an int32 sent length-delimited as a list, an int in a string
field; raises KeyError for an int32 sent as fixed64), keeps a map entry that has
unknown fields (Google keeps the whole entry as an unknown field), leaves a map's
missing message or wrapper value None (Google: an empty message, or 0), gives a
missing enum value the default of the class's last map value type (a late-bound
lambda in betterproto2's ProtoClassMetadata), and reads bool varints beyond 64 bits
and enum varints beyond 32 bits otherwise. :func:`check` therefore also says whether
betterproto2's ``parse`` reads the bytes as Google does; :func:`decode` uses ``parse``
when it does (always, for what protobuf itself writes) and :func:`read`, which reads
as Google does, when it does not.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import betterproto2

from .fields import Field, fields_of

MAX_DEPTH = 100  # upb's default recursion limit: messages, map entries and groups
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

M = TypeVar("M", bound=betterproto2.Message)


class WireError(ValueError):
    """Bytes that Google's protobuf parser rejects for this message type."""


# What a known tag holds. The first three are varints.
VARINT, BOOL, ENUM, FIXED32, FIXED64, STRING, BYTES, MESSAGE, MAP = range(9)
PACKED_VARINT, PACKED_BOOL, PACKED_ENUM, PACKED_FIXED32, PACKED_FIXED64 = range(9, 14)

# Scalar types: their own wire type, and what the check does with the value.
_SCALARS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(
        [
            betterproto2.TYPE_INT32,
            betterproto2.TYPE_INT64,
            betterproto2.TYPE_UINT32,
            betterproto2.TYPE_UINT64,
            betterproto2.TYPE_SINT32,
            betterproto2.TYPE_SINT64,
        ],
        (0, VARINT),
    ),
    betterproto2.TYPE_BOOL: (0, BOOL),
    betterproto2.TYPE_ENUM: (0, ENUM),
    **dict.fromkeys(
        [betterproto2.TYPE_FIXED32, betterproto2.TYPE_SFIXED32, betterproto2.TYPE_FLOAT],
        (5, FIXED32),
    ),
    **dict.fromkeys(
        [betterproto2.TYPE_FIXED64, betterproto2.TYPE_SFIXED64, betterproto2.TYPE_DOUBLE],
        (1, FIXED64),
    ),
}
_LENGTH_DELIMITED = {
    betterproto2.TYPE_STRING: STRING,
    betterproto2.TYPE_BYTES: BYTES,
    betterproto2.TYPE_MESSAGE: MESSAGE,
    betterproto2.TYPE_MAP: MAP,
}


@dataclass(frozen=True, slots=True)
class _Slot:
    """A known tag: a field with its own wire type (or packed)."""

    kind: int
    field: Field
    label: str  # for error messages: "field 15 ('Kinds.name', string)"
    entry: _Table | None = None  # maps: the table of their entries

    def table(self) -> _Table:
        """The table of the message or map entry this field holds."""
        if self.entry is not None:
            return self.entry
        assert self.field.message is not None
        return _table(self.field.message)


@dataclass(slots=True)
class _Table:
    """How to check one message type (or one map's entries)."""

    name: str
    slots: dict[int, _Slot]  # by tag (field number << 3 | wire type)
    by_name: dict[str, _Slot]  # each field's slot for its own wire type
    numbers: frozenset[int]  # known field numbers, whatever their wire type
    stateful: bool  # has singular message fields or oneofs
    is_entry: bool = False
    value_needed: bool = False  # an entry whose missing value betterproto2 misreads
    oneofs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> names


_TABLES: dict[type, _Table] = {}


def _table(cls: type[betterproto2.Message]) -> _Table:
    table = _TABLES.get(cls)
    if table is None:
        table = _TABLES[cls] = _build(cls.__name__, fields_of(cls))
    return table


def _build(name: str, fields: tuple[Field, ...], is_entry: bool = False) -> _Table:
    slots: dict[int, _Slot] = {}
    by_name: dict[str, _Slot] = {}
    oneofs: dict[str, list[str]] = {}
    stateful = False
    for f in fields:
        label = f"field {f.number} ('{name}.{f.name}', {f.proto_type})"
        if f.oneof is not None:
            oneofs.setdefault(f.oneof, []).append(f.name)
            stateful = True
        if f.proto_type == betterproto2.TYPE_MESSAGE and not f.repeated:
            stateful = True
        entry = None
        if f.key is not None and f.value is not None:
            entry = _build(f"{name}.{f.name} entry", (f.key, f.value), is_entry=True)
        kind = _LENGTH_DELIMITED.get(f.proto_type)
        if kind is not None:
            slots[f.number << 3 | 2] = by_name[f.name] = _Slot(kind, f, label, entry)
            continue
        if f.proto_type not in _SCALARS:
            raise TypeError(f"{label}: unknown protobuf type")
        wire_type, kind = _SCALARS[f.proto_type]
        slots[f.number << 3 | wire_type] = by_name[f.name] = _Slot(kind, f, label)
        if f.repeated:  # packable: Google accepts both encodings
            slots[f.number << 3 | 2] = _Slot(kind + PACKED_VARINT, f, label)
    value = by_name.get("value") if is_entry else None
    return _Table(
        name,
        slots,
        by_name,
        frozenset(f.number for f in fields),
        stateful or is_entry,
        is_entry,
        # betterproto2 leaves a missing message value None, and gives a missing enum
        # value the default of the class's last map value type (a late-bound lambda).
        value is not None and value.kind in (MESSAGE, ENUM),
        {group: tuple(names) for group, names in oneofs.items()},
    )


def check(data: bytes, message_type: type[betterproto2.Message]) -> bool:
    """Raise WireError unless Google's parser accepts ``data`` as ``message_type``.

    Returns True when betterproto2's own ``parse`` reads the bytes as Google's parser
    does, False when only :func:`read` does.
    """
    return _scan(data, 0, len(data), _table(message_type), 0)


def decode(data: bytes, message_type: type[M]) -> M:
    """``data`` as a ``message_type``, read as Google's parser reads it (or WireError)."""
    if check(data, message_type):
        return message_type.parse(data)
    return _read(data, 0, len(data), message_type)


def read(data: bytes, message_type: type[M]) -> M:
    """Like :func:`decode`, but never through betterproto2's ``parse``."""
    check(data, message_type)
    return _read(data, 0, len(data), message_type)


# -- checking ---------------------------------------------------------------------------


def _varint(data: bytes, pos: int, end: int, max_bytes: int, what: str) -> tuple[int, int]:
    """The varint of at most ``max_bytes`` at ``pos`` (not past ``end``), and the next pos."""
    result = 0
    shift = 0
    for _ in range(max_bytes):
        if pos >= end:
            raise WireError(f"{what} runs past the end of the message")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise WireError(f"{what} is a varint longer than {max_bytes} bytes")


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    tag, pos = _varint(data, pos, end, 5, "a tag")
    if tag > _U32:
        raise WireError("a tag does not fit 32 bits")
    return tag, pos


def _length(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """The length at ``pos`` and the position after it; the stop must not pass ``end``."""
    length, pos = _varint(data, pos, end, 5, f"the length of {what}")
    if pos + length > end:
        raise WireError(f"{what} runs past the end of the message")
    return length, pos


def _skip(data: bytes, pos: int, end: int, tag: int, depth: int) -> int:
    """Step over an unknown field (groups included); return the position after it."""
    if tag >> 3 == 0:
        raise WireError("field number 0")
    if tag & 7 == 3:
        return _skip_group(data, pos, end, tag >> 3, depth)
    if tag & 7 == 4:
        raise WireError(f"end of group {tag >> 3} that was not started")
    return _skip_value(data, pos, end, tag)


def _skip_value(data: bytes, pos: int, end: int, tag: int) -> int:
    """Step over the value of a field that is not a group."""
    wire_type = tag & 7
    what = f"field {tag >> 3}"
    if wire_type == 0:
        return _varint(data, pos, end, 10, what)[1]
    if wire_type == 2:
        length, pos = _length(data, pos, end, what)
        return pos + length
    if wire_type in (1, 5):
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise WireError(f"{what} runs past the end of the message")
        return pos
    raise WireError(f"invalid wire type {wire_type} ({what})")


def _skip_group(data: bytes, pos: int, end: int, number: int, depth: int) -> int:
    """Step over the rest of group ``number``: up to and past its end-group tag."""
    groups = [number]  # the groups we are inside, innermost last
    if depth + 1 > MAX_DEPTH:
        raise WireError(f"messages and groups nested deeper than {MAX_DEPTH}")
    while groups:
        if pos >= end:
            raise WireError(f"group {groups[-1]} is not ended")
        tag, pos = _tag(data, pos, end)
        field, wire_type = tag >> 3, tag & 7  # field number 0 passes in a group, as in upb
        if wire_type == 3:
            groups.append(field)
            if depth + len(groups) > MAX_DEPTH:
                raise WireError(f"messages and groups nested deeper than {MAX_DEPTH}")
        elif wire_type == 4:
            if groups.pop() != field:
                raise WireError(f"end of group {field} that was not started")
        else:
            pos = _skip_value(data, pos, end, tag)
    return pos


def _bool_plain(value: int) -> bool:
    """betterproto2 reads a bool varint as ``value > 0``, Google its low 64 bits."""
    return not value >> 64 or bool(value & _U64)


def _enum_plain(value: int) -> bool:
    """betterproto2 reads an enum varint as int64, Google as int32."""
    value &= _U64
    return value < 0x80000000 or value >= (1 << 64) - 0x80000000


def _scan(data: bytes, pos: int, end: int, table: _Table, depth: int) -> bool:
    """Check ``data[pos:end]`` as one message; True if betterproto2 reads it as Google."""
    plain = True
    slots = table.slots
    seen: dict[int | str, int] | None = {} if table.stateful else None
    while pos < end:
        byte = data[pos]
        if byte < 0x80:  # field numbers up to 15
            tag = byte
            pos += 1
        elif pos + 1 < end and data[pos + 1] < 0x80:  # up to 2047
            tag = (byte & 0x7F) | data[pos + 1] << 7
            pos += 2
        else:
            tag, pos = _tag(data, pos, end)
        slot = slots.get(tag)
        if slot is None:
            # Unknown, or a known field with another wire type: Google keeps either as
            # an unknown field, betterproto2 misreads the latter and any group; an
            # entry with unknown fields is itself kept unknown by Google.
            if tag & 7 == 3 or table.is_entry or tag >> 3 in table.numbers:
                plain = False
            pos = _skip(data, pos, end, tag, depth)
            continue
        kind = slot.kind
        if kind <= ENUM:
            if pos < end and data[pos] < 0x80:
                pos += 1
            else:
                value, pos = _varint(data, pos, end, 10, slot.label)
                if kind == BOOL:
                    plain = plain and _bool_plain(value)
                elif kind == ENUM:
                    plain = plain and _enum_plain(value)
        elif kind in (FIXED32, FIXED64):
            pos += 4 if kind == FIXED32 else 8
            if pos > end:
                raise WireError(f"{slot.label} runs past the end of the message")
        else:
            if pos < end and data[pos] < 0x80 and pos + 1 + data[pos] <= end:
                length = data[pos]
                pos += 1
            else:
                length, pos = _length(data, pos, end, slot.label)
            stop = pos + length
            if kind == STRING:
                try:
                    data[pos:stop].decode()
                except UnicodeDecodeError:
                    raise WireError(f"invalid UTF-8 in {slot.label}") from None
            elif kind in (MESSAGE, MAP):
                if depth >= MAX_DEPTH:
                    raise WireError(f"messages and groups nested deeper than {MAX_DEPTH}")
                if not _scan(data, pos, stop, slot.table(), depth + 1):
                    plain = False
            elif kind != BYTES:
                plain = _scan_packed(data, pos, stop, slot) and plain
            pos = stop
        if seen is not None:
            f = slot.field
            if f.oneof is not None:  # a second member of a oneof: betterproto2 keeps both
                if seen.setdefault(f.oneof, f.number) != f.number:
                    plain = False
                seen[f.oneof] = f.number
            if kind == MESSAGE and not f.repeated:  # sent twice: Google merges
                if f.number in seen:
                    plain = False
                seen[f.number] = 1
            elif table.is_entry:
                seen[f.number] = 1
    if table.value_needed and seen is not None and 2 not in seen:
        plain = False
    return plain


def _scan_packed(data: bytes, pos: int, stop: int, slot: _Slot) -> bool:
    """Check a packed run; True if betterproto2 reads every element as Google does."""
    kind = slot.kind
    if kind in (PACKED_FIXED32, PACKED_FIXED64):
        size = 4 if kind == PACKED_FIXED32 else 8
        if (stop - pos) % size:
            raise WireError(f"packed {slot.label} has a length that is not a multiple of {size}")
        return True
    plain = True
    while pos < stop:
        if data[pos] < 0x80:  # one byte: the common case, and never misread
            pos += 1
            continue
        value, pos = _varint(data, pos, stop, 10, f"packed {slot.label}")
        if kind == PACKED_BOOL:
            plain = plain and _bool_plain(value)
        elif kind == PACKED_ENUM:
            plain = plain and _enum_plain(value)
    return plain


# -- reading as Google does (bytes already checked) -------------------------------------


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _unzigzag(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return (value >> 1) ^ -(value & 1)


_FROM_VARINT: dict[str, Callable[[int], Any]] = {
    betterproto2.TYPE_INT32: lambda v: _signed(v, 32),
    betterproto2.TYPE_INT64: lambda v: _signed(v, 64),
    betterproto2.TYPE_UINT32: lambda v: v & _U32,
    betterproto2.TYPE_UINT64: lambda v: v & _U64,
    betterproto2.TYPE_SINT32: lambda v: _unzigzag(v, 32),
    betterproto2.TYPE_SINT64: lambda v: _unzigzag(v, 64),
    betterproto2.TYPE_BOOL: lambda v: bool(v & _U64),
    betterproto2.TYPE_ENUM: lambda v: _signed(v, 32),
}
_FIXED_FORMATS = {
    betterproto2.TYPE_FIXED32: struct.Struct("<I"),
    betterproto2.TYPE_SFIXED32: struct.Struct("<i"),
    betterproto2.TYPE_FLOAT: struct.Struct("<f"),
    betterproto2.TYPE_FIXED64: struct.Struct("<Q"),
    betterproto2.TYPE_SFIXED64: struct.Struct("<q"),
    betterproto2.TYPE_DOUBLE: struct.Struct("<d"),
}
_DEFAULTS: dict[str, Any] = {
    betterproto2.TYPE_STRING: "",
    betterproto2.TYPE_BYTES: b"",
    betterproto2.TYPE_BOOL: False,
    betterproto2.TYPE_FLOAT: 0.0,
    betterproto2.TYPE_DOUBLE: 0.0,
}


def _read(data: bytes, pos: int, end: int, cls: type[M]) -> M:
    """``data[pos:end]`` (checked) as a ``cls``, with Google's reading of every field."""
    table = _table(cls)
    values, parts, unknown = _read_fields(data, pos, end, table)
    for name, chunks in parts.items():
        values[name] = _message(table.by_name[name], b"".join(chunks))
    message = cls(**values)
    # Kept as betterproto2's own parse keeps them, so that encoding the message again
    # writes them back; betterproto2 has no public way to set them (its attribute).
    message._unknown_fields = bytes(unknown)
    return message


def _read_fields(
    data: bytes, pos: int, end: int, table: _Table
) -> tuple[dict[str, Any], dict[str, list[bytes]], bytearray]:
    """Field values by name, the payloads of singular messages (Google merges them), and
    the unknown fields' bytes."""
    values: dict[str, Any] = {}
    parts: dict[str, list[bytes]] = {}
    unknown = bytearray()
    while pos < end:
        start = pos
        tag, pos = _tag(data, pos, end)
        slot = table.slots.get(tag)
        if slot is None:
            pos = _skip(data, pos, end, tag, 0)
            unknown += data[start:pos]
            continue
        f = slot.field
        if f.oneof is not None:  # setting one member clears the others
            for other in table.oneofs[f.oneof]:
                if other != f.name:
                    values.pop(other, None)
                    parts.pop(other, None)
        kind = slot.kind
        value: Any
        if kind <= ENUM:
            raw, pos = _varint(data, pos, end, 10, slot.label)
            value = _scalar(f, raw)
        elif kind in (FIXED32, FIXED64):
            value = _FIXED_FORMATS[f.proto_type].unpack_from(data, pos)[0]
            pos += 4 if kind == FIXED32 else 8
        else:
            length, pos = _length(data, pos, end, slot.label)
            stop = pos + length
            payload = data[pos:stop]
            pos = stop
            if kind == MESSAGE:
                if not f.repeated:
                    parts.setdefault(f.name, []).append(payload)
                    continue
                value = _message(slot, payload)
            elif kind == MAP:
                entry = _read_entry(payload, slot)
                if entry is None:  # an entry with unknown fields stays unknown, as in upb
                    unknown += data[start:stop]
                else:
                    values.setdefault(f.name, {})[entry[0]] = entry[1]
                continue
            elif kind == STRING:
                value = payload.decode()
            elif kind == BYTES:
                value = bytes(payload)
            else:
                values.setdefault(f.name, []).extend(_read_packed(payload, slot))
                continue
        if f.repeated:
            values.setdefault(f.name, []).append(value)
        else:
            values[f.name] = value
    return values, parts, unknown


def _scalar(f: Field, raw: int) -> Any:
    value = _FROM_VARINT[f.proto_type](raw)
    return f.enum(value) if f.enum is not None else value


def _read_packed(payload: bytes, slot: _Slot) -> list[Any]:
    f = slot.field
    if slot.kind in (PACKED_FIXED32, PACKED_FIXED64):
        return [item[0] for item in _FIXED_FORMATS[f.proto_type].iter_unpack(payload)]
    found = []
    pos = 0
    while pos < len(payload):
        raw, pos = _varint(payload, pos, len(payload), 10, slot.label)
        found.append(_scalar(f, raw))
    return found


def _message(slot: _Slot, payload: bytes) -> Any:
    """A message field's value: the message, or the plain value of a wrapper type."""
    f = slot.field
    assert f.message is not None
    message: Any = _read(payload, 0, len(payload), f.message)
    return message.to_wrapped() if f.unwrap else message


def _read_entry(payload: bytes, slot: _Slot) -> tuple[Any, Any] | None:
    """A map entry's key and value, or None if Google keeps the entry as unknown."""
    entry = slot.entry
    assert entry is not None
    values, parts, unknown = _read_fields(payload, 0, len(payload), entry)
    if unknown:
        return None
    key_field, value_field = slot.field.key, slot.field.value
    assert key_field is not None
    assert value_field is not None
    key = values.get("key", _default(key_field))
    if value_field.message is not None:
        value_slot = entry.slots[2 << 3 | 2]
        return key, _message(value_slot, b"".join(parts.get("value", [])))
    return key, values.get("value", _default(value_field))


def _default(f: Field) -> Any:
    if f.enum is not None:
        return f.enum(0)
    return _DEFAULTS.get(f.proto_type, 0)
