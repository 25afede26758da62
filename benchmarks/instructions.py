"""Instructions per stream and per message, counted by valgrind: a figure that a busy
machine does not move, for before/after comparisons of the hot path.

    ./dev run python -m benchmarks.instructions                  # this tree
    ./dev run python -m benchmarks.instructions --against main   # and main's server

On a shared machine the CPU time of one run moves by a third between runs (other
tenants' load, caches, frequency), more than most changes to the hot path save. The
instructions a run executes do not: valgrind's callgrind counts them, ~50x slower
but the same to 0.1% from run to run (``PYTHONHASHSEED`` fixed). Each figure is
``benchmarks.inprocess`` (our whole server and a grpclib client, one process, no
sockets) run at two sizes, so that start-up and warm-up cancel out:

- per stream: (streams of 5 numbers, 400 of them, less 100 of them) / 300;
- per message: (100 streams of 25 numbers, less 100 of 5) / (100 * 20).

Both count the client's instructions with the server's (its grpclib is the same in
every run, so a difference is the server's). Instructions are not time (a cache
miss costs more than an add), so a change is also checked with the bench; but a
change this cannot see is one the bench cannot tell from noise either.

Each tree's ``service/`` and ``gen/`` go first on PYTHONPATH: this file's tree, and
with ``--against REV`` REV's (its worktree in the bench's cache, ``benchmarks.revision``),
run with this tree's ``benchmarks.inprocess`` and whichever venv runs this (so another
worktree can be measured with this one's venv). Needs valgrind (Debian: ``apt install
valgrind``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks import revision

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "number-service-bench"
#: (streams, numbers per stream) of each run; the figures are differences of two.
RUNS = {"few": (100, 5), "many": (400, 5), "long": (100, 25)}
TIMEOUT = 1800.0


class CountError(Exception):
    """valgrind is missing, or a run failed."""


@dataclass(frozen=True)
class Tree:
    """A server's code: a label, and the tree whose ``service/`` and ``gen/`` go first
    on PYTHONPATH."""

    label: str
    path: Path


def count(tree: Tree, streams: int, numbers: int) -> int:
    """Instructions of one ``benchmarks.inprocess`` run under callgrind."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(str(tree.path / p) for p in ("service", "gen"))
    argv = [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *(sys.executable, "-m", "benchmarks.inprocess", "--rounds", "1"),
        *("--streams", str(streams), "--numbers", str(numbers), "--concurrency", "10"),
    ]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise CountError(f"{tree.label}: {done.stderr.strip()[-800:]}")
    return collected(done.stderr)


def collected(stderr: str) -> int:
    """The total of callgrind's ``==pid== Collected : N`` line."""
    for line in stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise CountError(f"no 'Collected :' line from callgrind: {stderr.strip()[-300:]}")


def figures(totals: dict[str, int]) -> tuple[float, float]:
    """Instructions per stream of 5 numbers, and per further message, from RUNS' totals."""
    (few, five), (many, _), (_, long_numbers) = RUNS["few"], RUNS["many"], RUNS["long"]
    per_stream = (totals["many"] - totals["few"]) / (many - few)
    per_message = (totals["long"] - totals["few"]) / (few * (long_numbers - five))
    return per_stream, per_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--against", action="append", default=[], help="a git revision")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("instructions: needs valgrind (apt install valgrind)", file=sys.stderr)
        return 1
    trees = [Tree("this tree", ROOT)]  # this file's tree, whichever venv runs it
    for rev in args.against:
        sha, short = revision.resolve(rev)
        path = (CACHE / f"rev-{sha}").resolve()
        with revision.locked(CACHE / f"rev-{sha}.lock"):
            revision.checkout(sha, path)
        trees.append(Tree(revision.label(rev, sha, short), path))
    jobs = [(tree, run) for tree in trees for run in RUNS]
    with ThreadPoolExecutor(args.jobs) as pool:  # valgrind runs one thread a process
        totals = list(pool.map(lambda job: count(job[0], *RUNS[job[1]]), jobs))
    print("instructions (valgrind callgrind), client and server in one process:")
    base: tuple[float, float] | None = None
    for index, tree in enumerate(trees):
        runs = dict(zip(RUNS, totals[index * len(RUNS) : (index + 1) * len(RUNS)], strict=True))
        per_stream, per_message = figures(runs)
        line = f"  {tree.label:24} {per_stream:>12,.0f} per stream of 5 numbers"
        line += f" {per_message:>10,.0f} per further message"
        if base is not None:
            line += f"  (this tree / it: {base[0] / per_stream:.3f}, {base[1] / per_message:.3f})"
        else:
            base = per_stream, per_message
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
