"""Logging set-up: text or JSON lines on stderr, and one line per finished stream.

Expected client behaviour (cancel, disconnect, deadline, bad input) is an info
line, never a traceback; grpclib's own per-request lines are turned down, since
the stream line says the same with more detail.

While tracing is on (``tracing.py``), a line written while a span is current (every
line of a stream's task, and its "stream ended" line) carries the span's
``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Literal

from grpclib.const import Status
from pythonjsonlogger.json import JsonFormatter

from . import streams
from .streams import StreamRecord

LogFormat = Literal["text", "json"]

#: The serving layer's own lines (start, ready, drain, stop): shown at any level.
log = logging.getLogger(__package__)
stream_log = logging.getLogger(streams.__name__)  # the stream lines share its logger

# Statuses that point at the server rather than at what the client did.
_SERVER_FAULTS = {Status.UNKNOWN, Status.INTERNAL, Status.DATA_LOSS}
# Probes (Docker HEALTHCHECK, Kubernetes grpc probes) ask every few seconds: their
# successful answers would drown the stream lines at info, so they log at debug.
_PROBES = "/grpc.health.v1.Health/"
_STREAM_FIELDS = ("method", "peer", "status", "received", "sent", "duration_ms", "error")
_PROCESS_FIELDS = ("worker", "pid")  # set on every line of a ``serve --workers`` worker
_TRACE_FIELDS = ("trace_id", "span_id")  # set while a span is current (tracing.py)

#: The current span's ``(trace_id, span_id)`` in hex, or None: set by ``tracing.py``
#: once tracing is on; while it is None, log lines carry no ids and cost nothing more.
span_ids: Callable[[], tuple[str, str] | None] | None = None


class _TextFormatter(logging.Formatter):
    """``time level logger message key=value ...`` with the stream fields, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [
            f"{key}={getattr(record, key)}"
            for key in (*_STREAM_FIELDS, *_TRACE_FIELDS, *_PROCESS_FIELDS)
            if getattr(record, key, None) is not None
        ]
        return " ".join([line, *pairs])


class _AddFields(logging.Filter):
    """Adds the same fields to every record that passes."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.update(self.fields)
        return True


class TraceIds(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` to a record written while a span is current
    (``configure`` puts it on its handler; give it to your own handlers likewise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if span_ids is not None and (ids := span_ids()) is not None:
            record.trace_id, record.span_id = ids
        return True


class _AtLevel(logging.Filter):
    """Passes records at ``level`` or above, and the serving layer's own info lines
    (``log``: start, ready, drain, stop) at any level; the loggers below it
    (``number_service.serving.streams``, ...) follow ``level`` like every other."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or (
            record.name == log.name and record.levelno >= logging.INFO
        )


def configure(
    level: str = "info", fmt: LogFormat = "text", fields: Mapping[str, object] | None = None
) -> None:
    """Send our logs to stderr at ``level``, as text or JSON lines; ``fields`` are
    added to every line (a worker's index and pid)."""
    handler = logging.StreamHandler(sys.stderr)
    level_no = logging.getLevelName(level.upper())
    handler.addFilter(_AtLevel(level_no))
    if fields:
        handler.addFilter(_AddFields(fields))
    handler.addFilter(TraceIds())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Start, ready (with the address), drain and stop lines show at any level: the
    # loggers let info through, the handler's filter drops the rest below ``level``.
    root.setLevel(min(logging.INFO, level_no))
    stream_log.setLevel(level_no)  # one line per stream: not even made when unwanted
    # grpclib logs each cancelled request at info; our stream line covers it.
    grpclib_level = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    logging.getLogger("grpclib").setLevel(grpclib_level)


def log_stream_end(record: StreamRecord) -> None:
    """One line per finished stream: who, what, how many messages, how long, status."""
    status = record.status or Status.UNKNOWN
    if status in _SERVER_FAULTS:
        level = logging.WARNING
    elif status is Status.OK and record.method.startswith(_PROBES):
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not stream_log.isEnabledFor(level):  # as log() would, before its fields are made
        return
    stream_log.log(
        level,
        "stream ended",
        extra={
            "method": record.method,
            "peer": record.peer,
            "status": status.name,
            "received": record.received,
            "sent": record.sent,
            "duration_ms": round(record.duration * 1000, 3),
            "error": record.message if status is not Status.OK else None,
        },
    )
