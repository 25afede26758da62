"""NumberService benchmarks: our server side by side with grpcio's asyncio server.

    python -m benchmarks.bench compare            # ours and grpc.aio, interleaved rounds
    python -m benchmarks.bench run                # ours only
    python -m benchmarks.bench compare --json     # machine-readable, on stdout
    ./dev bench compare --rounds 5 --seconds 5    # the same through ./dev
    ./dev bench compare --modes concurrent --workers 1,2   # + ours with 2 workers, side by side

Modes (``--modes``, all by default):

- pingpong: one stream, lock-step: msg/s and p50/p90/p99 round-trip latency;
- stream: one pipelined stream (at most ``--window`` numbers unanswered): msg/s;
- concurrent: ``--streams`` lock-step streams over ``--connections`` connections: msg/s;
- short: short streams, ``--short-streams`` (50) at a time over ``--connections``: each
  opened, ``--short-numbers`` (5) lock-step numbers, half-closed, OK: streams/s;
- pipelined-many: ``--many-streams`` (100) pipelined streams on one connection, each
  with at most ``--many-window`` (100) numbers unanswered: msg/s;
- idle: ``--idle-streams`` streams opened and left open: server RSS per open stream.

Servers run as subprocesses: ``python -m number_service serve`` (the real CLI) and
``python -m benchmarks.grpcio_server``; ``compare --against REV`` (repeatable) adds the
server of git revision REV of this repository, checked out and built in the cache
(see benchmarks/revision.py). Each round runs every mode against every server (the
order rotating from round to round), and the table shows medians over the rounds, the
ratio of each server to grpc.aio and of ours to each REV. ``--workers 1,2`` runs
our server once per worker count in the same rounds (``ours``, ``ours w2``), and the
table adds ``ours w2 / ours``; with ``run`` that is ours alone, side by side. Every
sum is checked; a wrong one fails the run (exit 1).

The load client: ``benchmarks/loadgen`` (Go, grpc-go from Debian's
golang-google-grpc-dev, built on first use into ``--cache``) when ``go`` is there,
else this process with our own grpclib client (much slower: it may be the
bottleneck). Each run reports the CPU the client and the server used (in cores):
a server near 1.0 core with a client well below it is server-bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.revision import Revision, RevisionError, clean_env, prepare
from number_service import NumberClient

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
LOADGEN_SRC = ROOT / "benchmarks" / "loadgen" / "main.go"
GOPATH = Path("/usr/share/gocode")  # Debian's golang-google-grpc-dev lives here
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
READY_TIMEOUT = 60.0
MODES = ("pingpong", "stream", "concurrent", "short", "pipelined-many", "idle")
THROUGHPUT = ("pingpong", "stream", "concurrent", "short", "pipelined-many")
SERVERS = {
    "ours": [sys.executable, "-m", "number_service", "serve", "--log-level", "warning"],
    "grpc.aio": [sys.executable, "-m", "benchmarks.grpcio_server"],
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
OURS_WITH = "ours w"  # ours with another worker count: "ours w2" (see ours_servers)


class BenchError(Exception):
    """A wrong sum, a failed stream or a server that misbehaved: the run fails."""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- servers ----------------------------------------------------------------------------


def server_argv(argv: list[str], profile: Path | None = None, workers: int = 1) -> list[str]:
    """A number_service ``serve`` command line with ``--workers`` and/or under cProfile."""
    if workers != 1:
        argv = [*argv, "--workers", str(workers)]
    if profile is not None:  # python -m cProfile -o FILE -m module ...
        argv = [argv[0], "-m", "cProfile", "-o", str(profile), *argv[1:]]
    return argv


class ServerProcess:
    """A server subprocess on 127.0.0.1 and a free port; its stderr kept for errors."""

    def __init__(
        self, name: str, argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = [*argv, "--host", HOST, "--port", "0"]
        self.cwd = cwd
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(READY_TIMEOUT) or not self.port:
            self.stop()
            raise BenchError(f"{name} server did not start: {self.lines[-10:]}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                if not self.port and (match := READY.search(line)):
                    self.port = int(match.group(1))
                    self._ready.set()
        finally:
            self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} server exited: {self.lines[-10:]}")

    def pids(self) -> list[int]:
        """The server process and its children (the workers of ``--workers N``)."""
        pids = [self.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    stat = (entry / "stat").read_text()
                    if int(stat[stat.rindex(")") + 2 :].split()[1]) == self.pid:  # ppid
                        pids.append(int(entry.name))
        return pids

    def rss(self) -> int:
        """Resident memory of the server, its workers included."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        if not total:
            raise BenchError("no VmRSS")
        return total

    def cpu(self) -> float:
        """User + system CPU seconds the server has used (threads and workers included)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None


# --- load clients -----------------------------------------------------------------------


@dataclass
class Load:
    """What each run does; the same for every server."""

    seconds: float
    warmup: float
    window: int  # stream mode: numbers in flight
    streams: int  # concurrent mode
    connections: int  # concurrent and short modes
    idle_streams: int
    short_streams: int = 50  # short mode: streams at a time
    short_numbers: int = 5  # short mode: lock-step numbers per stream
    many_streams: int = 100  # pipelined-many: streams on one connection
    many_window: int = 100  # pipelined-many: numbers in flight per stream

    def shape(self, mode: str) -> tuple[int, int, int]:
        """(streams, connections, numbers in flight per stream) of a throughput mode."""
        if mode == "concurrent":
            return self.streams, self.connections, 1
        if mode == "short":
            return self.short_streams, self.connections, 1
        if mode == "pipelined-many":
            return self.many_streams, 1, self.many_window
        return 1, 1, self.window if mode == "stream" else 1


def build_loadgen(cache: Path) -> tuple[Path | None, str]:
    """The Go load client, built once per source version; (None, why) if it cannot be."""
    go = shutil.which("go")
    if go is None or not (GOPATH / "src/google.golang.org/grpc").is_dir():
        return None, "go or grpc-go missing: apt-get install golang-go golang-google-grpc-dev"
    digest = hashlib.sha256(LOADGEN_SRC.read_bytes()).hexdigest()[:16]
    binary = cache / f"loadgen-{digest}"
    if binary.exists():
        return binary, "go (cached build)"
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOCACHE": str(cache / "gocache"),
        "GOFLAGS": "",
    }
    started = time.monotonic()
    # Built under a name of its own, then renamed: suites run at once (.ci/run) share
    # the default cache, and one must not run another's half-written binary.
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
    try:
        built = subprocess.run(
            [go, "build", "-o", str(partial), "."],
            cwd=LOADGEN_SRC.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if built.returncode != 0:
            return None, f"go build failed: {built.stderr.strip()[:500]}"
        os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary, f"go (built in {time.monotonic() - started:.1f} s)"


def go_run(binary: Path, server: ServerProcess, mode: str, load: Load) -> dict[str, Any]:
    streams, conns, inflight = load.shape(mode)
    args = [
        str(binary),
        *("-addr", f"{HOST}:{server.port}", "-mode", mode),
        *("-seconds", str(load.seconds), "-warmup", str(load.warmup)),
        *("-server-pid", ",".join(map(str, server.pids()))),
        *("-streams", str(streams), "-conns", str(conns)),
        *("-inflight", str(inflight), "-per-stream", str(load.short_numbers)),
    ]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=load.seconds + load.warmup + 120
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise BenchError(f"loadgen: {done.stderr.strip() or done.stdout}") from None
    if done.returncode != 0 or result.get("error"):
        raise BenchError(f"loadgen: {result.get('error') or done.stderr}")
    return result


def number(i: int) -> int:
    """The i-th request of every stream: the same walk the Go client sends."""
    return (i * 7919) % 2001 - 1000


class PythonLoad:
    """The fallback client: our grpclib NumberClient in this process."""

    def __init__(self, server: ServerProcess, load: Load) -> None:
        self.server = server
        self.load = load
        self.answered = 0
        self.finished = 0  # short mode: streams ended OK after all their sums
        self.measuring = False
        self.latencies: list[float] = []
        self.stopping = False

    def expected(self, i: int) -> int:
        """The number whose sum to expect for the i-th answer: the one sent."""
        return number(i)

    async def lock_step(self, client: NumberClient, record: bool) -> None:
        total = 0
        async with client.session() as session:
            for i in itertools.count():
                if self.stopping:
                    return
                total += self.expected(i)
                t0 = time.perf_counter()
                got = await session.add(number(i))
                if record and self.measuring:
                    self.latencies.append(time.perf_counter() - t0)
                if got != total:
                    raise BenchError(f"wrong sum after {i + 1} numbers: {got}, want {total}")
                self.answered += 1

    async def short(self, client: NumberClient) -> None:
        """Short streams one after another: open, lock-step numbers, half-close, OK."""
        for k in itertools.count():
            if self.stopping:
                return
            total = 0
            async with client.session() as session:
                for i in range(self.load.short_numbers):
                    total += self.expected(k + i)
                    got = await session.add(number(k + i))
                    if got != total:
                        raise BenchError(f"wrong sum after {i + 1} numbers: {got}, want {total}")
                    self.answered += 1
            self.finished += 1  # leaving the session waited for its OK

    async def pipelined(self, client: NumberClient, inflight: int) -> None:
        window = asyncio.Semaphore(inflight)  # numbers sent but not yet answered

        async def numbers() -> Any:
            for i in itertools.count():
                await window.acquire()
                if self.stopping:
                    return
                yield number(i)

        total = 0
        i = 0
        async for got in client.accumulate(numbers()):
            window.release()
            total += self.expected(i)
            i += 1
            if got != total:
                raise BenchError(f"wrong sum after {i} numbers: {got}, want {total}")
            self.answered += 1

    async def run(self, mode: str) -> dict[str, Any]:
        load = self.load
        streams, conns, inflight = load.shape(mode)
        clients = [NumberClient(HOST, self.server.port, timeout=600) for _ in range(conns)]
        if mode == "pingpong":
            tasks = [asyncio.create_task(self.lock_step(clients[0], True))]
        elif mode in ("stream", "pipelined-many"):
            tasks = [
                asyncio.create_task(self.pipelined(clients[k % conns], inflight))
                for k in range(streams)
            ]
        elif mode == "short":
            tasks = [asyncio.create_task(self.short(clients[k % conns])) for k in range(streams)]
        else:
            tasks = [
                asyncio.create_task(self.lock_step(clients[k % conns], False))
                for k in range(streams)
            ]
        try:
            await self._watch(tasks, load.warmup)
            self.measuring = True
            start, n0, f0 = time.monotonic(), self.answered, self.finished
            c0, s0 = time.process_time(), self.server.cpu()
            await self._watch(tasks, load.seconds)
            elapsed, n1, f1 = time.monotonic() - start, self.answered, self.finished
            c1, s1 = time.process_time(), self.server.cpu()
            self.measuring = False
            self.stopping = True
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
            for client in clients:
                client.close()
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[int(p * (len(lat) - 1))] * 1e6 if lat else 0.0

        return {
            "mode": mode,
            "client": "python",
            "streams": len(tasks),
            "connections": conns,
            "messages": n1 - n0,
            "verified": self.answered,
            "seconds": elapsed,
            "msg_per_s": (n1 - n0) / elapsed,
            "streams_done": f1 - f0,
            "streams_per_s": (f1 - f0) / elapsed,
            "p50_us": pct(0.5),
            "p90_us": pct(0.9),
            "p99_us": pct(0.99),
            "client_cpu_s": c1 - c0,
            "server_cpu_s": s1 - s0,
        }

    @staticmethod
    async def _watch(tasks: list[asyncio.Task[None]], seconds: float) -> None:
        """Sleep ``seconds``, failing at once if a stream fails."""
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        if done:
            raise BenchError("a stream ended before the run did")


async def idle_run(server: ServerProcess, load: Load) -> dict[str, Any]:
    """Open ``idle_streams`` streams, one number each, and measure the server's RSS."""
    from benchmarks.soak import max_concurrent_streams, steady_rss

    count = load.idle_streams
    per_connection = min(await max_concurrent_streams(server.port), count)
    conns = -(-count // per_connection)
    clients = [NumberClient(HOST, server.port, timeout=600) for _ in range(conns)]
    opened = 0
    all_open, release = asyncio.Event(), asyncio.Event()

    async def one(k: int) -> None:
        nonlocal opened
        async with clients[k % conns].session() as session:
            if await session.add(k) != k:
                raise BenchError(f"idle stream {k}: wrong sum")
            opened += 1
            if opened == count:
                all_open.set()
            await release.wait()
            if await session.add(-2 * k) != -k:
                raise BenchError(f"idle stream {k}: wrong second sum")

    try:
        for client in clients:  # connect all and warm up before the baseline
            async with client.session() as session:
                if await session.add(1) != 1:
                    raise BenchError("idle warm-up: wrong sum")
        before = await _steady(server, steady_rss)
        tasks = [asyncio.create_task(one(k)) for k in range(1, count + 1)]
        try:
            waiter = asyncio.create_task(all_open.wait())
            done, _ = await asyncio.wait(
                [*tasks, waiter], timeout=600, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
            if not all_open.is_set():
                raise BenchError(f"only {opened} of {count} idle streams opened")
            during = await _steady(server, steady_rss)
            release.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 600)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for client in clients:
            client.close()
    return {
        "mode": "idle",
        "client": "python",
        "streams": count,
        "connections": conns,
        "verified": 2 * count,
        "rss_before": before,
        "rss_open": during,
        "bytes_per_stream": (during - before) / count,
    }


async def _steady(server: ServerProcess, steady_rss: Any) -> int:
    """soak.steady_rss needs only .rss() of its server."""
    return int(await steady_rss(server))


# --- rounds and the table ---------------------------------------------------------------


@dataclass
class Bench:
    servers: list[str]
    modes: list[str]
    rounds: int
    load: Load
    loadgen: Path | None
    client: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def one(self, server: ServerProcess, mode: str) -> dict[str, Any]:
        server.alive()
        try:
            if mode == "idle":
                result = asyncio.run(idle_run(server, self.load))
            elif self.loadgen is not None:
                result = go_run(self.loadgen, server, mode, self.load)
            else:
                result = asyncio.run(PythonLoad(server, self.load).run(mode))
        except BenchError as err:  # which server gave the wrong sum
            raise BenchError(f"{mode} on {server.name}: {err}") from None
        server.alive()
        result["server"] = server.name
        if mode != "idle":
            if result["messages"] <= 0 or result["verified"] < result["messages"]:
                raise BenchError(f"{mode} on {server.name}: no verified messages: {result}")
            if mode == "short" and result.get("streams_done", 0) <= 0:
                raise BenchError(f"short on {server.name}: no stream finished: {result}")
            result["server_cores"] = result["server_cpu_s"] / result["seconds"]
            result["client_cores"] = result["client_cpu_s"] / result["seconds"]
        return result

    def run(self, started: dict[str, ServerProcess]) -> None:
        throughput = [m for m in self.modes if m in THROUGHPUT]
        for rnd in range(1, self.rounds + 1):
            order = rotation(self.servers, rnd)
            for mode in throughput:
                for name in order:
                    result = self.one(started[name], mode)
                    result["round"] = rnd
                    self.runs.append(result)
                    progress(f"round {rnd}/{self.rounds} {describe(result)}")
        if "idle" in self.modes:
            for name in self.servers:
                progress(f"idle: opening {self.load.idle_streams} streams on {name} ...")
                result = self.one(started[name], "idle")
                result["round"] = 1
                self.runs.append(result)
                progress(f"idle {describe(result)}")

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        metrics = {
            "pingpong": [
                ("msg/s", "msg_per_s"),
                ("p50 us", "p50_us"),
                ("p90 us", "p90_us"),
                ("p99 us", "p99_us"),
            ],
            "stream": [("msg/s", "msg_per_s")],
            "concurrent": [("msg/s", "msg_per_s")],
            "short": [("streams/s", "streams_per_s")],
            "pipelined-many": [("msg/s", "msg_per_s")],
            "idle": [("KiB/stream", "kib_per_stream")],
        }
        for mode in self.modes:
            for label, key in metrics[mode]:
                row: dict[str, Any] = {"mode": mode, "metric": label}
                for name in self.servers:
                    values = [
                        r["bytes_per_stream"] / 1024 if key == "kib_per_stream" else r[key]
                        for r in self.runs
                        if r["mode"] == mode and r["server"] == name
                    ]
                    row[name] = statistics.median(values)
                    if key in ("msg_per_s", "streams_per_s"):
                        cores = [
                            (r["server_cores"], r["client_cores"])
                            for r in self.runs
                            if r["mode"] == mode and r["server"] == name
                        ]
                        row[f"{name} server cores"] = statistics.median(c[0] for c in cores)
                        row[f"{name} client cores"] = statistics.median(c[1] for c in cores)
                ratios = {
                    ratio_head(top, bottom): row[top] / row[bottom]
                    for top, bottom in ratio_pairs(self.servers)
                    if row[bottom]
                }
                if ratios:
                    row["ratios"] = ratios
                    row["ratio"] = next(iter(ratios.values()))  # ours / grpc.aio, as before
                rows.append(row)
        return rows


def rotation(servers: list[str], rnd: int) -> list[str]:
    """Round ``rnd``'s order: each server goes first, second ... equally often."""
    k = (rnd - 1) % len(servers)
    return servers[k:] + servers[:k]


def ratio_pairs(servers: list[str]) -> list[tuple[str, str]]:
    """The ratios shown: every server / grpc.aio, then ours / every revision, then
    ours with each other worker count / ours (``--workers 1,2``: ``ours w2 / ours``)."""
    pairs = [(name, "grpc.aio") for name in servers if name != "grpc.aio" and "grpc.aio" in servers]
    if "ours" in servers:
        others = [name for name in servers if name not in ("ours", "grpc.aio")]
        pairs += [("ours", name) for name in others if not name.startswith(OURS_WITH)]
        pairs += [(name, "ours") for name in others if name.startswith(OURS_WITH)]
    return pairs


def ours_servers(workers: list[int]) -> dict[str, int]:
    """Our servers by name, and each one's ``--workers``: ``ours`` with the first count,
    ``ours wN`` with each other (``--workers 1,2``: ours, ours w2)."""
    names = {"ours": workers[0]}
    for count in workers[1:]:
        names[f"{OURS_WITH}{count}"] = count
    return names


def worker_counts(text: str) -> list[int]:
    """``--workers``: ``2`` or ``1,2`` (each a count of processes, 0 for one per core)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        why = f"{text!r} is not a comma-separated list of counts"
        raise argparse.ArgumentTypeError(why) from None
    if any(count < 0 for count in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: counts must be >= 0 and different")
    return counts


def ratio_head(top: str, bottom: str) -> str:
    return f"{top} / {bottom}"


def describe(r: dict[str, Any]) -> str:
    if r["mode"] == "idle":
        return (
            f"{r['server']:8}: {r['streams']} open streams, RSS "
            f"{r['rss_before'] / 2**20:.1f} -> {r['rss_open'] / 2**20:.1f} MiB, "
            f"{r['bytes_per_stream'] / 1024:.2f} KiB/stream"
        )
    lat = f", p50 {r['p50_us']:.0f} us" if r["mode"] == "pingpong" else ""
    if r["mode"] == "short":
        lat = f", {r['streams_per_s']:.0f} streams/s"
    return (
        f"{r['mode']:10} {r['server']:8}: {r['msg_per_s']:9.0f} msg/s{lat} "
        f"(server {r['server_cores']:.2f} cores, client {r['client_cores']:.2f} cores, "
        f"{r['verified']} sums verified)"
    )


def table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    ratios = [ratio_head(*pair) for pair in ratio_pairs(servers)]
    head = ["mode", "metric", *servers, *ratios]
    head += [f"{name} srv/cli cores" for name in servers]
    lines = [head]
    for row in rows:
        cells = [row["mode"], row["metric"]]
        cells += [
            f"{row[name]:,.1f}" if row[name] < 100 else f"{row[name]:,.0f}" for name in servers
        ]
        cells += [f"{row['ratios'][h]:.2f}x" if h in row.get("ratios", {}) else "-" for h in ratios]
        for name in servers:
            key = f"{name} server cores"
            cells.append(f"{row[key]:.2f}/{row[f'{name} client cores']:.2f}" if key in row else "")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


#: The modes compared with the ceiling: (mode, metric) -> the ceiling's kind and figure.
CEILING_OF = {
    "stream": ("pairs", "pairs_per_s"),
    "concurrent": ("pairs", "pairs_per_s"),
    "pipelined-many": ("pipelined", "pairs_per_s"),
    "short": ("short", "streams_per_s"),
}


def reach(rows: list[dict[str, Any]], servers: list[str]) -> dict[str, Any]:
    """The h2-alone ceiling (benchmarks/ceiling.py) and what fraction of it each server
    reached, per mode: a server built on h2 cannot pass 100% on one core."""
    from dataclasses import asdict

    from benchmarks.ceiling import describe as describe_ceiling
    from benchmarks.ceiling import measure

    found = measure()
    fractions: dict[str, dict[str, float]] = {}
    lines = [describe_ceiling(found)]
    for row in rows:
        mode = row["mode"]
        if mode not in CEILING_OF or row["metric"] not in ("msg/s", "streams/s"):
            continue
        kind, key = CEILING_OF[mode]
        top = getattr(found[kind], key)
        fractions[mode] = {name: row[name] / top for name in servers}
        shares = ", ".join(f"{name} {row[name] / top:.0%}" for name in servers)
        unit = "streams/s" if kind == "short" else "pairs/s"
        of = "the pipelined ceiling" if kind == "pipelined" else "the ceiling"
        lines.append(f"  {mode}: of {of}'s {top:,.0f} {unit}: {shares}")
    return {
        "measured": {kind: asdict(value) for kind, value in found.items()},
        "fractions": fractions,
        "lines": lines,
    }


def machine() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],
    }


# --- command line -----------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["compare", "run"], help="compare: ours vs grpc.aio")
    parser.add_argument("--server", choices=list(SERVERS), default="ours", help="run: which")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES)
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each")
    parser.add_argument("--window", type=int, default=1000, help="stream: numbers in flight")
    parser.add_argument("--streams", type=int, default=100, help="concurrent: streams")
    parser.add_argument("--connections", type=int, default=4, help="concurrent, short: connections")
    parser.add_argument("--idle-streams", type=int, default=10_000, help="idle: streams")
    parser.add_argument("--short-streams", type=int, default=50, help="short: streams at a time")
    parser.add_argument("--short-numbers", type=int, default=5, help="short: numbers per stream")
    parser.add_argument("--many-streams", type=int, default=100, help="pipelined-many: streams")
    parser.add_argument(
        "--many-window", type=int, default=100, help="pipelined-many: in flight per stream"
    )
    parser.add_argument("--client", choices=["auto", "go", "python"], default="auto")
    parser.add_argument(
        "--workers",
        type=worker_counts,
        default=[1],
        help="ours: serve --workers N (CPU and RSS summed); a list, e.g. 1,2, runs ours once "
        "per count, side by side (ours, ours w2), with the ratio of each to the first",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "number-service-bench",
        help="where the Go client is built and --against revisions are checked out",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="REV",
        help="compare: also the server of git revision REV (repeatable), built in --cache",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the in-process h2-alone ceiling (benchmarks/ceiling.py) after the rounds",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run our server under cProfile, write its stats here and print a summary",
    )
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if args.against and args.command != "compare":
        parser.error("--against is for compare")
    return args


def revisions(revs: list[str], cache: Path) -> list[Revision]:
    """Each ``--against`` revision checked out and built (once per commit)."""
    prepared: list[Revision] = []
    for rev in revs:
        progress(f"bench: preparing {rev} (a worktree and venv in {cache}) ...")
        revision = prepare(rev, cache)
        if any(p.sha == revision.sha for p in prepared):
            raise RevisionError(f"--against {rev}: the same commit as another --against")
        progress(
            f"bench: {revision.label}: {revision.prepared}; {revision.worktree}, "
            f"Python {revision.python_version}"
        )
        prepared.append(revision)
    return prepared


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        against = revisions(args.against, args.cache.resolve())
    except RevisionError as err:
        progress(f"bench: {err}")
        return 2
    ours = ours_servers(args.workers)
    servers = [*ours, *(r.label for r in against), "grpc.aio"]
    if args.command != "compare":
        servers = list(ours) if args.server == "ours" else [args.server]
    loadgen, client = None, "python (grpclib NumberClient, in the bench process)"
    if args.client != "python" and any(m in THROUGHPUT for m in args.modes):
        loadgen, why = build_loadgen(args.cache)
        if loadgen is None and args.client == "go":
            progress(f"bench: {why}")
            return 2
        client = f"{why}: benchmarks/loadgen" if loadgen else f"python ({why})"
    load = Load(
        args.seconds,
        args.warmup,
        args.window,
        args.streams,
        args.connections,
        args.idle_streams,
        args.short_streams,
        args.short_numbers,
        args.many_streams,
        args.many_window,
    )
    bench = Bench(servers, args.modes, args.rounds, load, loadgen, client)
    progress(
        f"bench: servers {', '.join(servers)}; modes {', '.join(args.modes)}; "
        f"{args.rounds} round(s) of {args.warmup:g}+{args.seconds:g} s; client: {client}"
        + (
            f"; ours (and revisions) with --workers {args.workers[0]}"
            if args.workers[0] != 1
            else ""
        )
        + "".join(f"; {name}: --workers {count}" for name, count in list(ours.items())[1:])
    )
    started: dict[str, ServerProcess] = {}
    ok = False
    error = ""
    try:
        env = clean_env()
        for name in servers:
            if name in ours:
                profile = args.profile if name == "ours" else None
                argv = server_argv(SERVERS["ours"], profile, ours[name])
                started[name] = ServerProcess(name, argv)
            elif name in SERVERS:
                started[name] = ServerProcess(name, server_argv(SERVERS[name]))
            else:  # a revision: the same flags as ours but the profile, in its worktree
                rev = next(r for r in against if r.label == name)
                argv = server_argv(rev.argv(), workers=args.workers[0])
                started[name] = ServerProcess(name, argv, rev.worktree, env)
        bench.run(started)
        ok = True
    except (BenchError, OSError, TimeoutError, subprocess.TimeoutExpired) as err:
        error = f"{type(err).__name__}: {err}"
        progress(f"bench: FAIL {error}")
    finally:
        for server in started.values():
            code = server.stop()
            if code not in (0, -signal.SIGTERM) and ok:
                ok, error = False, f"{server.name} server exit code {code} on SIGTERM"
                progress(f"bench: FAIL {error}")
    rows = bench.summary() if ok else []
    ceiling: dict[str, Any] = {}
    if ok and args.ceiling and any(m in CEILING_OF for m in args.modes):
        progress("bench: the ceiling: h2 alone, in this process ...")
        ceiling = reach(rows, servers)
    if ok and args.profile is not None:
        from benchmarks.profile_summary import summary

        progress(
            f"bench: CPU profile of ours (cProfile, {args.profile}):\n{summary(str(args.profile))}"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "error": error,
                    "machine": machine(),
                    "client": client,
                    "servers": servers,
                    "revisions": [r.as_json() for r in against],
                    "commands": {
                        name: {"argv": server.argv, "cwd": str(server.cwd)}
                        for name, server in started.items()
                    },
                    "ours_workers": ours,
                    "load": vars(load),
                    "summary": rows,
                    "ceiling": ceiling,
                    "runs": bench.runs,
                },
                indent=2,
            )
        )
    elif ok:
        m = machine()
        print(
            f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, "
            f"load {m['load_avg_1m']:.1f}; "
            f"client: {client}; medians of {args.rounds} round(s)"
        )
        print(table(rows, servers))
        for line in ceiling.get("lines", []):
            print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
