"""OpenTelemetry traces of every stream, server side and client side: off unless asked for.

Tracing is on in a process when

- the application has set a global OpenTelemetry SDK tracer provider itself (e.g.
  it runs under ``opentelemetry-instrument``), whose spans are then used; or else
- the SDK's standard environment variables ask for it: ``OTEL_TRACES_EXPORTER``
  names an exporter (not ``none``), or it is unset and an OTLP endpoint is given
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: the
  specification's default exporter is ``otlp``); ``OTEL_SDK_DISABLED=true`` keeps it
  off. The SDK's own auto-configuration then sets up everything from the
  environment, once per process (:func:`from_env`): exporters, OTLP protocol
  (``grpc`` or ``http/protobuf``), endpoint, headers, sampler, resource, propagators.

Off, nothing of OpenTelemetry is imported and no listener is attached: a server
built then costs what it did before tracing existed. The spans themselves are made
in :mod:`.otel`, imported only once tracing is on; without the OpenTelemetry packages
(the ``otel`` extra) a process that the variables ask to trace says so in one line
and serves without traces.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from grpclib.client import Channel, Stream
from grpclib.const import Cardinality
from grpclib.metadata import Deadline
from grpclib.server import Server

from . import logs

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .otel import ServerSpans

log = logging.getLogger(__name__)

EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DISABLED_ENV = "OTEL_SDK_DISABLED"
FLUSH_TIMEOUT = 5.0  # seconds a stopping server waits for its last spans to be exported

_Send = TypeVar("_Send")
_Recv = TypeVar("_Recv")
_Metadata = Mapping[str, str | bytes] | Collection[tuple[str, str | bytes]]

_from_env_done = False
_from_env: TracerProvider | None = None  # the provider from_env() made, if it made one


def asked_for(environ: Mapping[str, str] = os.environ) -> str | None:
    """The variable that asks for traces (``OTEL_TRACES_EXPORTER=otlp``, say), or None."""
    if environ.get(DISABLED_ENV, "").strip().lower() == "true":
        return None
    exporter = environ.get(EXPORTER_ENV, "").strip()
    if exporter:
        return None if exporter.lower() == "none" else f"{EXPORTER_ENV}={exporter}"
    for name in ENDPOINT_ENVS:
        if value := environ.get(name, "").strip():
            return f"{name}={value}"
    return None


def messages_env(name: str) -> str:
    """The variable that asks for one span event per message, for application ``name``
    (``MY_APP_TRACE_MESSAGES`` for ``my-app``): streams can carry thousands."""
    return name.upper().replace("-", "_") + "_TRACE_MESSAGES"


def messages_asked(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether :func:`messages_env` is set to 1, true or yes."""
    return environ.get(messages_env(name), "").strip().lower() in ("1", "true", "yes")


def provider(service_name: str | None = None) -> TracerProvider | None:
    """Where this process's spans go: the application's global SDK tracer provider, if
    it set one, else the one :func:`from_env` makes; None: tracing is off."""
    found = _global_provider()
    if found is not None:
        _log_ids()
        return found
    return from_env(service_name)


def from_env(service_name: str | None = None) -> TracerProvider | None:
    """The SDK configured from the ``OTEL_*`` variables, if they ask for traces; once per
    process (later calls give the first answer). ``service_name`` is the resource's
    ``service.name`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` name one."""
    global _from_env_done, _from_env
    if _from_env_done:
        return _from_env
    _from_env_done = True
    why = asked_for()
    if why is None:
        return None
    try:
        from . import otel
    except ImportError as err:
        log.warning(
            "%s asks for traces, but OpenTelemetry is not installed (%s; it comes with "
            "the otel extra): running without traces",
            why,
            err,
        )
        return None
    try:
        _from_env = otel.configure(service_name)
    except Exception as err:  # the SDK's RuntimeError for an unknown exporter, say
        log.error("tracing not started (%s): %s", why, err)
        return None
    _log_ids()
    log.info("tracing on (%s)", why)
    return _from_env


def shutdown(timeout: float = FLUSH_TIMEOUT) -> None:
    """Export what spans are left, for up to ``timeout`` s, and stop the exporter that
    :func:`from_env` started (the application's own provider is the application's)."""
    if _from_env is not None:
        from . import otel

        otel.shutdown(_from_env, timeout)


def server_spans(
    server: Server, tracer_provider: TracerProvider, *, message_events: bool = False
) -> ServerSpans:
    """A SERVER span for every stream of ``server`` (attach before ``Streams``: see
    :class:`.otel.ServerSpans`); ``message_events``: one span event per message."""
    from .otel import ServerSpans

    return ServerSpans(server, tracer_provider, message_events=message_events)


def request(
    channel: Channel,
    name: str,
    cardinality: Cardinality,
    request_type: type[_Send],
    reply_type: type[_Recv],
    *,
    deadline: Deadline | None = None,
    metadata: _Metadata | None = None,
) -> AbstractAsyncContextManager[Stream[_Send, _Recv]]:
    """``channel.request(...)``, in a CLIENT span when tracing is on: the span's
    context goes to the server in the request metadata (``traceparent``, or what the
    configured propagators write), and the span ends with the call's status."""
    found = provider()
    if found is None:
        return channel.request(
            name, cardinality, request_type, reply_type, deadline=deadline, metadata=metadata
        )
    from .otel import traced_request

    return traced_request(
        found,
        channel,
        name,
        cardinality,
        request_type,
        reply_type,
        deadline=deadline,
        metadata=metadata,
    )


def _global_provider() -> TracerProvider | None:
    """The global SDK tracer provider, if one is set; never imports OpenTelemetry."""
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    found = trace.get_tracer_provider()
    if isinstance(found, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return found  # type: ignore[no-any-return]


def _log_ids() -> None:
    """Give log lines the current span's ids (``logs.TraceIds``)."""
    if logs.span_ids is None:
        from .otel import span_ids

        logs.span_ids = span_ids
