"""The fast message builders make exactly what betterproto's constructors make."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from number_service import INT32_MAX, INT32_MIN
from number_service.codec import NumberCodec
from number_service.messages import request, response
from number_service_gen.tutorial import NumberRequest, NumberResponse

int32 = st.integers(INT32_MIN, INT32_MAX)


@given(int32)
def test_request_is_the_constructed_one(num: int) -> None:
    fast, made = request(num), NumberRequest(num=num)
    assert type(fast) is NumberRequest
    assert fast.__dict__ == made.__dict__
    assert list(fast.__dict__) == list(made.__dict__)
    assert fast == made
    assert bytes(fast) == bytes(made)
    assert NumberRequest().parse(bytes(fast)) == made
    assert fast.to_dict() == made.to_dict()
    assert repr(fast) == repr(made)


@given(int32)
def test_response_is_the_constructed_one(total: int) -> None:
    fast, made = response(total), NumberResponse(sum=total)
    assert type(fast) is NumberResponse
    assert fast.__dict__ == made.__dict__
    assert list(fast.__dict__) == list(made.__dict__)
    assert fast == made
    assert bytes(fast) == bytes(made)
    assert fast.to_dict() == made.to_dict()


@given(int32)
def test_built_messages_are_independent(num: int) -> None:
    a, b = request(num), request(num)
    a.num = num ^ 1
    assert b.num == num
    assert a._group_current is not b._group_current


@given(int32)
def test_codec_decodes_to_constructed_messages(num: int) -> None:
    codec = NumberCodec()
    wire = bytes(NumberRequest(num=num))
    assert codec.decode(wire, NumberRequest).__dict__ == NumberRequest(num=num).__dict__
    assert codec.decode(wire, NumberResponse).__dict__ == NumberResponse(sum=num).__dict__
