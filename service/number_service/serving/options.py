"""The serving layer's command-line options: every setting a ``serve`` command takes.

One table (:data:`OPTIONS`) names, for each setting of :class:`.run.ServeConfig` and
:class:`.limits.Limits` (and the few a serve command uses itself: logging, TLS files,
workers), its flag, type, default and help. :func:`serve_options` adds them all to
any click command, each also read from ``<PREFIX><FLAG>`` in the environment, and
:func:`serve_config` turns the parsed values into a ServeConfig:

    @click.command(context_settings={"show_default": True})
    @options.serve_options("MY_APP_", exclude=["workers"])
    def serve(**values: Any) -> None:
        config = options.serve_config(values, ServeConfig(name="my-app"))
        asyncio.run(serving.serve(lambda: [MyService()], config))

Why it is the layer's: its statuses and log lines tell a person which flag to change
("raise --max-message-size"), and the supervisor passes ``--workers`` and ``--port``
to its workers. They spell them with :func:`.settings.flag` (the setting's name with
dashes), the same rule this table's flags are made by (:attr:`Option.flag`), so they
name flags that every command built with :func:`serve_options` has, whichever
service it serves; ``settings.flag`` needs neither click nor this table, and
tests/test_options.py checks that each setting a message names is one of the
table's. :func:`flag` here is the same name, for a setting the table must have.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from . import settings
from .tls import TLSConfig

if TYPE_CHECKING:
    from .run import ServeConfig

LOG_LEVELS = ("debug", "info", "warning", "error")

_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound="ServeConfig")


class Seconds(click.FloatRange):
    """click's ``FloatRange`` that also refuses ``nan``: it passes every bound
    (each comparison with it is false), and a timer or limit of ``nan`` means nothing."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number: float = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


class WorkerCount(click.ParamType[int, Any]):
    """``--workers``: a count of processes; 0 or ``auto`` (0) is one per core, found
    by ``serve`` (see ``supervisor.auto_workers``)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            count = value
        elif str(value).strip().lower() == "auto":
            count = 0
        else:
            try:
                count = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number of workers or 'auto'", param, ctx)
        if count < 0:
            self.fail(
                f"{count} is negative; use 1 or more, or 0 or 'auto' for one per core", param, ctx
            )
        return count


@dataclass(frozen=True)
class Option:
    """One serve option: the setting it fills, its flag, click type, default and help."""

    setting: str  # the field of ServeConfig or Limits, or the command's own name for it
    type: Any  # a click type, or None for a string
    default: Any
    help: str
    # Where the value goes: a ServeConfig field, a Limits field, or the command's
    # own use (logging, TLS files, workers: see serve_config).
    to: Literal["config", "limits", "command"] = "limits"
    zero_is_off: bool = False  # 0 on the command line is None (off) in Limits

    @property
    def flag(self) -> str:
        return settings.flag(self.setting)


OPTIONS: tuple[Option, ...] = (
    Option(
        "host",
        None,
        settings.DEFAULT_HOST,
        "Address to listen on; 0.0.0.0: all IPv4 interfaces; :: all interfaces, "
        "IPv4 and IPv6 (dual-stack).",
        to="config",
    ),
    Option(
        "port",
        click.IntRange(0, 65535),
        settings.DEFAULT_PORT,
        "TCP port; 0 picks a free one (the ready line says which).",
        to="config",
    ),
    Option(
        "grace",
        Seconds(min=0),
        settings.DEFAULT_GRACE,
        "Seconds in-flight streams get to finish after SIGTERM/SIGINT; "
        "those left then end with UNAVAILABLE.",
        to="config",
    ),
    Option(
        "metrics_port",
        click.IntRange(0, 65535),
        None,
        "Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics [default: off].",
        to="config",
    ),
    Option(
        "metrics_host",
        None,
        settings.DEFAULT_HOST,
        "Address for the metrics endpoint.",
        to="config",
    ),
    Option(
        "log_level",
        click.Choice(LOG_LEVELS, case_sensitive=False),
        "info",
        "info: start, stop and one line per finished stream.",
        to="command",
    ),
    Option(
        "log_format",
        click.Choice(["text", "json"], case_sensitive=False),
        "text",
        "json: one JSON object per line.",
        to="command",
    ),
    Option(
        "tls_cert",
        click.Path(dir_okay=False),
        None,
        "Serve TLS only, with this PEM certificate (chain); needs --tls-key.",
        to="command",
    ),
    Option(
        "tls_key",
        click.Path(dir_okay=False),
        None,
        "PEM private key of --tls-cert.",
        to="command",
    ),
    Option(
        "tls_client_ca",
        click.Path(dir_okay=False),
        None,
        "Mutual TLS: require client certificates issued by this PEM CA; needs --tls-cert.",
        to="command",
    ),
    Option(
        "tls_handshake_timeout",
        Seconds(min=0, min_open=True),
        settings.DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        "Seconds a TLS client has to finish its handshake; a slower one is closed "
        "(not counted by --max-connections until it is done).",
    ),
    Option(
        "workers",
        WorkerCount(),
        "1",
        "Processes sharing the port (SO_REUSEPORT), restarted when they die; "
        "0 or auto: one per core.",
        to="command",
    ),
    Option(
        "max_message_size",
        click.IntRange(min=1),
        settings.DEFAULT_MAX_MESSAGE_SIZE,
        "Largest request message, bytes (at least 1); a larger one ends its stream "
        "with RESOURCE_EXHAUSTED.",
    ),
    Option(
        "max_concurrent_streams",
        click.IntRange(1, 2**31 - 1),
        settings.DEFAULT_MAX_CONCURRENT_STREAMS,
        "Streams open at once per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
        "clients queue the rest.",
    ),
    Option(
        "max_connections",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_CONNECTIONS,
        "Open connections at once; more are closed at once with a GOAWAY. 0: no cap.",
        zero_is_off=True,
    ),
    Option(
        "keepalive_time",
        Seconds(min=0),
        settings.DEFAULT_KEEPALIVE_TIME,
        "Seconds between the server's keepalive pings on each connection. 0: no pings.",
        zero_is_off=True,
    ),
    Option(
        "keepalive_timeout",
        Seconds(min=0, min_open=True),
        settings.DEFAULT_KEEPALIVE_TIMEOUT,
        "Seconds a ping may go unanswered before the connection is closed.",
    ),
    Option(
        "idle_timeout",
        Seconds(min=0),
        0,
        "Seconds a connection may have no stream before it is closed with a GOAWAY. "
        "0 (default): never; keepalive still closes dead peers.",
        zero_is_off=True,
    ),
    Option(
        "stream_idle_timeout",
        Seconds(min=0),
        0,
        "Seconds a stream may go without a request before it ends with "
        "DEADLINE_EXCEEDED. 0: never.",
        zero_is_off=True,
    ),
    Option(
        "max_empty_frames",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_EMPTY_FRAMES,
        "Empty DATA/HEADERS/CONTINUATION frames (no END_STREAM) a client may send in a "
        "row; one more closes its connection (GOAWAY ENHANCE_YOUR_CALM). 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_priority_frames",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_PRIORITY_FRAMES,
        "PRIORITY frames per stream a client opens; more close its connection. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_window_updates",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_WINDOW_UPDATES,
        "WINDOW_UPDATE frames per DATA frame the server sends (+5 + 2 per stream); more "
        "close the connection. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "min_ping_interval",
        Seconds(min=0),
        settings.DEFAULT_MIN_PING_INTERVAL,
        "Seconds a client should leave between PINGs while the server sends no data; "
        "the third PING sooner closes its connection (too_many_pings). 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_settings",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_SETTINGS,
        "SETTINGS frames a client may send while the server sends no data; more close "
        "its connection. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_resets",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_RESETS,
        "Streams of a connection reset before the server answered them; more (once "
        "they are over half its streams) close it (Rapid Reset). 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "flood_cooldown",
        Seconds(min=0),
        settings.DEFAULT_FLOOD_COOLDOWN,
        "Seconds new connections from an address are refused after one of its "
        "connections was cut for a flood; doubled for each further cut within 5 min, up to "
        "60. Clients behind one NAT or proxy share it. 0: off.",
        zero_is_off=True,
    ),
    Option(
        "max_queued_control_frames",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_QUEUED_CONTROL_FRAMES,
        "PING/SETTINGS/RST_STREAM answers queued for a client that does not read; more "
        "close its connection. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_frames_per_turn",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_FRAMES_PER_TURN,
        "Frames of one connection handled per event-loop turn, so that others are "
        "served meanwhile. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_messages_per_turn",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_MESSAGES_PER_TURN,
        "Requests one connection's streams take, together, per event-loop turn, so "
        "that others are served meanwhile. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_connection_buffer",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_CONNECTION_BUFFER,
        "Request bytes a connection's streams may make the server hold (partial messages "
        "included); a stream going over ends with RESOURCE_EXHAUSTED. 0: no limit.",
        zero_is_off=True,
    ),
    Option(
        "max_process_buffer",
        click.IntRange(min=0),
        settings.DEFAULT_MAX_PROCESS_BUFFER,
        "Request bytes all connections together may make the server hold; a stream "
        "going over ends with RESOURCE_EXHAUSTED. 0: no limit.",
        zero_is_off=True,
    ),
)

_BY_SETTING = {option.setting: option for option in OPTIONS}


def option(setting: str) -> Option:
    """The serve option of ``setting`` (a field name: ``"max_connections"``)."""
    try:
        return _BY_SETTING[setting]
    except KeyError:
        raise KeyError(f"no serve option sets {setting!r}") from None


def flag(setting: str) -> str:
    """The flag of ``setting``, for a message that tells a person to change it:
    ``flag("max_connections")`` is ``"--max-connections"``; KeyError for a setting
    no serve option sets."""
    return option(setting).flag


def env_var(prefix: str, setting: str) -> str:
    """The environment variable of ``setting`` under ``prefix``: ``MY_APP_MAX_CONNECTIONS``."""
    option(setting)  # a misspelt setting fails here
    return prefix + setting.upper()


def serve_options(
    env_prefix: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    exclude: Collection[str] = (),
) -> Callable[[_F], _F]:
    """A decorator adding every serve option to a click command, in table order.

    ``env_prefix`` (``"MY_APP_"``) names each option's environment variable (see
    :func:`env_var`); an option given on the command line wins. ``defaults``
    replaces the table's default of some settings (an application's own message
    size, say); ``exclude`` leaves some out (``"workers"`` for a command that runs
    no supervisor). The command receives each as a keyword argument named by its
    setting.
    """
    overrides = dict(defaults or {})
    for setting in (*overrides, *exclude):
        option(setting)  # a misspelt setting fails here, not silently
    chosen = [o for o in OPTIONS if o.setting not in exclude]

    def add(command: _F) -> _F:
        for o in reversed(chosen):
            command = click.option(
                o.flag,
                o.setting,
                type=o.type,
                default=overrides.get(o.setting, o.default),
                help=o.help,
                envvar=env_var(env_prefix, o.setting),
                show_envvar=True,
            )(command)
        return command

    return add


def serve_config(values: Mapping[str, Any], base: _C) -> _C:
    """``base`` (the application's ServeConfig) with the parsed ``values`` of
    :func:`serve_options`: its ServeConfig and Limits settings (0 as None where 0
    means off) and its TLS files. A setting not in ``values`` (excluded) keeps
    ``base``'s value. Logging and workers are the command's to apply.

    Raises click.UsageError (call it inside the command) for TLS files that do
    not go together.
    """

    def given(to: str) -> dict[str, Any]:
        return {
            o.setting: None if o.zero_is_off and not values[o.setting] else values[o.setting]
            for o in OPTIONS
            if o.to == to and o.setting in values
        }

    limits = dataclasses.replace(base.limits, **given("limits"))
    config = dataclasses.replace(base, **given("config"), limits=limits)
    if {"tls_cert", "tls_key", "tls_client_ca"} & values.keys():
        config.tls = server_tls(
            values.get("tls_cert"), values.get("tls_key"), values.get("tls_client_ca")
        )
    return config


def server_tls(cert: str | None, key: str | None, client_ca: str | None) -> TLSConfig | None:
    """The TLS files of a serve command, or None for plaintext; a usage error if incomplete."""
    if cert is None and key is None:
        if client_ca is not None:
            raise click.UsageError(
                f"{flag('tls_client_ca')} needs {flag('tls_cert')} and {flag('tls_key')}: "
                "mutual TLS is TLS first",
                click.get_current_context(),
            )
        return None
    if cert is None or key is None:
        raise click.UsageError(
            f"{flag('tls_cert')} and {flag('tls_key')} go together: give both",
            click.get_current_context(),
        )
    return TLSConfig(cert, key, client_ca)
