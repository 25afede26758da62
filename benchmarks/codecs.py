"""Cost per message of our codecs, in one process (microseconds, best of 5 runs).

    python -m benchmarks.codecs          # or: ./dev run python -m benchmarks.codecs

NumberCodec (service/number_service/codec.py) against the generic StrictCodec
(serving/codec.py) for NumberRequest/NumberResponse, and the generic path on a
mid-size message with many kinds of field (tests/proto/fieldkinds), beside
betterproto2's own ``bytes()`` and ``parse``.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from number_service.codec import NumberCodec
from number_service.serving import wire
from number_service.serving.codec import StrictCodec, check_ranges
from number_service_gen.tutorial import NumberRequest, NumberResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gen"))
from fieldkinds_gen.testing.fieldkinds import Colour, Inner, Kinds

RUNS = 5


def per_call(action: Callable[[], Any]) -> float:
    """Best time of one call, in microseconds."""
    timer = timeit.Timer(action)
    number, _ = timer.autorange()
    return min(timer.repeat(RUNS, number)) / number * 1e6


def mid_size() -> Kinds:
    return Kinds(
        i32=-5,
        i64=2**40,
        colour=Colour.RED,
        fl=1.5,
        db=2.5,
        name="hello, world",
        blob=b"x" * 16,
        inner=Inner(a=3, s="abc", child=Inner(a=1, r=[1, -2])),
        r_i32=list(range(10)),
        r_name=["a", "b", "c"],
        r_inner=[Inner(a=1), Inner(s="two")],
        counts={"a": 1, "b": 2},
        inners={1: Inner(a=1)},
        c_name="z",
        opt_i32=7,
        wrapped=5,
    )


def main() -> None:
    number, strict = NumberCodec(), StrictCodec()
    request, response = NumberRequest(num=12345), NumberResponse(sum=-12345)
    data = bytes(request)
    kinds = mid_size()
    blob = bytes(kinds)
    rows = [
        ("NumberRequest decode: NumberCodec", lambda: number.decode(data, NumberRequest)),
        ("NumberRequest decode: StrictCodec", lambda: strict.decode(data, NumberRequest)),
        ("NumberRequest wire.check alone", lambda: wire.check(data, NumberRequest)),
        ("NumberRequest wire.read (check + own reader)", lambda: wire.read(data, NumberRequest)),
        ("NumberRequest betterproto2 parse alone", lambda: NumberRequest.parse(data)),
        ("NumberResponse encode: NumberCodec", lambda: number.encode(response, NumberResponse)),
        ("NumberResponse encode: StrictCodec", lambda: strict.encode(response, NumberResponse)),
        ("NumberResponse check_ranges alone", lambda: check_ranges(response)),
        ("NumberResponse betterproto2 bytes() alone", lambda: bytes(response)),
        (f"Kinds ({len(blob)} B) decode: StrictCodec", lambda: strict.decode(blob, Kinds)),
        (f"Kinds ({len(blob)} B) wire.check alone", lambda: wire.check(blob, Kinds)),
        (f"Kinds ({len(blob)} B) wire.read (check + own reader)", lambda: wire.read(blob, Kinds)),
        (f"Kinds ({len(blob)} B) betterproto2 parse alone", lambda: Kinds.parse(blob)),
        (f"Kinds ({len(blob)} B) encode: StrictCodec", lambda: strict.encode(kinds, Kinds)),
        (f"Kinds ({len(blob)} B) check_ranges alone", lambda: check_ranges(kinds)),
        (f"Kinds ({len(blob)} B) betterproto2 bytes() alone", lambda: bytes(kinds)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"Python {sys.version.split()[0]}, us per message (best of {RUNS})")
    for name, action in rows:
        print(f"  {name:<{width}}  {per_call(action):8.2f}")


if __name__ == "__main__":
    main()
