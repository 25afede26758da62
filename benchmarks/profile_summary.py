"""Where a profiled server spent its CPU: cProfile's self time grouped by library.

    python -m benchmarks.profile_summary server.prof

``python -m benchmarks.bench run --profile server.prof`` writes such a file: our
server run under ``python -m cProfile``. cProfile adds its own overhead per call,
so the shares are a guide to where the time goes, not exact.
"""

from __future__ import annotations

import argparse
import pstats
import sys
from collections import Counter

# The first of these found in a function's file path names its group.
GROUPS = (
    ("betterproto", "/betterproto/"),
    ("grpclib", "/grpclib/"),
    ("h2", "/h2/"),
    ("hyperframe", "/hyperframe/"),
    ("hpack", "/hpack/"),
    ("number_service.serving", "/number_service/serving/"),  # the serving layer
    ("number_service", "/number_service/"),  # NumberService itself
    ("number_service_gen", "/number_service_gen/"),
    ("asyncio", "/asyncio/"),
    ("logging", "/logging/"),
)


def group_of(filename: str, name: str) -> str:
    for group, marker in GROUPS:
        if marker in filename:
            return group
    if filename == "~":  # built-ins: socket sends, select, dict methods ...
        if "send" in name or "recv" in name or "select" in name or "poll" in name:
            return "syscalls (send/recv/poll)"
        return "built-ins"
    return "other Python"


def summary(path: str, top: int = 15) -> str:
    stats = pstats.Stats(path)
    by_group: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    entries = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, _, tottime, _, _) in entries.items():
        by_group[group_of(filename, name)] += tottime
        short = filename.split("site-packages/")[-1].split("/lib/python3")[-1]
        by_function[f"{short}:{line}({name})"] += tottime
    total = sum(by_group.values()) or 1.0
    lines = [f"total self time {total:.2f} s", "", "| group | share |", "|---|---|"]
    lines += [f"| {g} | {t / total:.0%} |" for g, t in by_group.most_common()]
    lines += ["", f"top {top} functions by self time:", ""]
    lines += [f"- {t / total:5.1%} {f}" for f, t in by_function.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="a cProfile output file")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summary(args.profile, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
