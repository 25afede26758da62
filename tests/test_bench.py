"""Smoke runs of the benchmark suite: it works, checks sums and reports every mode.

Benchmarks are not timed tests: nothing here compares speeds. The Go client is
exercised when ``go`` and grpc-go (Debian's golang-google-grpc-dev) are installed,
the Python fallback always. ``--against HEAD`` checks out and builds this commit's
server for real (its runtime venv: ~10 s with pip's cache warm).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import benchmarks.bench as bench_module

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rounds", "1", "--seconds", "0.3", "--warmup", "0.1", "--idle-streams", "50"]
TINY += ["--streams", "8", "--connections", "2", "--short-streams", "4", "--many-streams", "4"]
TINY += ["--many-window", "10", "--no-ceiling", "--json"]
HAVE_GO = (
    shutil.which("go") is not None and Path("/usr/share/gocode/src/google.golang.org/grpc").is_dir()
)


def bench(*args: str, cache: Path | None) -> tuple[int, dict[str, Any], str]:
    """Run the bench; ``cache=None``: the Go client's default build cache (~/.cache)."""
    where = [] if cache is None else ["--cache", str(cache)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", *args, *TINY, *where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, json.loads(done.stdout), done.stderr


def check_compare(
    report: dict[str, Any], client: str, servers: tuple[str, ...] = ("ours", "grpc.aio")
) -> None:
    assert report["ok"], report["error"]
    assert report["client"].startswith(client)
    assert report["servers"] == list(servers)
    rows = {(row["mode"], row["metric"]): row for row in report["summary"]}
    assert set(rows) == {
        ("pingpong", "msg/s"),
        ("pingpong", "p50 us"),
        ("pingpong", "p90 us"),
        ("pingpong", "p99 us"),
        ("stream", "msg/s"),
        ("concurrent", "msg/s"),
        ("short", "streams/s"),
        ("pipelined-many", "msg/s"),
        ("idle", "KiB/stream"),
    }
    for row in rows.values():
        for server in servers:
            assert row[server] > 0
        assert row["ratio"] == row["ours"] / row["grpc.aio"]
    for run in report["runs"]:
        if run["mode"] == "idle":
            assert run["verified"] == 2 * run["streams"] == 100
        else:  # every answered number's sum was checked, and some were measured
            assert run["verified"] >= run["messages"] > 0
            assert run["server_cpu_s"] > 0
        if run["mode"] == "short":  # whole streams ended OK: each took its 5 sums
            assert run["streams_done"] > 0
            assert run["verified"] >= 5 * run["streams_done"]
        if run["mode"] == "pipelined-many":
            assert (run["streams"], run["connections"]) == (4, 1)
    assert {(r["mode"], r["server"]) for r in report["runs"]} == {
        (mode, server)
        for mode in ("pingpong", "stream", "concurrent", "short", "pipelined-many", "idle")
        for server in servers
    }


def test_compare_with_the_python_client(tmp_path: Path) -> None:
    code, report, stderr = bench("compare", "--client", "python", cache=tmp_path)
    assert code == 0, stderr
    check_compare(report, "python")
    assert "round 1/1 stream" in stderr  # the progress lines


@pytest.mark.skipif(not HAVE_GO, reason="needs apt-get install golang-go golang-google-grpc-dev")
def test_compare_with_the_go_client() -> None:
    # The default cache: the Go build (~6 s cold) is done once per machine.
    code, report, stderr = bench("compare", "--client", "go", cache=None)
    assert code == 0, stderr
    check_compare(report, "go")


class WrongSums(bench_module.PythonLoad):
    """A client that expects other sums than the server's right ones."""

    def expected(self, i: int) -> int:
        return bench_module.number(i) + 1


@pytest.mark.parametrize("mode", ["stream", "short", "pipelined-many"])
def test_a_wrong_sum_fails_the_run(
    mode: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_module, "PythonLoad", WrongSums)
    code = bench_module.main(["run", "--modes", mode, "--client", "python", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert not report["ok"]
    assert "wrong sum after 1 numbers" in report["error"]


def test_run_shows_two_worker_counts_side_by_side(tmp_path: Path) -> None:
    """``run --workers 1,2``: ours as one process and with two workers, in the same
    rounds, each sum checked, with the ratio of the second to the first."""
    code, report, stderr = bench(
        "run", "--client", "python", "--modes", "concurrent", "--workers", "1,2", cache=tmp_path
    )
    assert code == 0, stderr
    assert report["servers"] == ["ours", "ours w2"]
    assert report["ours_workers"] == {"ours": 1, "ours w2": 2}
    assert report["commands"]["ours w2"]["argv"][-6:-4] == ["--workers", "2"]
    assert "--workers" not in report["commands"]["ours"]["argv"]
    (row,) = report["summary"]
    assert row["ratios"] == {"ours w2 / ours": row["ours w2"] / row["ours"]}
    assert {r["server"] for r in report["runs"]} == {"ours", "ours w2"}
    for run in report["runs"]:
        assert run["verified"] >= run["messages"] > 0


def test_a_bad_worker_list_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_module.parse(["run", "--workers", "1,x"])
    assert exit_info.value.code == 2
    assert "'1,x' is not a comma-separated list of counts" in capsys.readouterr().err


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


class WrongSumsFromRevisions(bench_module.PythonLoad):
    """Right sums expected from ours and grpc.aio, wrong ones from a --against server."""

    def expected(self, i: int) -> int:
        wrong = self.server.name not in bench_module.SERVERS
        return bench_module.number(i) + wrong


def test_compare_against_a_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sha, short = git("rev-parse", "HEAD"), git("rev-parse", "--short", "HEAD")
    label = f"HEAD ({short})"
    worktree = tmp_path / f"rev-{sha}"
    against = ["compare", "--client", "python", "--against", "HEAD", *TINY]
    against += ["--cache", str(tmp_path)]
    try:
        code = bench_module.main(against)
        out, err = capsys.readouterr()
        assert code == 0, err
        report = json.loads(out)
        check_compare(report, "python", ("ours", label, "grpc.aio"))
        (revision,) = report["revisions"]
        assert revision["sha"] == sha
        assert revision["label"] == label
        assert revision["prepared"].startswith("checked out")
        assert Path(revision["worktree"]) == worktree.resolve()
        assert git("rev-parse", "HEAD", cwd=worktree) == sha
        assert Path(revision["python"]).is_relative_to(worktree.resolve())
        assert Path(revision["module"]).is_relative_to(worktree.resolve())  # its code, not ours
        assert report["commands"][label]["argv"][0] == revision["python"]  # its server
        assert report["commands"][label]["cwd"] == revision["worktree"]
        assert report["commands"]["ours"]["cwd"] == str(ROOT)
        for row in report["summary"]:
            assert set(row["ratios"]) == {
                "ours / grpc.aio",
                f"{label} / grpc.aio",
                f"ours / {label}",
            }
            assert row["ratios"][f"ours / {label}"] == row["ours"] / row[label]
        assert {r["round"]: r["server"] for r in report["runs"] if r["mode"] == "pingpong"} == {
            1: "grpc.aio"  # one round: ours first, grpc.aio last
        }

        # Again: the worktree and its venv are reused, and a wrong sum from the
        # revision's server fails the run after ours has passed.
        monkeypatch.setattr(bench_module, "PythonLoad", WrongSumsFromRevisions)
        code = bench_module.main([*against, "--modes", "stream"])
        report = json.loads(capsys.readouterr().out)
        assert code == 1
        assert not report["ok"]
        assert f"stream on {label}: wrong sum after 1 numbers" in report["error"]
        assert [r["server"] for r in report["runs"]] == ["ours"]
        assert report["revisions"][0]["prepared"].startswith("worktree reused")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)


def test_an_unknown_revision_fails_before_any_server_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = bench_module.main(["compare", "--against", "no-such-rev", "--cache", str(tmp_path)])
    assert code == 2
    assert "--against no-such-rev: no such commit" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_rounds_rotate_the_order_of_the_servers() -> None:
    servers = ["ours", "main (84aad37)", "grpc.aio"]
    orders = [bench_module.rotation(servers, rnd) for rnd in range(1, 7)]
    for position in range(3):  # each server in each position twice in six rounds
        assert sorted(order[position] for order in orders) == sorted(servers * 2)
    assert bench_module.rotation(["ours", "grpc.aio"], 2) == ["grpc.aio", "ours"]


def test_the_table_shows_every_ratio() -> None:
    servers = ["ours", "main (84aad37)", "grpc.aio"]
    load = bench_module.Load(1, 0, 1, 1, 1, 1)
    bench = bench_module.Bench(servers, ["stream"], 2, load, None, "python")
    for rnd, figures in ((1, (300.0, 100.0, 50.0)), (2, (500.0, 200.0, 150.0))):
        for server, msgs in zip(servers, figures, strict=True):
            cores = {"server_cores": 1.0, "client_cores": 0.5}
            bench.runs.append(
                {"mode": "stream", "server": server, "round": rnd, "msg_per_s": msgs, **cores}
            )
    (row,) = bench.summary()  # medians: ours 400, main 150, grpc.aio 100
    assert row["ratios"] == {
        "ours / grpc.aio": 4.0,
        "main (84aad37) / grpc.aio": 1.5,
        "ours / main (84aad37)": 400 / 150,
    }
    head, _, line = bench_module.table([row], servers).splitlines()
    assert [c.strip() for c in head.strip("|").split("|")][2:8] == [
        *servers,
        "ours / grpc.aio",
        "main (84aad37) / grpc.aio",
        "ours / main (84aad37)",
    ]
    assert [c.strip() for c in line.strip("|").split("|")][2:9] == [
        "400",
        "150",
        "100",
        "4.00x",
        "1.50x",
        "2.67x",
        "1.00/0.50",
    ]


def test_the_ceiling_runs_the_servers_exchange_and_times_it() -> None:
    from benchmarks import ceiling

    found = ceiling.measure(scale=0.01)  # ceiling checks every answer and trailer arrived
    long_, short, piped = found["pairs"], found["short"], found["pipelined"]
    assert (long_.streams, long_.pairs) == (100, 300)
    assert short.per_stream == 5
    assert short.pairs == 5 * 40
    assert (piped.streams, piped.per_stream, piped.pairs) == (100, 100, 10_000)
    for measured in (long_, short, piped):
        assert measured.server_seconds > 0
        assert measured.pairs_per_s == pytest.approx(1e6 / measured.us_per_pair)
    assert short.streams_per_s == pytest.approx(short.pairs_per_s / 5)
    assert "us per request+answer" in ceiling.describe(found)


def test_the_bench_says_what_fraction_of_the_ceiling_each_server_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import ceiling

    def fake(scale: float = 1.0) -> dict[str, ceiling.Ceiling]:
        return {
            "pairs": ceiling.Ceiling("pairs", 100, 10, 1.0, 20.0, 50_000.0, 0.0, 0),
            "short": ceiling.Ceiling("short", 1, 10, 1.0, 40.0, 25_000.0, 5_000.0, 5),
            "pipelined": ceiling.Ceiling("pipelined", 100, 10, 1.0, 10.0, 100_000.0, 0.0, 10),
        }

    monkeypatch.setattr(ceiling, "measure", fake)
    rows = [
        {"mode": "concurrent", "metric": "msg/s", "ours": 25_000.0, "grpc.aio": 10_000.0},
        {"mode": "short", "metric": "streams/s", "ours": 1_000.0, "grpc.aio": 500.0},
        {"mode": "pipelined-many", "metric": "msg/s", "ours": 50_000.0, "grpc.aio": 25_000.0},
        {"mode": "pingpong", "metric": "p50 us", "ours": 200.0, "grpc.aio": 220.0},
    ]
    found = bench_module.reach(rows, ["ours", "grpc.aio"])
    assert found["fractions"] == {
        "concurrent": {"ours": 0.5, "grpc.aio": 0.2},
        "short": {"ours": 0.2, "grpc.aio": 0.1},
        "pipelined-many": {"ours": 0.5, "grpc.aio": 0.25},
    }
    lines = found["lines"]
    assert "  concurrent: of the ceiling's 50,000 pairs/s: ours 50%, grpc.aio 20%" in lines
    assert (
        "  pipelined-many: of the pipelined ceiling's 100,000 pairs/s: ours 50%, grpc.aio 25%"
        in lines
    )


def test_the_memory_breakdown_counts_idle_streams_by_owner() -> None:
    args = ["--streams", "60", "--connections", "2", "--top", "5", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["streams"] == 60
    owners = found["by_owner"]
    assert set(owners) == {"h2", "grpclib", "asyncio", "serving (ours)", "handler chain", "other"}
    assert found["bytes_per_stream"] == pytest.approx(sum(owners.values()))
    assert found["bytes_per_stream"] > 1000  # an open stream holds something
    assert owners["h2"] > 0
    assert owners["serving (ours)"] > 0
    assert len(found["top"]) == 5


def test_owners_of_allocations() -> None:
    from benchmarks.memory import owner

    site = "/x/.venv/lib/python3.11/site-packages"
    assert owner(f"{site}/h2/stream.py") == "h2"
    assert owner(f"{site}/hpack/struct.py") == "h2"
    assert owner(f"{site}/grpclib/protocol.py") == "grpclib"
    assert owner(f"{site}/betterproto2/grpclib/grpclib_server.py") == "handler chain"
    assert owner("/usr/lib/python3.11/asyncio/locks.py") == "asyncio"
    assert owner("/r/service/number_service/serving/grpclib_ext/lean.py") == "serving (ours)"
    assert owner("/r/service/number_service/service.py") == "handler chain"
    assert owner("/usr/lib/python3.11/contextlib.py") == "other"


def test_instruction_figures_are_differences_of_two_runs() -> None:
    from benchmarks.instructions import RUNS, collected, figures

    assert collected("==12== Events    : Ir\n==12== Collected : 2503851059\n") == 2503851059
    with pytest.raises(Exception, match="Collected"):
        collected("valgrind: no such tool\n")
    few, many, long_ = (RUNS[k] for k in ("few", "many", "long"))
    start, stream, message = 10**9, 4 * 10**6, 5 * 10**5  # what the counts are made of
    totals = {
        name: start + streams * (stream + (numbers - 5) * message)
        for name, (streams, numbers) in (("few", few), ("many", many), ("long", long_))
    }
    assert figures(totals) == pytest.approx((stream, message))


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (.ci/run installs it)")
def test_instructions_counts_more_for_more_streams() -> None:
    """Two real (small) callgrind runs of benchmarks.inprocess: every sum checked, and
    the count grows with the streams."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.instructions import Tree, count

    tree = Tree("this tree", ROOT)
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda streams: count(tree, streams, 2), (10, 60))
    assert 10**8 < small < large  # a Python start-up alone is ~10^8
    assert 50 * 10**5 < large - small < 50 * 10**7, (small, large)  # per stream: 10^5..10^7
