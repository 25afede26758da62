"""serving.wire against Google's parser (upb), on a message with every kind of field.

tests/proto/fieldkinds/fieldkinds.proto is compiled twice: by betterproto2 into
tests/gen (committed, like gen/) and by protoc's Python plugin at test time, for the
reference. For every byte string tried, StrictCodec must reject it exactly when
protobuf's ``FromString`` does and otherwise read what protobuf reads: the same fields,
presence, map contents and unknown fields (compared as trees; NaN equals NaN).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import struct
from types import ModuleType
from typing import Any

import betterproto2
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError as PbDecodeError
from google.protobuf.message import Message as PbMessage
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from wirebytes import delimited, tag, varint

from fieldkinds_gen.testing.fieldkinds import Colour, Inner, Kinds
from number_service.serving import wire
from number_service.serving.codec import StrictCodec
from number_service.serving.wire import MAX_DEPTH, WireError

FD = FieldDescriptor
# betterproto2 shows these as plain values (and so drops unknown fields inside them).
WRAPPERS = {"google.protobuf.Int32Value", "google.protobuf.StringValue"}
Tree = dict[Any, Any]
# Parsing 100 levels deep takes betterproto2 a while; the first example builds tables.
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the two readings, as comparable trees -------------------------------------------


def _float(value: float) -> Any:
    return "nan" if math.isnan(value) else struct.pack("<d", value)  # keeps -0.0 apart


def _scalar(value: Any) -> tuple[type, Any]:
    """A value with its type, so that 0, 0.0 and False stay apart (enums are ints)."""
    if isinstance(value, bool):
        return bool, value
    return (int if isinstance(value, int) else type(value)), value


def google_tree(message: PbMessage, *, signed_zero: bool = True) -> Tree:
    """Field number -> value (None where a field with presence is absent), plus the
    unknown fields' bytes, for one of protobuf's messages.

    ``signed_zero=False``: read -0.0 in a float field without presence as 0.0, as
    betterproto2 writes it (see test_betterproto2_writes_negative_zero).
    """
    tree: Tree = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            tree[fd.number] = {k: _google_value(value_fd, v, signed_zero) for k, v in value.items()}
        elif fd.is_repeated:
            tree[fd.number] = [_google_value(fd, v, signed_zero) for v in value]
        elif fd.has_presence and not message.HasField(fd.name):
            tree[fd.number] = None
        elif not signed_zero and not fd.has_presence and value == 0.0:
            tree[fd.number] = _google_value(fd, type(value)(0), signed_zero)
        else:
            tree[fd.number] = _google_value(fd, value, signed_zero)
    tree["unknown"] = unknown_fields(type(message), message.SerializeToString())
    return tree


def unknown_fields(pb_class: type[PbMessage], data: bytes) -> bytes:
    """The unknown fields that protobuf keeps when it reads ``data`` as a ``pb_class``.

    Comparing these rather than raw bytes matters for one case only: a map entry that
    protobuf keeps unknown (it has unknown fields itself) is kept re-encoded by upb
    (key, value, then the entry's unknown fields) and as it came by wire.read; read
    again by protobuf, both are the same entry.
    """
    bare = pb_class.FromString(data)
    for fd in bare.DESCRIPTOR.fields:
        bare.ClearField(fd.name)
    return bytes(bare.SerializeToString())


def _google_value(fd: FieldDescriptor, value: Any, signed_zero: bool = True) -> Any:
    if fd.message_type is not None:
        if fd.message_type.full_name in WRAPPERS:
            return _scalar(value.value)
        return google_tree(value, signed_zero=signed_zero)
    if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return _float(value)
    return _scalar(value)


def betterproto_tree(message: betterproto2.Message, pb2: ModuleType) -> Tree:
    """The same tree for a betterproto2 message, from betterproto2's own field metadata
    (``pb2``: protobuf's classes, for reading the unknown fields)."""
    tree: Tree = {}
    for item in dataclasses.fields(message):  # type: ignore[arg-type]
        meta = betterproto2.FieldMetadata.get(item)
        value = getattr(message, item.name)
        if meta.map_meta is not None:
            value_meta = meta.map_meta[1]
            tree[meta.number] = {
                k: _betterproto_value(value_meta, v, pb2) for k, v in value.items()
            }
        elif meta.repeated:
            tree[meta.number] = [_betterproto_value(meta, v, pb2) for v in value]
        elif value is None:
            tree[meta.number] = None
        else:
            tree[meta.number] = _betterproto_value(meta, value, pb2)
    pb_class = getattr(pb2, type(message).__name__)
    tree["unknown"] = unknown_fields(pb_class, message._unknown_fields)
    return tree


def _betterproto_value(meta: betterproto2.FieldMetadata, value: Any, pb2: ModuleType) -> Any:
    if meta.unwrap is not None:
        return _scalar(value)
    if meta.proto_type == betterproto2.TYPE_MESSAGE:
        return betterproto_tree(value, pb2)
    if meta.proto_type in (betterproto2.TYPE_FLOAT, betterproto2.TYPE_DOUBLE):
        return _float(value)
    if meta.proto_type == betterproto2.TYPE_ENUM and not isinstance(value, enum.IntEnum):
        return ("not an enum", value)
    return _scalar(value)


def google(pb2: ModuleType, data: bytes, *, signed_zero: bool = True) -> Tree | None:
    """What protobuf reads from ``data`` as a Kinds, or None where it rejects the bytes."""
    try:
        return google_tree(pb2.Kinds.FromString(data), signed_zero=signed_zero)
    except PbDecodeError:
        return None


def note(what: str) -> None:
    """Count ``what`` in hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(what)


def assert_as_google(pb2: ModuleType, data: bytes) -> None:
    """StrictCodec rejects ``data`` exactly when protobuf does, else reads what it reads."""
    expected = google(pb2, data)
    try:
        plain = wire.check(data, Kinds)
    except WireError:
        note("rejected")
        assert expected is None, "rejected what protobuf accepts"
        with pytest.raises(WireError):
            StrictCodec().decode(data, Kinds)
        return
    assert expected is not None, "accepted what protobuf rejects"
    note("accepted, betterproto2's parse reads it" if plain else "accepted, read by wire.read")
    message = StrictCodec().decode(data, Kinds)
    assert betterproto_tree(message, pb2) == expected
    assert betterproto_tree(wire.read(data, Kinds), pb2) == expected  # the fallback, always
    if plain:
        assert betterproto_tree(Kinds.parse(data), pb2) == expected
    # What we read, written again by betterproto2, reads back the same in protobuf
    # (but for the sign of a zero, which betterproto2 drops: an xfail below).
    again = google(pb2, StrictCodec().encode(message, Kinds), signed_zero=False)
    assert again == google(pb2, data, signed_zero=False)


# -- byte strings to try -------------------------------------------------------------

int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
texts = st.text(max_size=6)
blobs = st.binary(max_size=6)
enum_values = st.sampled_from([0, 1, 2, -1, 99, -5, 2**31 - 1, -(2**31)])


def _inner(pb2: ModuleType, child: PbMessage | None, **fields: Any) -> PbMessage:
    inner = pb2.Inner(**fields)
    if child is not None:
        inner.child.CopyFrom(child)
    return inner


@functools.cache
def google_messages(pb2: ModuleType) -> st.SearchStrategy[PbMessage]:
    """Random Kinds built with protobuf's own classes (so their encoding is valid);
    built once, as hypothesis spends more time building strategies than drawing."""
    leaf = st.builds(functools.partial(_inner, pb2, None), a=int32s, s=texts)
    inners = st.recursive(
        leaf,
        lambda children: st.builds(
            functools.partial(_inner, pb2), children, a=int32s, r=st.lists(int64s, max_size=3)
        ),
        max_leaves=3,
    )
    fields = st.fixed_dictionaries(
        {},
        optional={
            "i32": int32s,
            "i64": int64s,
            "u32": st.integers(0, 2**32 - 1),
            "u64": st.integers(0, 2**64 - 1),
            "s32": int32s,
            "s64": int64s,
            "flag": st.booleans(),
            "colour": enum_values,
            "f32": st.integers(0, 2**32 - 1),
            "f64": st.integers(0, 2**64 - 1),
            "sf32": int32s,
            "sf64": int64s,
            "fl": st.floats(width=32),
            "db": st.floats(),
            "name": texts,
            "blob": blobs,
            "inner": inners,
            "r_i32": st.lists(int32s, max_size=3),
            "r_u64": st.lists(st.integers(0, 2**64 - 1), max_size=3),
            "r_s32": st.lists(int32s, max_size=3),
            "r_flag": st.lists(st.booleans(), max_size=3),
            "r_colour": st.lists(enum_values, max_size=3),
            "r_f32": st.lists(st.integers(0, 2**32 - 1), max_size=3),
            "r_sf64": st.lists(int64s, max_size=3),
            "r_fl": st.lists(st.floats(width=32), max_size=3),
            "r_db": st.lists(st.floats(), max_size=3),
            "r_i64_unpacked": st.lists(int64s, max_size=3),
            "r_name": st.lists(texts, max_size=3),
            "r_blob": st.lists(blobs, max_size=3),
            "r_inner": st.lists(inners, max_size=3),
            "counts": st.dictionaries(texts, int32s, max_size=3),
            "inners": st.dictionaries(int64s, inners, max_size=3),
            "colours": st.dictionaries(st.integers(0, 2**32 - 1), enum_values, max_size=3),
            "names": st.dictionaries(st.booleans(), texts, max_size=3),
            "blobs": st.dictionaries(int32s, blobs, max_size=3),
            "doubles": st.dictionaries(st.integers(0, 2**64 - 1), st.floats(), max_size=3),
            "opt_i32": int32s,
            "opt_name": texts,
            "opt_colour": enum_values,
            "wrapped": int32s.map(lambda v: {"value": v}),
            "r_wrapped": st.lists(texts.map(lambda v: {"value": v}), max_size=3),
            "wrapped_counts": st.dictionaries(
                texts, int32s.map(lambda v: {"value": v}), max_size=3
            ),
            "far": int64s,
        },
    )
    choice = st.one_of(
        st.just({}),
        st.fixed_dictionaries({"c_i32": int32s}),
        st.fixed_dictionaries({"c_name": texts}),
        st.fixed_dictionaries({"c_inner": inners}),
    )
    return st.builds(lambda kw, one: pb2.Kinds(**kw, **one), fields, choice)


_NATIVE_WIRE_TYPE = {
    **dict.fromkeys(
        [
            FD.TYPE_INT32,
            FD.TYPE_INT64,
            FD.TYPE_UINT32,
            FD.TYPE_UINT64,
            FD.TYPE_SINT32,
            FD.TYPE_SINT64,
            FD.TYPE_BOOL,
            FD.TYPE_ENUM,
        ],
        0,
    ),
    **dict.fromkeys([FD.TYPE_FIXED64, FD.TYPE_SFIXED64, FD.TYPE_DOUBLE], 1),
    **dict.fromkeys([FD.TYPE_FIXED32, FD.TYPE_SFIXED32, FD.TYPE_FLOAT], 5),
    **dict.fromkeys([FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE], 2),
}
# Small, at the edges of 32 and 64 bits, and up to the 70 bits a 10-byte varint holds.
varint_values = st.one_of(
    st.integers(0, 150),
    st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, 2**70 - 1]),
    st.integers(0, 2**70 - 1),
)


@st.composite
def varints(draw: st.DrawFn, max_bytes: int = 10) -> bytes:
    """A varint, now and then over-long (padded with 0x80 bytes; one too many, rarely)."""
    raw = varint(draw(varint_values))
    pad = draw(st.sampled_from([0] * 10 + [1, max_bytes - len(raw), max_bytes + 1 - len(raw)]))
    if pad > 0:
        raw = bytes(b | 0x80 for b in raw) + b"\x80" * (pad - 1) + b"\x00"
    return raw


def _element(fd: FieldDescriptor) -> st.SearchStrategy[bytes]:
    wire_type = _NATIVE_WIRE_TYPE[fd.type]
    if wire_type == 0:
        return varints()
    return st.binary(min_size=8 if wire_type == 1 else 4, max_size=8 if wire_type == 1 else 4)


@st.composite
def payloads(draw: st.DrawFn, fd: FieldDescriptor | None, inner: Descriptor, depth: int) -> bytes:
    """The body of a length-delimited field: what ``fd`` holds, give or take."""
    if fd is None:
        return draw(st.one_of(blobs, message_bytes(inner, inner, depth + 1)))
    if fd.type == FD.TYPE_STRING:
        return draw(st.one_of(texts.map(str.encode), st.binary(max_size=4)))
    if fd.type == FD.TYPE_BYTES:
        return draw(blobs)
    if fd.type == FD.TYPE_MESSAGE:
        return draw(message_bytes(fd.message_type, inner, depth + 1)) if depth < 3 else b""
    # A scalar as a packed run: each element, and rarely a stray byte or two.
    body = b"".join(draw(st.lists(_element(fd), max_size=3)))
    return body + draw(st.sampled_from([b""] * 8 + [b"\x80", b"\x01\x02"]))


@st.composite
def field_bytes(draw: st.DrawFn, md: Descriptor, inner: Descriptor, depth: int) -> bytes:
    """One field of ``md`` (or an unknown one): usually well-formed, with its own wire
    type; sometimes with another wire type, a wrong length, an over-long tag, a group
    (holding fields of ``inner``)."""
    fields = md.fields
    pick = draw(st.integers(0, len(fields)))
    fd = fields[pick] if pick < len(fields) else None
    if fd is None:
        known = {f.number for f in fields}
        numbers = [n for n in (0, 3, 18, 99, 19000, 2**29 - 1) if n not in known]
        number = draw(st.sampled_from(numbers))
        wire_type = draw(st.sampled_from([0, 1, 2, 2, 3, 5, 4, 6]))
    else:
        number = fd.number
        wire_type = _NATIVE_WIRE_TYPE[fd.type]
        if fd.is_repeated and wire_type != 2 and draw(st.booleans()):
            wire_type = 2  # packed
        if draw(st.integers(0, 9)) == 0:
            wire_type = draw(st.integers(0, 7))
    key = varint(number << 3 | wire_type)
    if draw(st.integers(0, 19)) == 0:  # over-long tag: 5 bytes at most are allowed
        key = bytes(b | 0x80 for b in key) + b"\x80" * (5 - len(key)) + b"\x00"
    if wire_type == 0:
        return key + draw(varints())
    if wire_type == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 2:
        body = draw(payloads(fd, inner, depth))
        length = len(body) + draw(st.sampled_from([0] * 12 + [-1, 1, 2**31]))
        return key + varint(max(length, 0)) + body
    if wire_type == 3 and depth < 4:
        fields_inside = draw(message_bytes(inner, inner, depth + 1))
        end = number if draw(st.integers(0, 9)) else number + 1
        return key + fields_inside + tag(end, 4)
    return key  # an end-group alone, wire types 6 and 7, or a group never ended


@functools.cache
def message_bytes(md: Descriptor, inner: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Fields of ``md`` in any order, repeats allowed, each as field_bytes makes them."""
    parts = st.lists(field_bytes(md, inner, depth), max_size=6 if depth == 0 else 3)
    return parts.map(b"".join)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """A Kinds whose deepest point (messages, map entries, groups) is around 100 down."""
    levels = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 2))
    route = draw(st.sampled_from(["inner", "r_inner", "c_inner", "inners", "groups"]))
    if route == "groups":
        return tag(99, 3) * levels + tag(99, 4) * levels
    groups = draw(st.sampled_from([0, 0, 1, 3]))
    chain = tag(9, 3) * groups + tag(9, 4) * groups
    chain += draw(st.sampled_from([b"", tag(1, 0) + b"\x01", delimited(2, b"\xff")]))
    above = 2 if route == "inners" else 1  # Kinds' field, and for a map its entry too
    for _ in range(levels - groups - above):
        chain = delimited(3, chain)  # Inner.child
    if route == "inners":
        return delimited(41, tag(1, 0) + b"\x01" + delimited(2, chain))
    return delimited({"inner": 17, "r_inner": 32, "c_inner": 52}[route], chain)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, md: Descriptor, inner: Descriptor) -> bytes:
    """A valid encoding, cut, with bytes changed or dropped, or fields inserted."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["cut", "flip", "drop", "insert", "insert"]))
        if how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(field_bytes(md, inner, 0))
        elif at < len(data):
            if how == "flip":
                data[at] = draw(st.integers(0, 255))
            else:
                del data[at]
    return bytes(data)


# -- accepted exactly when protobuf accepts, read as protobuf reads ------------------


@settings(FAST, max_examples=300)
@given(st.binary(max_size=48))
@example(b"")
def test_random_bytes(fieldkinds_pb2: ModuleType, data: bytes) -> None:
    assert_as_google(fieldkinds_pb2, data)


@settings(FAST, max_examples=100)
@given(st.data())
def test_what_protobuf_writes(fieldkinds_pb2: ModuleType, data: st.DataObject) -> None:
    encoded = data.draw(google_messages(fieldkinds_pb2)).SerializeToString()
    assert wire.check(encoded, Kinds), "betterproto2's own parse should read what protobuf writes"
    assert_as_google(fieldkinds_pb2, encoded)


@settings(FAST, max_examples=200)
@given(st.data())
def test_what_protobuf_writes_mutated(fieldkinds_pb2: ModuleType, data: st.DataObject) -> None:
    valid = data.draw(google_messages(fieldkinds_pb2)).SerializeToString()
    kinds, inner = fieldkinds_pb2.Kinds.DESCRIPTOR, fieldkinds_pb2.Inner.DESCRIPTOR
    assert_as_google(fieldkinds_pb2, data.draw(mutated(valid, kinds, inner)))


@settings(FAST, max_examples=60)
@given(st.data())
def test_concatenated_messages(fieldkinds_pb2: ModuleType, data: st.DataObject) -> None:
    """Concatenation is protobuf's merge: singular messages merge, later scalars win."""
    first, second = (data.draw(google_messages(fieldkinds_pb2)) for _ in range(2))
    assert_as_google(fieldkinds_pb2, first.SerializeToString() + second.SerializeToString())


@settings(FAST, max_examples=400)
@given(st.data())
def test_bytes_shaped_by_the_schema(fieldkinds_pb2: ModuleType, data: st.DataObject) -> None:
    kinds, inner = fieldkinds_pb2.Kinds.DESCRIPTOR, fieldkinds_pb2.Inner.DESCRIPTOR
    assert_as_google(fieldkinds_pb2, data.draw(message_bytes(kinds, inner)))


@settings(FAST, max_examples=60)
@given(deep())
def test_deep_nesting(fieldkinds_pb2: ModuleType, data: bytes) -> None:
    assert_as_google(fieldkinds_pb2, data)


# Where UTF-8 validators tend to differ: surrogates, over-long forms, the last code
# point and the first beyond it, cut sequences.
UTF8_EDGES = [
    b"\xed\x9f\xbf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xee\x80\x80",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xc2\x80",
    b"\xe0\x80\x80",
    b"\xe0\xa0\x80",
    b"\xf0\x8f\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xef\xbb\xbf",
    b"\xe2\x82",
    b"\x80",
    b"\x00",
]


@settings(FAST, max_examples=300)
@given(
    st.lists(st.one_of(st.sampled_from(UTF8_EDGES), st.binary(max_size=2)), max_size=4),
    st.sampled_from([15, 30, 51, 61]),
)
def test_strings_are_utf8_as_upb_sees_it(
    fieldkinds_pb2: ModuleType, pieces: list[bytes], number: int
) -> None:
    text = b"".join(pieces)
    assert_as_google(fieldkinds_pb2, delimited(number, text))
    assert_as_google(fieldkinds_pb2, delimited(43, delimited(2, text)))  # a map value


def below(levels: int) -> bytes:
    """An Inner with ``levels`` more below it: child, child.child, ..."""
    body = b""
    for _ in range(levels):
        body = delimited(3, body)
    return body


def chain(levels: int) -> bytes:
    """A Kinds with ``levels`` messages below it: inner, then inner.child, ..."""
    return delimited(17, below(levels - 1))


@pytest.mark.parametrize(
    ("data", "accepted"),
    [
        (chain(MAX_DEPTH), True),
        (chain(MAX_DEPTH + 1), False),
        (tag(99, 3) * MAX_DEPTH + tag(99, 4) * MAX_DEPTH, True),
        (tag(99, 3) * (MAX_DEPTH + 1) + tag(99, 4) * (MAX_DEPTH + 1), False),
        # The entry counts as a level, its value as another.
        (delimited(41, delimited(2, below(MAX_DEPTH - 2))), True),
        (delimited(41, delimited(2, below(MAX_DEPTH - 1))), False),
        # Groups count from the depth of the message they are in.
        (delimited(17, tag(9, 3) * (MAX_DEPTH - 1) + tag(9, 4) * (MAX_DEPTH - 1)), True),
        (delimited(17, tag(9, 3) * MAX_DEPTH + tag(9, 4) * MAX_DEPTH), False),
    ],
)
def test_nesting_limit_is_upbs(fieldkinds_pb2: ModuleType, data: bytes, accepted: bool) -> None:
    assert (google(fieldkinds_pb2, data) is not None) is accepted
    assert_as_google(fieldkinds_pb2, data)


# -- what is rejected, and why -------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (tag(1, 0), r"field 1 \('Kinds.i32', int32\) runs past the end"),
        (tag(2, 0) + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x88\x80\x80\x80\x80\x00\x05", "a tag is a varint longer than 5 bytes"),
        (b"\xf8\xff\xff\xff\x1f\x01", "a tag does not fit 32 bits"),
        (b"\x00\x01", "field number 0"),
        (delimited(17, b"\x00\x01"), "field number 0"),
        (b"\x0e", "invalid wire type 6"),
        (tag(99, 7), "invalid wire type 7"),
        (tag(15, 2) + b"\x05ab", r"field 15 \('Kinds.name', string\) runs past the end"),
        (tag(99, 2) + b"\x05ab", "field 99 runs past the end"),
        (tag(16, 2) + b"\x80\x80\x80\x80\x80\x00", "length of field 16 .* longer than 5"),
        (tag(9, 5) + b"\x01", r"field 9 \('Kinds.f32', fixed32\) runs past the end"),
        (tag(14, 1) + b"\x01", r"field 14 \('Kinds.db', double\) runs past the end"),
        (delimited(15, b"\xff"), r"invalid UTF-8 in field 15 \('Kinds.name', string\)"),
        (delimited(30, b"\xed\xa0\x80"), r"invalid UTF-8 in field 30 \('Kinds.r_name'"),
        (delimited(17, delimited(2, b"\xc0\x80")), r"invalid UTF-8 in field 2 \('Inner.s'"),
        (
            delimited(40, delimited(1, b"\xf4\x90\x80\x80")),
            "invalid UTF-8 .*Kinds.counts entry.key",
        ),
        (delimited(43, delimited(2, b"a\xff")), "invalid UTF-8 .*Kinds.names entry.value"),
        (delimited(25, b"\x01\x02\x03"), r"packed field 25 .* not a multiple of 4"),
        (delimited(26, b"\x01" * 9), r"packed field 26 .* not a multiple of 8"),
        (delimited(20, b"\x80"), r"packed field 20 \('Kinds.r_i32', int32\) runs past the end"),
        (tag(5, 4), "end of group 5 that was not started"),
        (tag(99, 3) + tag(1, 0) + b"\x01", "group 99 is not ended"),
        (tag(99, 3) + tag(98, 4), "end of group 98 that was not started"),
        (delimited(17, tag(99, 3)) + tag(99, 4), "group 99 is not ended"),
        (tag(99, 3) + delimited(98, tag(99, 4)), "group 99 is not ended"),
        (chain(MAX_DEPTH + 1), "nested deeper than 100"),
    ],
)
def test_rejects_what_protobuf_rejects(
    fieldkinds_pb2: ModuleType, data: bytes, reason: str
) -> None:
    assert google(fieldkinds_pb2, data) is None
    with pytest.raises(WireError, match=reason):
        wire.check(data, Kinds)
    with pytest.raises(WireError, match=reason):
        StrictCodec().decode(data, Kinds)


# -- valid bytes that betterproto2's parse reads otherwise than protobuf -------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            delimited(17, tag(1, 0) + b"\x05") + delimited(17, delimited(2, b"x")),
            id="singular message twice: protobuf merges, betterproto2 keeps the last",
        ),
        pytest.param(
            delimited(70, tag(1, 0) + b"\x05") + delimited(70, b""),
            id="wrapper twice: protobuf merges, betterproto2 keeps the last",
        ),
        pytest.param(
            delimited(41, tag(1, 0) + b"\x01" + delimited(2, b"\x08\x05") + delimited(2, b"")),
            id="map entry's message value twice: protobuf merges",
        ),
        pytest.param(
            tag(50, 0) + b"\x05" + delimited(51, b"hi"),
            id="two members of a oneof: protobuf keeps the last, betterproto2 both",
        ),
        pytest.param(
            delimited(52, b"\x08\x05") + tag(50, 0) + b"\x01" + delimited(52, b"\x12\x01x"),
            id="oneof message, other member, message again: protobuf starts it afresh",
        ),
        pytest.param(
            delimited(1, b"\x05"),
            id="int32 length-delimited: protobuf keeps it unknown, betterproto2 reads a list",
        ),
        pytest.param(
            tag(1, 1) + b"\x00" * 8,
            id="int32 as fixed64: protobuf keeps it unknown, betterproto2 raises KeyError",
        ),
        pytest.param(
            tag(15, 0) + b"\x05",
            id="string as a varint: protobuf keeps it unknown, betterproto2 sets name to an int",
        ),
        pytest.param(
            tag(99, 3) + tag(1, 0) + b"\x05" + tag(99, 4),
            id="unknown group: betterproto2 reads what is inside as fields",
        ),
        pytest.param(
            delimited(40, delimited(1, b"a") + tag(3, 0) + b"\x01"),
            id="map entry with an unknown field: protobuf keeps the whole entry unknown",
        ),
        pytest.param(
            delimited(40, delimited(1, b"a") + delimited(2, b"\x01")),
            id="map entry value with another wire type: protobuf keeps the entry unknown",
        ),
        pytest.param(
            delimited(72, delimited(1, b"a")),
            id="map entry without its wrapper value: protobuf 0, betterproto2 None",
        ),
        pytest.param(
            delimited(41, tag(1, 0) + b"\x05"),
            id="map entry without its message value: protobuf an empty message, betterproto2 None",
        ),
        pytest.param(
            delimited(42, tag(1, 0) + b"\x01"),
            id="map entry without its enum value: betterproto2 gives the last map's default, 0.0",
        ),
        pytest.param(
            tag(7, 0) + b"\x80" * 9 + b"\x02",
            id="bool of 2**64: protobuf reads the low 64 bits (false), betterproto2 true",
        ),
        pytest.param(
            delimited(23, b"\x80" * 9 + b"\x02"),
            id="packed bool of 2**64",
        ),
        pytest.param(
            tag(8, 0) + varint(2**32 - 1),
            id="enum of 2**32-1: protobuf reads int32 -1, betterproto2 4294967295",
        ),
    ],
)
def test_reads_as_protobuf_where_betterproto2_does_not(
    fieldkinds_pb2: ModuleType, data: bytes
) -> None:
    expected = google(fieldkinds_pb2, data)
    assert expected is not None
    assert wire.check(data, Kinds) is False
    try:
        theirs: Any = betterproto_tree(Kinds.parse(data), fieldkinds_pb2)
    except Exception as error:
        theirs = error
    # If this fails, betterproto2 now reads these bytes as protobuf does, and
    # wire.check may leave them to betterproto2's parse.
    assert theirs != expected
    assert betterproto_tree(StrictCodec().decode(data, Kinds), fieldkinds_pb2) == expected


def test_needs_no_descriptor() -> None:
    """tests/gen is generated without DESCRIPTOR, so the check cannot lean on it."""
    assert not hasattr(Kinds, "DESCRIPTOR")
    assert wire.check(bytes(Kinds(inner=Inner(a=1), colour=Colour.RED)), Kinds)


@pytest.mark.xfail(
    strict=True,
    reason="betterproto2 0.10 leaves out a float field equal to its default 0.0, and "
    "-0.0 == 0.0: protobuf writes -0.0 (its sign bit), betterproto2 writes nothing",
)
def test_betterproto2_writes_negative_zero(fieldkinds_pb2: ModuleType) -> None:
    message = Kinds(fl=-0.0, inner=Inner(), r_db=[-0.0])
    written = StrictCodec().encode(message, Kinds)
    assert written == fieldkinds_pb2.Kinds(fl=-0.0, inner={}, r_db=[-0.0]).SerializeToString()
