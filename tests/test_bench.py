"""Smoke runs of the benchmark suite: it works, checks sums and reports every mode.

Benchmarks are not timed tests: nothing here compares speeds. The Go client is
exercised when ``go`` and grpc-go (Debian's golang-google-grpc-dev) are installed,
the Python fallback always.
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
TINY += ["--streams", "8", "--connections", "2", "--json"]
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


def check_compare(report: dict[str, Any], client: str) -> None:
    assert report["ok"], report["error"]
    assert report["client"].startswith(client)
    assert report["servers"] == ["ours", "grpc.aio"]
    rows = {(row["mode"], row["metric"]): row for row in report["summary"]}
    assert set(rows) == {
        ("pingpong", "msg/s"),
        ("pingpong", "p50 us"),
        ("pingpong", "p90 us"),
        ("pingpong", "p99 us"),
        ("stream", "msg/s"),
        ("concurrent", "msg/s"),
        ("idle", "KiB/stream"),
    }
    for row in rows.values():
        assert row["ours"] > 0
        assert row["grpc.aio"] > 0
        assert row["ratio"] > 0
    for run in report["runs"]:
        if run["mode"] == "idle":
            assert run["verified"] == 2 * run["streams"] == 100
        else:  # every answered number's sum was checked, and some were measured
            assert run["verified"] >= run["messages"] > 0
            assert run["server_cpu_s"] > 0
    assert {(r["mode"], r["server"]) for r in report["runs"]} == {
        (mode, server)
        for mode in ("pingpong", "stream", "concurrent", "idle")
        for server in ("ours", "grpc.aio")
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


def test_a_wrong_sum_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_module, "PythonLoad", WrongSums)
    code = bench_module.main(["run", "--modes", "stream", "--client", "python", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert not report["ok"]
    assert "wrong sum after 1 numbers" in report["error"]
