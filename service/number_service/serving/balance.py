"""Which worker of ``serve --workers N`` takes the next connection: sans I/O.

The supervisor accepts every connection itself and hands it to a worker
(``handoff.py`` moves the sockets); :class:`Balancer` only counts. It gives each new
connection to a worker holding the fewest *open* connections, as Envoy's
``exact_balance`` connection balancer does, so that with C open connections over N
workers each holds floor(C/N) or ceil(C/N) as long as none closes; a close frees
its slot, and the next connections fill the workers that hold fewest. Ties go round
(the search starts after the worker picked last): connections that open and close
one at a time are served by every worker in turn, not all by the first.

What it cannot do: move a connection. When the connections of one worker close,
or a worker restarts empty, the spread is floor/ceil again only once new
connections have filled it up.
"""

from __future__ import annotations


class Balancer:
    """Open connections per worker, and which workers take new ones."""

    def __init__(self, workers: int) -> None:
        #: Connections handed to each worker and not yet reported closed.
        self.open = [0] * workers
        self._taking = [False] * workers  # up and not draining
        self._next = 0  # where the search for a least-loaded worker starts

    def up(self, worker: int) -> None:
        """``worker`` (a new process, holding nothing) takes connections from now on."""
        self.open[worker] = 0
        self._taking[worker] = True

    def draining(self, worker: int) -> None:
        """``worker`` takes no more; the connections it holds still count until closed."""
        self._taking[worker] = False

    def gone(self, worker: int) -> None:
        """``worker`` ended: it takes none, and what it held went with it."""
        self._taking[worker] = False
        self.open[worker] = 0

    def closed(self, worker: int, count: int = 1) -> None:
        """``worker`` reports ``count`` of its connections closed (never below none:
        a report still on its way when the worker was counted gone changes nothing)."""
        self.open[worker] = max(0, self.open[worker] - count)

    def taking(self) -> list[int]:
        """The workers that take new connections."""
        return [index for index, taking in enumerate(self._taking) if taking]

    def pick(self) -> int | None:
        """The worker for a new connection, counted open there: one of the least
        loaded among those taking connections; None when none is."""
        workers = len(self.open)
        best: int | None = None
        for step in range(workers):
            index = (self._next + step) % workers
            if self._taking[index] and (best is None or self.open[index] < self.open[best]):
                best = index
        if best is None:
            return None
        self.open[best] += 1
        self._next = (best + 1) % workers
        return best
