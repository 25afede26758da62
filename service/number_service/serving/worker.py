"""The worker side of ``serve --workers N``: what changes in a process the supervisor started.

The supervisor (``supervisor.py``) starts each worker with its worker command plus
``--workers 1 --port <port>``, and ``<NAME>_WORKER_INDEX`` set in its environment,
where NAME is the application's name (``ServeConfig.name``) in capitals, ``-`` as
``_``: ``MY_APP_WORKER_INDEX`` for ``my-app``. Such a process then:

- serves the connections the supervisor accepted and handed to it over a Unix
  socket (``handoff.py``; ``<NAME>_WORKER_CHANNEL`` names its end), reporting each
  close, so that the supervisor can keep the open connections of its workers
  exactly even (``balance.py``); or, without that variable (the supervisor does so
  under plain grpclib), listens with SO_REUSEPORT, and the kernel spreads them;
- tags every log line with ``worker`` and ``pid``, and every stream's initial
  metadata with ``<name>-worker: <index>`` (``my-app-worker``);
- writes ``ready`` to stdout (a pipe to the supervisor) once it listens;
- starts its drain on SIGTERM, however many arrive (a SIGTERM sent to the whole
  group or cgroup, as systemd does, plus the one the supervisor forwards, must not
  cut the grace short); SIGUSR1 cuts the grace short; SIGINT is ignored, because
  a terminal's Ctrl-C reaches every process of the group and the supervisor
  forwards it;
- starts its drain too when stdin (a pipe from the supervisor) reaches end of
  file: the supervisor died, so nobody would stop or restart this worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from grpclib import events
from grpclib.server import Server

from .logs import log

READY = b"ready\n"  # what a worker writes to stdout once it listens
HURRY_SIGNAL = signal.SIGUSR1  # supervisor to worker: cut the grace period short


def worker_env(name: str) -> str:
    """The environment variable that tells a worker of application ``name`` its index
    (internal: set by the supervisor only)."""
    return name.upper().replace("-", "_") + "_WORKER_INDEX"


def worker_header(name: str) -> str:
    """The initial metadata key that names the worker serving a stream."""
    return f"{name.lower()}-worker"


@dataclass(frozen=True)
class Worker:
    """This process is worker ``index`` of a supervisor of application ``name``."""

    index: int
    name: str

    @classmethod
    def from_env(cls, name: str) -> Worker | None:
        """The worker this process is, if a supervisor of ``name`` started it."""
        value = os.environ.get(worker_env(name))
        return None if value is None else cls(int(value), name)

    @staticmethod
    def ignore_interrupts() -> None:
        """Ignore SIGINT (call before the event loop starts): the supervisor forwards it."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def attach(self, server: Server) -> None:
        """Name this worker in the initial metadata of every stream ``server`` answers."""
        header, index = worker_header(self.name), str(self.index)

        async def tag(event: events.SendInitialMetadata) -> None:
            event.metadata[header] = index

        events.listen(server, events.SendInitialMetadata, tag)

    def install(self, stop: asyncio.Event, hurry: Callable[[], None]) -> Callable[[], None]:
        """Set ``stop`` on SIGTERM or when the supervisor goes away; call ``hurry``
        on HURRY_SIGNAL. Returns what undoes this."""
        loop = asyncio.get_running_loop()

        def on_hurry() -> None:
            stop.set()
            hurry()

        def on_stdin() -> None:
            try:
                data = os.read(sys.stdin.fileno(), 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(sys.stdin.fileno())
                if not stop.is_set():
                    log.warning("supervisor gone: draining")
                stop.set()

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(HURRY_SIGNAL, on_hurry)
        loop.add_reader(sys.stdin.fileno(), on_stdin)

        def undo() -> None:
            loop.remove_reader(sys.stdin.fileno())
            for sig in (signal.SIGTERM, HURRY_SIGNAL):
                loop.remove_signal_handler(sig)
                # The drain is over: one more from the supervisor must not kill us.
                signal.signal(sig, signal.SIG_IGN)

        return undo

    def ready(self, address: str) -> None:
        """Tell the supervisor this worker listens (it then says ``listening on``)."""
        log.info("worker %d ready on %s", self.index, address)
        sys.stdout.buffer.write(READY)
        sys.stdout.flush()

    def log_fields(self) -> dict[str, int]:
        """Fields every log line of this worker carries."""
        return {"worker": self.index, "pid": os.getpid()}
