"""The running sum and its int32 rule, without any gRPC."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from number_service.accumulator import (
    INT32_MAX,
    INT32_MIN,
    Accumulator,
    SumOutOfRangeError,
    check_int32,
)

int32s = st.integers(INT32_MIN, INT32_MAX)


def test_sums_so_far() -> None:
    acc = Accumulator()
    assert [acc.add(n) for n in range(1, 11)] == [1, 3, 6, 10, 15, 21, 28, 36, 45, 55]


@pytest.mark.parametrize(("start", "num"), [(INT32_MAX, 0), (0, INT32_MAX), (INT32_MIN, 0)])
def test_reaching_a_bound_is_allowed(start: int, num: int) -> None:
    assert Accumulator(start).add(num) == start + num


def test_max_plus_one_overflows_and_keeps_the_sum() -> None:
    acc = Accumulator(INT32_MAX - 1)
    assert acc.add(1) == INT32_MAX
    with pytest.raises(SumOutOfRangeError) as caught:
        acc.add(1)
    assert (caught.value.total, caught.value.num) == (INT32_MAX, 1)
    assert str(INT32_MAX) in str(caught.value)
    assert acc.total == INT32_MAX
    assert acc.add(-5) == INT32_MAX - 5  # still usable after a refused step


def test_min_minus_one_overflows() -> None:
    acc = Accumulator(INT32_MIN)
    with pytest.raises(SumOutOfRangeError, match=r"sum -2147483648 \+ num -1"):
        acc.add(-1)
    assert acc.total == INT32_MIN


@pytest.mark.parametrize("bad", [INT32_MAX + 1, INT32_MIN - 1, 2**70])
def test_num_outside_int32_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="outside int32"):
        Accumulator().add(bad)
    with pytest.raises(ValueError, match="outside int32"):
        check_int32(bad)


@pytest.mark.parametrize("bad", [1.5, "1", True, None])
def test_non_int_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError):
        check_int32(bad)  # type: ignore[arg-type]


@given(st.lists(int32s, max_size=50))
def test_matches_reference_model(nums: list[int]) -> None:
    """Model: exact integer prefix sums; the first one outside int32 stops the stream."""
    acc = Accumulator()
    total = 0
    for num in nums:
        total += num
        if INT32_MIN <= total <= INT32_MAX:
            assert acc.add(num) == total
        else:
            before = total - num
            with pytest.raises(SumOutOfRangeError):
                acc.add(num)
            assert acc.total == before
            return


@given(int32s, int32s)
def test_overflow_iff_exact_sum_leaves_int32(start: int, num: int) -> None:
    acc = Accumulator(start)
    exact = start + num
    if INT32_MIN <= exact <= INT32_MAX:
        assert acc.add(num) == exact
    else:
        with pytest.raises(SumOutOfRangeError):
            acc.add(num)
