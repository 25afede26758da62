"""``serve --workers N``: N worker processes serve one port; this parent watches them.

The parent binds the port first (with SO_REUSEPORT, not listening: it resolves port
0 once and holds the port, also while nothing listens, as in a drain). It listens
on a second socket of that group itself, accepts every connection and hands it to
the worker holding the fewest open connections (``balance.Balancer``, as Envoy's
``exact_balance``), over a Unix socket per worker (``handoff.py``); workers report
each close, so that C open connections over N workers are floor(C/N) or ceil(C/N)
each. (Under plain grpclib, when ``grpclib_ext`` does not match the installed
releases, the workers listen on the port with SO_REUSEPORT instead, and the kernel
spreads connections by a hash of their addresses and ports.) It starts each worker
as its worker command (the application's ``serve`` with the options it was given,
say) followed by ``--workers 1 --port <port>``, so every serve option reaches the
workers unchanged; ``worker.py`` is what differs inside one. Worker logs go
straight to the shared stderr; each worker reports ``ready`` on its stdout pipe,
and gets connections from then on; the parent logs ``listening on HOST:PORT`` once
all of them are. A worker that dies gets none until it is back (connections wait
in the backlog while no worker is up).

A worker that dies is restarted, after a back-off that grows while it keeps dying
soon after start. A worker that dies before it is ready during start-up, or
``MAX_START_FAILURES`` times in a row later, makes the parent stop them all and
exit 1. SIGTERM or SIGINT: SIGTERM to every worker (each drains with --grace),
wait, exit 0 (the parent stops accepting first: new connections are refused); a
second signal cuts the workers' grace short.

A worker not listening ``READY_TIMEOUT`` seconds after its start is killed: a failed
start. After ``ready`` the parent keeps reading (and dropping) a worker's stdout, so
that a worker that prints cannot block on a full pipe.

With --metrics-port, workers write prometheus-client's multiprocess files to a
temporary directory, and the parent serves their sum; workers have no endpoint.
The streams a dead worker had in flight are counted as handled, Unavailable, by
the parent (``metrics.LostStreams``), since the worker could not. The
parent removes the directory when it stops, and holds a lock on it while it runs:
one left by a parent that was killed is unlocked, and the next parent that starts
with metrics removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from . import grpclib_ext, listening
from .balance import Balancer
from .handoff import BATCH, Handoff, channel_env, channel_pair
from .logs import log
from .metrics import MULTIPROC_ENV, LostStreams, MetricsEndpoint, WorkerConnections
from .run import ServeConfig, address_of, bind, dual_stack, host_port, listen_errors, resolve
from .settings import flag
from .worker import HURRY_SIGNAL, READY, worker_env

INITIAL_BACKOFF = 0.1  # seconds before restarting a worker that died
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long starts its back-off afresh when it dies
MAX_START_FAILURES = 5  # deaths before ready, in a row, after which the parent gives up
KILL_AFTER = 10.0  # seconds past --grace after which workers still running are killed
READY_TIMEOUT = 30.0  # seconds a worker may take to listen; then it is killed, a failed start
ACCEPT_PAUSE = 0.1  # seconds without accepting after accept() failed (out of descriptors, say)
METRICS_DIR_LOCK = ".lock"  # held (flock) by the parent while its directory is in use


def metrics_dir_prefix(name: str) -> str:
    """How the workers' metrics directories of application ``name`` begin; the
    parent's pid and a random part follow."""
    return f"{name}-metrics-"


def cpu_count() -> int:
    """How many workers ``--workers auto`` starts: see :func:`auto_workers`."""
    return auto_workers()[0]


def auto_workers() -> tuple[int, str]:
    """One worker per core this process may use, and how that was found: the cores
    of its affinity mask, fewer if its cgroup (v2) has a CPU quota, as a container
    with a CPU limit does (``cpu: "1"`` on an 8-core node: 1 worker, not 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is None:
        return cores, f"cores usable: {cores}, no cgroup CPU quota"
    return min(cores, quota), f"cores usable: {cores}, cgroup CPU quota: {quota}"


def cgroup_cpu_quota() -> int | None:
    """Whole CPUs this process's cgroup v2 ``cpu.max`` allows (rounded up), or None
    where there is no quota or no cgroup v2. Only its own cgroup is read, not those above."""
    for path in _cgroup_cpu_max_paths():
        try:
            with open(path) as file:
                return parse_cpu_max(file.read())
        except OSError:
            continue
    return None


def _cgroup_cpu_max_paths() -> list[str]:
    """Where this process's ``cpu.max`` may be: under its own cgroup v2 path (a
    systemd unit, say), then at the root (in a container with its own cgroup namespace)."""
    paths = []
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as file:
        for line in file:
            if line.startswith("0::/"):
                paths.append(f"/sys/fs/cgroup{line[3:].strip().rstrip('/')}/cpu.max")
    paths.append("/sys/fs/cgroup/cpu.max")
    return list(dict.fromkeys(paths))


def parse_cpu_max(text: str) -> int | None:
    """``cpu.max`` ("QUOTA PERIOD" in microseconds, or "max PERIOD") as whole CPUs,
    rounded up: "200000 100000" is 2, "150000 100000" is 2, "max 100000" is None."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def backoff(quick_deaths: int) -> float:
    """Seconds to wait before a restart after ``quick_deaths`` early deaths in a row."""
    return min(MAX_BACKOFF, INITIAL_BACKOFF * 2.0 ** max(quick_deaths - 1, 0))


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``, from a returncode."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def reserve(host: str, port: int) -> socket.socket:
    """host:port bound with SO_REUSEPORT but not listening, for the workers to join.

    A port other than 0 is first bound without SO_REUSEPORT, which fails when
    anything has it, including the workers of another supervisor (they would
    otherwise silently share it). Raises OSError naming the address.
    """
    with listen_errors(host, port):
        family, address = resolve(host, port)
        both = dual_stack(family, address)
        if port:
            with _tcp_socket(family, reuse_port=False, dual_stack=both) as probe:
                probe.bind(address)
        sock = _tcp_socket(family, reuse_port=True, dual_stack=both)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock


def _tcp_socket(family: int, *, reuse_port: bool, dual_stack: bool) -> socket.socket:
    """A TCP socket set up as ``socket.create_server`` sets up the workers' ones
    (``server.bind``). Dual-stack (``::``), the reservation holds the IPv4 port as
    well, and the probe finds it taken when anything has it on IPv4."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


@dataclass
class _Slot:
    """One worker position: its current process, and how its last starts went."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    quick_deaths: int = 0  # deaths in a row within STABLE_AFTER of starting
    start_failures: int = 0  # deaths in a row before it was ready
    ever_ready: bool = False
    handoff: Handoff | None = None  # its channel, while the process runs (handing out only)


class Supervisor:
    """Runs ``config.workers`` workers, each ``command`` plus ``--workers 1 --port
    <port>``, until a signal."""

    def __init__(self, config: ServeConfig, command: Sequence[str], why: str = "") -> None:
        """``command``: a worker's command line, e.g. ``[sys.executable, "-m", "app",
        "serve", *options]``; it must take the serve options of ``options.py``
        (``--workers`` and ``--port`` at least) after that, the last of each
        winning. ``why``: how the number of workers was chosen, for the start line
        (auto)."""
        self.config = config
        self.why = why
        self.command = list(command)
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.failure: str | None = None  # why the parent gave up, if it did
        self._stop = asyncio.Event()
        self._address = ""
        self._listening = False
        self._lost: LostStreams | None = None  # with --metrics-port
        # The parent accepts and hands connections out, unless under plain grpclib.
        self.handing = grpclib_ext.mismatch() is None
        self.balancer = Balancer(config.workers)
        self._listener: socket.socket | None = None  # the parent's, while it accepts
        self._accepting = False  # its reader is on
        self._accept_failing = False  # accept() failed (EMFILE, say) and has not worked since

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit code 0) or until workers cannot start (1)."""
        sock = reserve(self.config.host, self.config.port)
        self._address = host_port(*address_of(sock))
        port = address_of(sock)[1]
        loop = asyncio.get_running_loop()
        metrics_dir = None
        lock = None
        endpoint = None
        try:
            if self.handing:
                self._listener = bind(self.config.host, port, reuse_port=True)
                self._listener.setblocking(False)
            if self.config.metrics_port is not None:
                metrics_dir, lock = make_metrics_dir(metrics_dir_prefix(self.config.name))
                self._lost = LostStreams(metrics_dir)
                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
                if self.handing:
                    registry.register(WorkerConnections(lambda: self.balancer.open))
                host = self.config.metrics_host
                endpoint = await MetricsEndpoint.start(registry, host, self.config.metrics_port)
                log.info("metrics of all workers on http://%s:%d/metrics", host, endpoint.port)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal)
            why = f" ({self.why})" if self.why else ""
            log.info("starting %d workers on %s%s", len(self.slots), self._address, why)
            tasks = [
                asyncio.create_task(self._keep(slot, port, metrics_dir)) for slot in self.slots
            ]
            await self._stop.wait()
            await self._close_listener()
            await self._stop_workers(tasks)
        finally:
            self._stop_accepting()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if endpoint is not None:
                await endpoint.close()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            if lock is not None:
                os.close(lock)
            sock.close()
        if self.failure is not None:
            log.error("%s; stopped all workers", self.failure)
            return 1
        log.info("stopped")
        return 0

    async def _keep(self, slot: _Slot, port: int, metrics_dir: str | None) -> None:
        """Run the worker of ``slot``, restarting it when it dies, until stopped."""
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                proc = await self._spawn(slot, port, metrics_dir)
                slot.proc = proc
                if self._stop.is_set():  # the signal came while it was being started
                    _kill(proc, signal.SIGTERM)
                ready = await _wait_ready(proc, READY_TIMEOUT)
                discard = None
                if ready:
                    self._on_ready(slot, proc.pid)
                    if slot.handoff is not None and not self._stop.is_set():
                        self.balancer.up(slot.index)
                        self._start_accepting()
                    # Read on, discarding: a chatty worker must not block on a full pipe.
                    discard = asyncio.create_task(_discard(proc))
                elif proc.returncode is None and not self._stop.is_set():
                    log.warning(
                        "worker %d (pid %d) not listening after %g s; killing it",
                        slot.index,
                        proc.pid,
                        READY_TIMEOUT,
                    )
                    _kill(proc, signal.SIGKILL)
                code = await proc.wait()
                slot.proc = None
                if slot.handoff is not None:  # the connections it held went with it
                    slot.handoff.close()
                    slot.handoff = None
                    self.balancer.gone(slot.index)
                if discard is not None:
                    await discard
                if metrics_dir is not None:  # its in-flight gauge no longer counts
                    if self._lost is not None:
                        self._lost.count(proc.pid)  # the streams it could not count
                    mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                how = describe_exit(code)
                if self._stop.is_set():
                    if code:
                        log.warning("worker %d (pid %d) %s", slot.index, proc.pid, how)
                    return
                if not ready:
                    slot.start_failures += 1
                    if not self._listening:  # at start-up: a bad option, say; no retry
                        self._give_up(f"worker {slot.index} {how} before it was listening")
                        return
                    if slot.start_failures >= MAX_START_FAILURES:
                        self._give_up(
                            f"worker {slot.index} {how} before it was listening, "
                            f"{slot.start_failures} times in a row"
                        )
                        return
                lived = time.monotonic() - started
                slot.quick_deaths = 0 if lived >= STABLE_AFTER else slot.quick_deaths + 1
                delay = backoff(slot.quick_deaths)
                log.warning(
                    "worker %d (pid %d) %s; restarting it in %.1f s",
                    slot.index,
                    proc.pid,
                    how,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        except Exception as err:  # cannot start a process at all, say
            self._give_up(f"cannot run worker {slot.index}: {err}")

    async def _spawn(
        self, slot: _Slot, port: int, metrics_dir: str | None
    ) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env[worker_env(self.config.name)] = str(slot.index)
        env.pop(channel_env(self.config.name), None)
        theirs = None
        if self.handing:  # the Unix socket its connections come over
            ours, theirs = channel_pair()
            env[channel_env(self.config.name)] = str(theirs.fileno())
            index = slot.index
            slot.handoff = Handoff(
                ours,
                on_closed=lambda count: self.balancer.closed(index, count),
                on_draining=lambda: self.balancer.draining(index),
            )
        # Only this parent's directory, and only with metrics on: one inherited from
        # the environment is no one's to write to.
        env.pop(MULTIPROC_ENV, None)
        if metrics_dir is not None:
            env[MULTIPROC_ENV] = metrics_dir
        # The last --workers and --port win over any in the command. stdin is the
        # worker's lifeline (end of file: the parent is gone); stdout says "ready".
        try:
            return await asyncio.create_subprocess_exec(
                *self.command,
                flag("workers"),
                "1",
                flag("port"),
                str(port),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=() if theirs is None else (theirs.fileno(),),
            )
        except BaseException:
            if slot.handoff is not None:
                slot.handoff.close()
                slot.handoff = None
            raise
        finally:
            if theirs is not None:  # the worker has its own copy
                theirs.close()

    def _start_accepting(self) -> None:
        """Accept while some worker takes connections."""
        if self._listener is not None and not self._accepting and self.balancer.taking():
            self._accepting = True
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    def _pause_accepting(self) -> None:
        if self._listener is not None and self._accepting:
            self._accepting = False
            asyncio.get_running_loop().remove_reader(self._listener.fileno())

    async def _close_listener(self) -> None:
        """Stop taking connections without resetting one the kernel completed: no new
        handshake from now on (``listening.shut``), those under way complete and are
        handed out as usual for ``listening.SETTLE`` s, the backlog is swept, then the
        socket closes (closing it at once reset them, and a request nginx had sent on
        one became a 502). A worker is told to drain only after this."""
        listener = self._listener
        if listener is not None and listening.shut(listener):
            await asyncio.sleep(listening.SETTLE)
            if self._accepting:
                self._accept()  # what came since the reader last ran
        self._stop_accepting()

    def _stop_accepting(self) -> None:
        """Close the parent's listening socket: connections are refused from now on
        (the reservation still holds the port)."""
        self._pause_accepting()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        """Hand each connection waiting to be accepted to the least-loaded worker."""
        assert self._listener is not None
        for _ in range(BATCH):
            if not self.balancer.taking():  # none does: connections wait in the backlog
                self._pause_accepting()
                return
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as err:  # out of descriptors, say: try again in a moment
                if err.errno == errno.ECONNABORTED:  # the client gave up first
                    continue
                if not self._accept_failing:  # one line per burst, not one per try
                    self._accept_failing = True
                    reason = os.strerror(err.errno or 0)
                    log.warning(
                        "cannot accept connections: %s; trying every %g s", reason, ACCEPT_PAUSE
                    )
                self._pause_accepting()
                asyncio.get_running_loop().call_later(ACCEPT_PAUSE, self._start_accepting)
                return
            if self._accept_failing:
                self._accept_failing = False
                log.info("accepting connections again")
            index = self.balancer.pick()
            assert index is not None  # some worker takes connections
            handoff = self.slots[index].handoff
            if handoff is None:  # cannot happen: a worker taking connections has a channel
                conn.close()
                self.balancer.closed(index)
                continue
            handoff.hand(conn)

    def _on_ready(self, slot: _Slot, pid: int) -> None:
        log.info(
            "worker %d %s: pid %d", slot.index, "restarted" if slot.ever_ready else "started", pid
        )
        slot.ever_ready = True
        slot.start_failures = 0
        if not self._listening and all(s.ever_ready for s in self.slots):
            self._listening = True
            mode = "" if self.config.tls is None else f", {self.config.tls.mode}"
            log.info("listening on %s (%d workers%s)", self._address, len(self.slots), mode)

    def _give_up(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self._stop.set()

    def _on_signal(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: workers drain for up to %g s", self.config.grace)
            self._stop.set()
        else:
            log.info("second signal: workers end their streams now")
            self._send(HURRY_SIGNAL)

    def _send(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.proc is not None:
                _kill(slot.proc, sig)

    async def _stop_workers(self, tasks: list[asyncio.Task[None]]) -> None:
        """SIGTERM every worker; kill those still running long after the grace period."""
        self._send(signal.SIGTERM)
        _, pending = await asyncio.wait(tasks, timeout=self.config.grace + KILL_AFTER)
        if pending:
            log.warning("killing workers still running %g s after the grace period", KILL_AFTER)
            self._send(signal.SIGKILL)
            await asyncio.wait(pending)


def _kill(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Send ``sig`` to ``proc`` unless it is known to have ended.

    Not ``proc.send_signal``: its Popen polls first and may reap the process,
    and asyncio's child watcher then reports exit code 255 with a warning.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


async def _wait_ready(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """True once the worker says it is ready; False if it ends first or takes
    longer than ``timeout`` seconds."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # a line over the stream's limit (dropped): not "ready"
                    continue
                if not line:
                    return False
                if line == READY:
                    return True
    except TimeoutError:
        return False


async def _discard(proc: asyncio.subprocess.Process) -> None:
    """Read the worker's stdout to its end, keeping nothing."""
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass


def make_metrics_dir(prefix: str) -> tuple[str, int]:
    """A new directory for the workers' metrics files, named ``prefix<pid>-<random>``,
    and the descriptor of the lock that marks it in use until this process closes it
    or ends (even by SIGKILL).

    Directories of this prefix whose parents are gone are removed first. Raises OSError saying
    where, e.g. under a read-only root file system without a writable TMPDIR.
    """
    try:
        parent = tempfile.gettempdir()  # the first writable of TMPDIR, /tmp ...
        remove_stale_metrics_dirs(parent, prefix)
        path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
        lock = os.open(os.path.join(path, METRICS_DIR_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(
            f"cannot make the workers' metrics directory: {reason} "
            "(mount a writable /tmp, or set TMPDIR to a writable directory)"
        ) from None
    fcntl.flock(lock, fcntl.LOCK_EX)
    return path, lock


def remove_stale_metrics_dirs(parent: str, prefix: str) -> None:
    """Remove the metrics directories (``prefix...``) of parents that are gone (killed with SIGKILL,
    say, so that they could not remove their own).

    A directory is stale when its lock file is not locked: the kernel releases a
    parent's lock when it ends, however it ends, and a pid would not do (another
    container sharing the directory has pids of its own). One without a lock file
    yet is being made, and is left alone.
    """
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                _remove_if_unlocked(entry.path)


def _remove_if_unlocked(path: str) -> None:
    try:
        lock = os.open(os.path.join(path, METRICS_DIR_LOCK), os.O_RDWR)
    except OSError:  # no lock file (yet), or not ours to open
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked: its parent is running
        return
    else:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(lock)
