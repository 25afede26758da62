"""The running sum behind NumberService, free of any gRPC concern.

The Go original stores ``int32(sum)`` and so wraps silently on overflow. We refuse
instead: a step that would leave the int32 range raises :class:`SumOutOfRangeError` and
leaves the sum as it was, so the caller can report both numbers.
"""

from __future__ import annotations

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def check_int32(value: int, what: str = "number") -> int:
    """Return ``value`` if it fits a protobuf int32, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{what} {value} is outside int32 [{INT32_MIN}, {INT32_MAX}]")
    return value


class SumOutOfRangeError(ValueError):
    """Adding ``num`` to ``total`` would leave the int32 range."""

    def __init__(self, total: int, num: int) -> None:
        self.total = total
        self.num = num
        super().__init__(
            f"sum {total} + num {num} = {total + num} is outside int32 "
            f"[{INT32_MIN}, {INT32_MAX}]; the stream ends here, start a new one"
        )


class Accumulator:
    """A running int32 sum: ``add`` each number, get the sum so far back."""

    __slots__ = ("total",)

    def __init__(self, total: int = 0) -> None:
        self.total = check_int32(total, "start")

    def add(self, num: int) -> int:
        """Add ``num`` and return the new sum; on overflow raise and keep the old sum."""
        if type(num) is not int or not INT32_MIN <= num <= INT32_MAX:  # the common case, fast
            check_int32(num, "num")  # raises, saying why
        total = self.total + num
        if not INT32_MIN <= total <= INT32_MAX:
            raise SumOutOfRangeError(self.total, num)
        self.total = total
        return total
