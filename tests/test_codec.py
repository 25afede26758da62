"""NumberCodec against the references: betterproto's bytes and Google's parser."""

from __future__ import annotations

from types import ModuleType

import pytest
from google.protobuf.message import DecodeError as PbDecodeError
from hypothesis import example, given, settings
from hypothesis import strategies as st
from wirebytes import wire_messages

from number_service import INT32_MAX, INT32_MIN
from number_service.codec import (
    DecodeError,
    NumberCodec,
    decode_int32_field,
    encode_int32_field,
)
from number_service_gen.tutorial import NumberRequest, NumberResponse

int32s = st.integers(INT32_MIN, INT32_MAX)


def reference(pb2: ModuleType, data: bytes) -> int | None:
    """What Google's parser reads as num, or None where it rejects the bytes."""
    try:
        return int(pb2.NumberRequest.FromString(data).num)
    except PbDecodeError:
        return None


def ours(data: bytes) -> int | None:
    try:
        return decode_int32_field(data)
    except DecodeError:
        return None


@given(int32s)
@example(0)
@example(INT32_MIN)
@example(INT32_MAX)
@example(-1)
def test_encoding_is_byte_identical(pb2: ModuleType, n: int) -> None:
    encoded = encode_int32_field(n)
    assert encoded == bytes(NumberRequest(num=n)) == bytes(NumberResponse(sum=n))
    assert encoded == pb2.NumberRequest(num=n).SerializeToString()
    assert encoded == pb2.NumberResponse(sum=n).SerializeToString()
    codec = NumberCodec()
    assert codec.encode(NumberResponse(sum=n), NumberResponse) == encoded
    assert codec.encode(NumberRequest(num=n), NumberRequest) == encoded
    # Each side reads the other's bytes back to the same value.
    assert pb2.NumberRequest.FromString(encoded).num == n
    assert pb2.NumberResponse.FromString(encoded).sum == n
    assert NumberRequest().parse(encoded).num == n


@given(int32s)
def test_round_trip(n: int) -> None:
    codec = NumberCodec()
    request = codec.decode(encode_int32_field(n), NumberRequest)
    assert isinstance(request, NumberRequest)
    assert request.num == n
    assert codec.decode(encode_int32_field(n), NumberResponse).sum == n


@settings(max_examples=1500)
@given(st.one_of(wire_messages(), st.binary(max_size=24)))
def test_accepts_and_rejects_exactly_like_google(pb2: ModuleType, data: bytes) -> None:
    assert ours(data) == reference(pb2, data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x08",  # truncated varint
        b"\x08" + b"\xff" * 10 + b"\x01",  # value over 10 bytes
        b"\x88\x80\x80\x80\x80\x00\x05",  # tag over 5 bytes
        b"\xf8\xff\xff\xff\x1f\x01",  # tag over 32 bits
        b"\x00\x01",  # field 0
        b"\x03\x04",  # a group with field number 0
        b"\x0e",  # wire type 6
        b"\x0f",  # wire type 7
        b"\x12\x05ab",  # length runs past the end (betterproto accepts this)
        b"\x0d\x01",  # fixed32 runs past the end
        b"\x0c",  # end group never started
        b"\x0b\x08\x05",  # group never ended
        b"\x0b" * 101 + b"\x0c" * 101,  # groups nested too deep
    ],
)
def test_rejects_what_google_rejects(pb2: ModuleType, data: bytes) -> None:
    assert reference(pb2, data) is None
    with pytest.raises(DecodeError):
        decode_int32_field(data)


@pytest.mark.parametrize(
    ("data", "num"),
    [
        (b"", 0),
        (b"\x08\x05\x08\x07", 7),  # the last occurrence wins
        (b"\x0a\x01\x05", 0),  # field 1 with another wire type is unknown, skipped
        (b"\x10\x09\x08\x03\x1a\x02hi", 3),  # unknown fields around it are skipped
        (b"\x0b\x08\x05\x0c\x08\x02", 2),  # a group and its contents are skipped
        (b"\x08\x80\x80\x80\x80\x10", 0),  # 2**32 keeps its low 32 bits
        (b"\x08\xff\xff\xff\xff\x07", INT32_MAX),
        (b"\x08\x80\x80\x80\x80\x08", INT32_MIN),  # 2**31 as a 5-byte varint
        (b"\x0b" * 100 + b"\x0c" * 100, 0),
        (b"\x0b\x00\x00\x0c", 0),  # field 0 inside a skipped group passes, as in upb
    ],
)
def test_reads_what_google_reads(pb2: ModuleType, data: bytes, num: int) -> None:
    assert reference(pb2, data) == num
    assert decode_int32_field(data) == num


@pytest.mark.parametrize("bad", [INT32_MAX + 1, INT32_MIN - 1, 2**70])
def test_refuses_to_encode_outside_int32(bad: int) -> None:
    """betterproto would write 2**31 as a 5-byte varint that peers read as -2**31."""
    with pytest.raises(ValueError, match="outside int32"):
        NumberCodec().encode(NumberResponse(sum=bad), NumberResponse)
