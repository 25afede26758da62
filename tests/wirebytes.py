"""Hypothesis strategies for protobuf wire bytes, shared by the codec tests."""

from __future__ import annotations

from hypothesis import strategies as st


def varint(value: int) -> bytes:
    """``value`` as a varint; negative values sign-extended to 64 bits, as protobuf does."""
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(body)) + body


@st.composite
def wire_messages(draw: st.DrawFn) -> bytes:
    """Byte strings shaped like protobuf: mostly well-formed fields, sometimes not."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        field = draw(st.sampled_from([0, 1, 1, 1, 2, 15, 16, 2**29 - 1, 2**29]))
        wire_type = draw(st.sampled_from([0, 0, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7]))
        parts.append(varint((field << 3) | wire_type))
        if wire_type == 0:
            parts.append(varint(draw(st.integers(-(2**63), 2**64 - 1))))
        elif wire_type == 1:
            parts.append(draw(st.binary(min_size=8, max_size=8)))
        elif wire_type == 2:
            body = draw(st.binary(max_size=8))
            parts.append(varint(len(body) + draw(st.sampled_from([0, 0, 0, 1, -1]))) + body)
        elif wire_type == 5:
            parts.append(draw(st.binary(min_size=4, max_size=4)))
    data = b"".join(parts)
    cut = draw(st.sampled_from([None, None, None, 1, 2, 3]))
    return data[:-cut] if cut and cut <= len(data) else data
