"""NumberCodec's fast paths (the canonical encodings of small and negative int32) give
exactly what its general decoder gives, for every input shaped like them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from number_service.codec import (
    DecodeError,
    _decode_int32_field,
    decode_int32_field,
    encode_int32_field,
)

INT32 = st.integers(-(2**31), 2**31 - 1)


def general(data: bytes) -> int | str:
    try:
        return _decode_int32_field(data)
    except DecodeError as err:
        return f"error: {err}"


def fast(data: bytes) -> int | str:
    try:
        return decode_int32_field(data)
    except DecodeError as err:
        return f"error: {err}"


@given(INT32)
def test_every_int32_round_trips_through_the_fast_paths(value: int) -> None:
    data = encode_int32_field(value)
    assert decode_int32_field(data) == value == _decode_int32_field(data)


@given(st.sampled_from([2, 3, 11]).flatmap(lambda n: st.binary(min_size=n - 1, max_size=n - 1)))
def test_inputs_shaped_like_a_fast_path_decode_as_the_general_path(rest: bytes) -> None:
    data = b"\x08" + rest
    assert fast(data) == general(data)


@given(INT32, st.integers(0, 10), st.integers(0, 255))
def test_one_byte_changed_in_an_encoding_decodes_as_the_general_path(
    value: int, where: int, byte: int
) -> None:
    data = bytearray(encode_int32_field(value) or b"\x08\x00")
    data[where % len(data)] = byte
    assert fast(bytes(data)) == general(bytes(data))
