"""StrictCodec: range-checked encoding, Google-exact decoding, and NumberCodec as its
specialised twin for NumberRequest/NumberResponse (equal on every input)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from grpclib.encoding.proto import ProtoCodec
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from hypothesis import example, given, settings
from hypothesis import strategies as st
from wirebytes import wire_messages

from fieldkinds_gen.testing.fieldkinds import Colour, Inner, Kinds
from number_service.codec import NumberCodec
from number_service.serving.codec import StrictCodec
from number_service.serving.wire import WireError
from number_service_gen.tutorial import NumberRequest, NumberResponse

NUMBER_TYPES = [NumberRequest, NumberResponse]


def decoded(codec: Any, data: bytes, message_type: type) -> Any:
    """The message a codec reads, or "rejected" for a ValueError (the codecs' way)."""
    try:
        return codec.decode(data, message_type)
    except ValueError:
        return "rejected"


@settings(max_examples=500)
@given(st.one_of(wire_messages(), st.binary(max_size=24)), st.sampled_from(NUMBER_TYPES))
@example(b"\x0b\x08\x05\x0c\x08\x02", NumberRequest)  # a group, then the field
@example(b"\x0a\x01\x05", NumberResponse)  # field 1 length-delimited: unknown
@example(b"\x08\x80\x80\x80\x80\x08", NumberRequest)  # 2**31 read as int32
def test_number_codec_decodes_as_the_generic_path(data: bytes, message_type: type) -> None:
    specialised = decoded(NumberCodec(), data, message_type)
    generic = decoded(StrictCodec(), data, message_type)
    assert type(specialised) is type(generic)
    assert specialised == generic  # betterproto2's ==: the fields, not unknown ones


@settings(max_examples=300)
@given(
    st.one_of(st.integers(-(2**31) - 2, 2**31 + 1), st.integers(-(2**70), 2**70)),
    st.sampled_from(NUMBER_TYPES),
)
@example(2**31, NumberResponse)
@example(-(2**31), NumberResponse)
def test_number_codec_encodes_as_the_generic_path(n: int, message_type: type) -> None:
    message = message_type(**{"num" if message_type is NumberRequest else "sum": n})
    results: list[bytes | str] = []
    for codec in (NumberCodec(), StrictCodec()):
        try:
            results.append(codec.encode(message, message_type))
        except ValueError:
            results.append("refused")
    assert results[0] == results[1]


@pytest.mark.parametrize("value", [True, 1.0, "1"])
def test_both_refuse_what_is_not_an_int(value: Any) -> None:
    for codec in (NumberCodec(), StrictCodec()):
        with pytest.raises(TypeError):
            codec.encode(NumberResponse(sum=value), NumberResponse)


def test_betterproto2_writes_what_does_not_fit() -> None:
    """Why encoding is checked: the peer reads int32 2**31 as -2**31."""
    assert NumberResponse.parse(bytes(NumberResponse(sum=2**31))).sum == -(2**31)


@pytest.mark.parametrize(
    ("message", "where"),
    [
        (Kinds(i32=2**31), r"Kinds.i32 = 2147483648 does not fit int32"),
        (Kinds(i64=-(2**63) - 1), "Kinds.i64 .* does not fit int64"),
        (Kinds(u32=-1), "Kinds.u32 = -1 does not fit uint32"),
        (Kinds(u64=2**64), "Kinds.u64 .* does not fit uint64"),
        (Kinds(s32=-(2**31) - 1), "Kinds.s32 .* does not fit sint32"),
        (Kinds(s64=2**63), "Kinds.s64 .* does not fit sint64"),
        (Kinds(f32=2**32), "Kinds.f32 .* does not fit fixed32"),
        (Kinds(f64=-1), "Kinds.f64 .* does not fit fixed64"),
        (Kinds(sf32=2**31), "Kinds.sf32 .* does not fit sfixed32"),
        (Kinds(sf64=2**63), "Kinds.sf64 .* does not fit sfixed64"),
        (Kinds(colour=Colour(2**31)), "Kinds.colour .* does not fit enum"),
        (Kinds(fl=1e39), "Kinds.fl = 1e[+]39 does not fit float"),
        (Kinds(far=2**63), "Kinds.far .* does not fit sint64"),
        (Kinds(inner=Inner(a=2**31)), "Inner.a .* does not fit int32"),
        (Kinds(inner=Inner(child=Inner(r=[2**63]))), r"Inner.r\[\] .* does not fit sint64"),
        (Kinds(r_i32=[1, 2**31]), r"Kinds.r_i32\[\] = 2147483648"),
        (Kinds(r_inner=[Inner(), Inner(a=-(2**31) - 1)]), "Inner.a .* does not fit int32"),
        (Kinds(counts={"a": 2**31}), r"Kinds.counts\['a'\] = 2147483648"),
        (Kinds(colours={2**32: Colour.RED}), "Kinds.colours key = 4294967296 does not fit"),
        (Kinds(inners={1: Inner(a=2**31)}), "Inner.a .* does not fit int32"),
        (Kinds(blobs={2**31: b""}), "Kinds.blobs key .* does not fit sint32"),
        (Kinds(c_i32=2**31), "Kinds.c_i32 .* does not fit int32"),
        (Kinds(opt_i32=2**31), "Kinds.opt_i32 .* does not fit int32"),
        (Kinds(wrapped=2**31), "Int32Value.value .* does not fit int32"),
        (Kinds(wrapped_counts={"a": -(2**31) - 1}), "Int32Value.value .* does not fit int32"),
    ],
)
def test_refuses_values_that_do_not_fit(message: Kinds, where: str) -> None:
    with pytest.raises(ValueError, match=where):
        StrictCodec().encode(message, Kinds)


def test_the_largest_values_that_fit_reach_protobuf_intact(fieldkinds_pb2: ModuleType) -> None:
    edges: dict[str, Any] = {
        "i32": -(2**31),
        "i64": -(2**63),
        "u32": 2**32 - 1,
        "u64": 2**64 - 1,
        "s32": 2**31 - 1,
        "s64": -(2**63),
        "f32": 2**32 - 1,
        "f64": 2**64 - 1,
        "sf32": -(2**31),
        "sf64": 2**63 - 1,
        "fl": 3.4028234663852886e38,
        "far": 2**63 - 1,
        "opt_i32": 2**31 - 1,
        "wrapped": -(2**31),
    }
    written = StrictCodec().encode(Kinds(**edges, colour=Colour(-(2**31))), Kinds)
    theirs = fieldkinds_pb2.Kinds.FromString(written)
    assert {name: getattr(theirs, name) for name in edges} == {**edges, "wrapped": theirs.wrapped}
    assert theirs.wrapped.value == -(2**31)
    assert theirs.colour == -(2**31)


def test_decode_errors_are_plain_exceptions() -> None:
    """The server, not the codec, turns them into a status."""
    with pytest.raises(WireError, match=r"field 15 .* runs past the end") as caught:
        StrictCodec().decode(b"\x7a\x05ab", Kinds)
    assert isinstance(caught.value, ValueError)


def test_refuses_a_message_of_another_type() -> None:
    with pytest.raises(TypeError, match="must be of type"):
        StrictCodec().encode(NumberRequest(num=1), NumberResponse)


def test_protobuf_classes_go_through_grpclibs_codec() -> None:
    """grpclib's health and reflection services use Google's classes, not betterproto2's."""
    strict, plain = StrictCodec(), ProtoCodec()
    request = HealthCheckRequest(service="tutorial.NumberService")
    assert strict.encode(request, HealthCheckRequest) == plain.encode(request, HealthCheckRequest)
    data = HealthCheckResponse(status=HealthCheckResponse.SERVING).SerializeToString()
    assert strict.decode(data, HealthCheckResponse) == plain.decode(data, HealthCheckResponse)
    assert strict.__content_subtype__ == "proto"
