"""The ``number-service`` command: ``serve`` runs the server, ``accumulate`` is a client,
``health`` asks a server whether it is serving.

Exit codes: 0 success, 1 the call or the server failed, 2 bad input or usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import re
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import IO, Any, NoReturn, TypeVar

import click
from grpclib.exceptions import GRPCError

from . import healthcheck, server
from .accumulator import check_int32
from .client import NumberClient
from .serving import limits, logs, metrics, supervisor, tls, tracing
from .serving.run import DEFAULT_GRACE, DEFAULT_HOST, DEFAULT_PORT
from .serving.worker import Worker
from .targets import Target, parse_targets

LOG_LEVELS = ("debug", "info", "warning", "error")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class InputError(ValueError):
    """A number given to ``accumulate`` that cannot be sent; names where it came from."""


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"number-service: {message}", err=True)
    sys.exit(code)


def _interrupted() -> NoReturn:
    """Ctrl-C: say so and leave at once, without the interpreter's shutdown.

    By now ``asyncio.run`` has cancelled the call and closed the connections; what
    is left is a daemon thread blocked reading stdin, and the teardown of some 430
    modules: about 80 ms of CPU, which on a loaded machine took seconds (a CI run
    saw accumulate still running 5 s after SIGINT). Spans still queued (tracing on)
    are exported first, as a normal exit would.
    """
    click.echo("number-service: interrupted", err=True)
    with contextlib.suppress(Exception):
        tracing.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing to save
            stream.flush()
    os._exit(130)


def _parse(text: str, where: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise InputError(f"{where}: {text!r} is not an integer")
    try:
        return check_int32(int(text))
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None


def _from_args(args: Iterable[str]) -> list[int]:
    return [_parse(arg, f"argument {i}") for i, arg in enumerate(args, 1)]


async def _from_lines(stream: IO[str]) -> AsyncIterator[int]:
    """One integer per line, read as it comes so that a pipe streams; blank lines skip.

    A daemon thread does the blocking reads: when the call fails or Ctrl-C comes
    while stdin is still open, the command exits instead of waiting for a line
    (``asyncio.to_thread`` would hold ``asyncio.run`` until the read returned).
    """
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | InputError] = asyncio.Queue()
    room = threading.Semaphore(1024)  # lines read ahead of the sender, at most

    def hand_over(item: str | InputError) -> bool:
        room.acquire()
        try:
            loop.call_soon_threadsafe(lines.put_nowait, item)
        except RuntimeError:  # the loop is closed: the command is over
            return False
        return True

    def pump() -> None:
        try:
            for line in stream:
                if not hand_over(line):
                    return
        except (OSError, ValueError) as err:  # unreadable or undecodable stdin
            hand_over(InputError(f"stdin: {err}"))
        else:
            hand_over("")

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    lineno = 0
    while line := await lines.get():
        room.release()
        if isinstance(line, InputError):
            raise line
        lineno += 1
        if line.strip():
            yield _parse(line.strip(), f"line {lineno}")


ENV_PREFIX = "NUMBER_SERVICE_"
HEALTH_ENV_PREFIX = ENV_PREFIX + "HEALTH_"  # health's TLS client options; see health
_F = TypeVar("_F", bound=Callable[..., Any])


def _serve_option(flag: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A click option that also reads NUMBER_SERVICE_<NAME> from the environment."""
    name = flag.removeprefix("--").replace("-", "_").upper()
    return click.option(flag, envvar=ENV_PREFIX + name, show_envvar=True, **kwargs)


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


_RAW_ARGS = "number_service.raw_args"


class _KeepsArgs(click.Command):
    """A command that keeps the arguments it was given: ``serve --workers`` passes
    them on to its workers, so every option reaches them as the user wrote it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_RAW_ARGS] = list(args)
        return super().parse_args(ctx, args)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="number-service", prog_name="number-service")
def main() -> None:
    """NumberService: a gRPC bidirectional stream that answers each number with the sum so far."""


@main.command(cls=_KeepsArgs, context_settings={"show_default": True})
@_serve_option(
    "--host",
    default=DEFAULT_HOST,
    help="Address to listen on; 0.0.0.0: all IPv4 interfaces; :: all interfaces, "
    "IPv4 and IPv6 (dual-stack).",
)
@_serve_option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    help="TCP port; 0 picks a free one (the ready line says which).",
)
@_serve_option(
    "--grace",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACE,
    help="Seconds in-flight streams get to finish after SIGTERM/SIGINT; "
    "those left then end with UNAVAILABLE.",
)
@_serve_option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics [default: off].",
)
@_serve_option(
    "--metrics-host",
    default=DEFAULT_HOST,
    help="Address for the metrics endpoint.",
)
@_serve_option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    help="info: start, stop and one line per finished stream.",
)
@_serve_option(
    "--log-format",
    type=click.Choice(["text", "json"], case_sensitive=False),
    default="text",
    help="json: one JSON object per line.",
)
@_serve_option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    help="Serve TLS only, with this PEM certificate (chain); needs --tls-key.",
)
@_serve_option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@_serve_option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False),
    help="Mutual TLS: require client certificates issued by this PEM CA; needs --tls-cert.",
)
@_serve_option(
    "--workers",
    type=WorkerCount(),
    default="1",
    help="Processes sharing the port (SO_REUSEPORT), restarted when they die; "
    "0 or auto: one per core.",
)
@_serve_option(
    "--max-message-size",
    type=click.IntRange(min=1),
    default=server.MAX_MESSAGE_SIZE,
    help="Largest request message, bytes (at least 1); a larger one ends its stream "
    "with RESOURCE_EXHAUSTED.",
)
@_serve_option(
    "--max-concurrent-streams",
    type=click.IntRange(1, 2**31 - 1),
    default=limits.DEFAULT_MAX_CONCURRENT_STREAMS,
    help="Streams open at once per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
    "clients queue the rest.",
)
@_serve_option(
    "--max-connections",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_CONNECTIONS,
    help="Open connections at once; more are closed at once with a GOAWAY. 0: no cap.",
)
@_serve_option(
    "--keepalive-time",
    type=click.FloatRange(min=0),
    default=limits.DEFAULT_KEEPALIVE_TIME,
    help="Seconds between the server's keepalive pings on each connection. 0: no pings.",
)
@_serve_option(
    "--keepalive-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=limits.DEFAULT_KEEPALIVE_TIMEOUT,
    help="Seconds a ping may go unanswered before the connection is closed.",
)
@_serve_option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=0,
    help="Seconds a connection may have no stream before it is closed with a GOAWAY. "
    "0 (default): never; keepalive still closes dead peers.",
)
@_serve_option(
    "--stream-idle-timeout",
    type=click.FloatRange(min=0),
    default=0,
    help="Seconds a stream may go without a request before it ends with "
    "DEADLINE_EXCEEDED. 0: never.",
)
@_serve_option(
    "--max-empty-frames",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_EMPTY_FRAMES,
    help="Empty DATA/HEADERS/CONTINUATION frames (no END_STREAM) a client may send in a "
    "row; one more closes its connection (GOAWAY ENHANCE_YOUR_CALM). 0: no limit.",
)
@_serve_option(
    "--max-priority-frames",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_PRIORITY_FRAMES,
    help="PRIORITY frames per stream a client opens; more close its connection. 0: no limit.",
)
@_serve_option(
    "--max-window-updates",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_WINDOW_UPDATES,
    help="WINDOW_UPDATE frames per DATA frame the server sends (+5 + 2 per stream); more "
    "close the connection. 0: no limit.",
)
@_serve_option(
    "--min-ping-interval",
    type=click.FloatRange(min=0),
    default=limits.DEFAULT_MIN_PING_INTERVAL,
    help="Seconds a client should leave between PINGs while the server sends no data; "
    "the third PING sooner closes its connection (too_many_pings). 0: no limit.",
)
@_serve_option(
    "--max-settings",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_SETTINGS,
    help="SETTINGS frames a client may send while the server sends no data; more close "
    "its connection. 0: no limit.",
)
@_serve_option(
    "--max-resets",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_RESETS,
    help="Streams of a connection reset before the server answered them; more (once "
    "they are over half its streams) close it (Rapid Reset). 0: no limit.",
)
@_serve_option(
    "--flood-cooldown",
    type=click.FloatRange(min=0),
    default=limits.DEFAULT_FLOOD_COOLDOWN,
    help="Seconds new connections from an address are refused after one of its "
    "connections was cut for a flood; doubled for each further cut within 5 min, up to "
    "60. Clients behind one NAT or proxy share it. 0: off.",
)
@_serve_option(
    "--max-queued-control-frames",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_QUEUED_CONTROL_FRAMES,
    help="PING/SETTINGS/RST_STREAM answers queued for a client that does not read; more "
    "close its connection. 0: no limit.",
)
@_serve_option(
    "--max-frames-per-turn",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_FRAMES_PER_TURN,
    help="Frames of one connection handled per event-loop turn, so that others are "
    "served meanwhile. 0: no limit.",
)
@_serve_option(
    "--max-messages-per-turn",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_MESSAGES_PER_TURN,
    help="Requests one connection's streams take, together, per event-loop turn, so "
    "that others are served meanwhile. 0: no limit.",
)
@_serve_option(
    "--max-connection-buffer",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_CONNECTION_BUFFER,
    help="Request bytes a connection's streams may make the server hold (partial messages "
    "included); a stream going over ends with RESOURCE_EXHAUSTED. 0: no limit.",
)
@_serve_option(
    "--max-process-buffer",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_PROCESS_BUFFER,
    help="Request bytes all connections together may make the server hold; a stream "
    "going over ends with RESOURCE_EXHAUSTED. 0: no limit.",
)
def serve(
    host: str,
    port: int,
    grace: float,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    workers: int,
    max_message_size: int,
    max_concurrent_streams: int,
    max_connections: int,
    keepalive_time: float,
    keepalive_timeout: float,
    idle_timeout: float,
    stream_idle_timeout: float,
    max_empty_frames: int,
    max_priority_frames: int,
    max_window_updates: int,
    min_ping_interval: float,
    max_settings: int,
    max_resets: int,
    flood_cooldown: float,
    max_queued_control_frames: int,
    max_frames_per_turn: int,
    max_messages_per_turn: int,
    max_connection_buffer: int,
    max_process_buffer: int,
) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT, then drain and exit 0.

    Every option can also be set by its environment variable; an option given on
    the command line wins.
    """
    worker = Worker.from_env(server.NAME)
    fields = worker.log_fields() if worker is not None else None
    logs.configure(log_level, "json" if log_format.lower() == "json" else "text", fields)
    # Metric values live in memory, whatever PROMETHEUS_MULTIPROC_DIR says, except in
    # a worker whose supervisor collects them from the directory it gave it.
    shared = worker is not None and metrics_port is not None
    metrics.use_values(os.environ.get(metrics.MULTIPROC_ENV) if shared else None)
    config = server.ServeConfig(
        host,
        port,
        grace,
        metrics_host,
        metrics_port,
        limits=limits.Limits(
            max_message_size=max_message_size,
            max_concurrent_streams=max_concurrent_streams,
            max_connections=max_connections or None,
            keepalive_time=keepalive_time or None,
            keepalive_timeout=keepalive_timeout,
            idle_timeout=idle_timeout or None,
            stream_idle_timeout=stream_idle_timeout or None,
            max_empty_frames=max_empty_frames or None,
            max_priority_frames=max_priority_frames or None,
            max_window_updates=max_window_updates or None,
            min_ping_interval=min_ping_interval or None,
            max_settings=max_settings or None,
            max_resets=max_resets or None,
            flood_cooldown=flood_cooldown or None,
            max_queued_control_frames=max_queued_control_frames or None,
            max_frames_per_turn=max_frames_per_turn or None,
            max_messages_per_turn=max_messages_per_turn or None,
            max_connection_buffer=max_connection_buffer or None,
            max_process_buffer=max_process_buffer or None,
        ),
    )
    config.tls = _server_tls(tls_cert, tls_key, tls_client_ca)
    why = ""
    if not workers:  # auto
        workers, why = supervisor.auto_workers()
        why = f"auto: {why}"
        if workers == 1 and worker is None:
            logs.log.info("one process (--workers %s)", why)
    config.workers = workers
    config.worker = worker
    if worker is not None:  # the supervisor serves the metrics of all workers
        config.metrics_port = None
        worker.ignore_interrupts()
    try:
        if workers > 1 and worker is None:
            if config.tls is not None:
                config.tls.server_context()  # a bad file: one line here, not one per worker
            args = click.get_current_context().meta[_RAW_ARGS]
            command = [sys.executable, "-m", "number_service", "serve", *args]
            sys.exit(asyncio.run(supervisor.Supervisor(config, command, why).run()))
        asyncio.run(server.serve(config))
    except tls.TLSFileError as err:
        _fail(str(err), 2)
    except OSError as err:
        _fail(str(err), 1)


def _server_tls(cert: str | None, key: str | None, client_ca: str | None) -> tls.TLSConfig | None:
    """The TLS files of ``serve``, or None for plaintext; a usage error if incomplete."""
    if cert is None and key is None:
        if client_ca is not None:
            raise click.UsageError(
                "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first",
                click.get_current_context(),
            )
        return None
    if cert is None or key is None:
        raise click.UsageError(
            "--tls-cert and --tls-key go together: give both", click.get_current_context()
        )
    return tls.TLSConfig(cert, key, client_ca)


def _client_tls_options(env_prefix: str | None = None) -> Callable[[_F], _F]:
    """The client side's TLS flags, shared by ``accumulate`` and ``health``; with
    ``env_prefix``, each also reads ``<env_prefix>TLS``, ``<env_prefix>TLS_CA`` ..."""

    def env(name: str) -> dict[str, Any]:
        return {} if env_prefix is None else {"envvar": env_prefix + name, "show_envvar": True}

    options = [
        click.option(
            "--tls",
            "use_tls",
            is_flag=True,
            help="Connect with TLS, trusting the system's CAs.",
            **env("TLS"),
        ),
        click.option(
            "--tls-ca",
            type=click.Path(dir_okay=False),
            help="Connect with TLS, trusting only this PEM CA (implies --tls).",
            **env("TLS_CA"),
        ),
        click.option(
            "--tls-cert",
            type=click.Path(dir_okay=False),
            help="Client certificate for mutual TLS (implies --tls); needs --tls-key.",
            **env("TLS_CERT"),
        ),
        click.option(
            "--tls-key",
            type=click.Path(dir_okay=False),
            help="PEM private key of --tls-cert.",
            **env("TLS_KEY"),
        ),
    ]

    def add(command: _F) -> _F:
        for option in reversed(options):
            command = option(command)
        return command

    return add


class _NumbersCommand(click.Command):
    """``accumulate``: negative numbers are arguments, not options (click's
    ``ignore_unknown_options`` lets them through), and anything else that looks like
    an option and is not one is a usage error naming it, not a bad number."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        known = [name for param in self.get_params(ctx) for name in param.opts]
        for arg in ctx.params.get("numbers", ()):
            if arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
                name = arg.partition("=")[0]
                raise click.NoSuchOption(
                    name, possibilities=difflib.get_close_matches(name, known), ctx=ctx
                )
        return rest


def _client_target_options(command: _F) -> _F:
    """``--target`` (repeatable, or NUMBER_SERVICE_TARGET), and ``--host``/``--port``
    for one server, as before; see :func:`_targets`."""
    options = [
        click.option(
            "--target",
            "targets",
            multiple=True,
            metavar="HOST:PORT[,HOST:PORT...]",
            envvar=ENV_PREFIX + "TARGET",
            show_envvar=True,
            help="Servers to call, round robin over those that are up; repeatable. A "
            "host name may resolve to several addresses. [default: --host:--port]",
        ),
        click.option(
            "--host",
            default=None,
            help=f"Server address, with --port (instead of --target).  [default: {DEFAULT_HOST}]",
        ),
        click.option(
            "--port",
            type=click.IntRange(1, 65535),
            default=None,
            help=f"Server port, with --host.  [default: {DEFAULT_PORT}]",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _targets(targets: tuple[str, ...], host: str | None, port: int | None) -> list[str]:
    """The targets to call: ``--target`` values (split at commas and spaces), or
    ``--host``:``--port``. Both on the command line is a usage error; --host/--port
    given there win over NUMBER_SERVICE_TARGET."""
    ctx = click.get_current_context()
    from_env = ctx.get_parameter_source("targets") is click.core.ParameterSource.ENVIRONMENT
    if targets and (host is not None or port is not None):
        if not from_env:
            raise click.UsageError("give --target, or --host and --port, not both", ctx)
        targets = ()
    if not targets:
        return [str(Target(host or DEFAULT_HOST, port or DEFAULT_PORT))]
    parts = [part for value in targets for part in re.split(r"[,\s]+", value) if part]
    try:
        parse_targets(parts, None, DEFAULT_PORT)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param_hint="'--target'") from None
    return parts


@main.command(cls=_NumbersCommand, context_settings={"ignore_unknown_options": True})
@_client_target_options
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Deadline, seconds.")
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Carry the stream on a new one when it is cut (a server draining, restarted "
    "or killed): every sum is still printed once.",
)
@_client_tls_options()
@click.argument("numbers", nargs=-1)
def accumulate(
    targets: tuple[str, ...],
    host: str | None,
    port: int | None,
    timeout: float | None,
    resume: bool,
    use_tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    numbers: tuple[str, ...],
) -> None:
    """Send NUMBERS (or, with - or none, one integer per line of stdin); print each sum.

    Each sum is printed as soon as it arrives: `seq 1 10 | number-service accumulate -`.
    With TLS, each host must be a name or address the server's certificate is issued for.
    """
    where = _targets(targets, host, port)
    context = _client_tls(use_tls, tls_ca, tls_cert, tls_key)
    # A dropped connection (e.g. a TLS server refusing plaintext) makes asyncio warn
    # "socket.send() raised exception." for grpclib's later writes; the one-line
    # status below says what happened.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    try:
        source = _from_lines(sys.stdin) if numbers in ((), ("-",)) else _from_args(numbers)
        asyncio.run(_accumulate(where, timeout, source, context, resume))
    except InputError as err:
        _fail(str(err), 2)
    except GRPCError as err:
        _fail(f"{err.status.name}: {err.message}", 1)
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:  # the reader went away (`| head -1`): stop, like `yes` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE
    except OSError as err:  # stdout cannot be written (a full disk, say)
        _fail(f"cannot write the sums: {err}", 1)


def _client_tls(
    on: bool, ca: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext | None:
    """The client's TLS context, or None for plaintext; exits 2 on unusable files."""
    if (cert is None) != (key is None):
        raise click.UsageError(
            "--tls-cert and --tls-key go together: give both", click.get_current_context()
        )
    if not (on or ca or cert):
        return None
    try:
        return tls.client_context(ca, cert, key)
    except tls.TLSFileError as err:
        _fail(str(err), 2)


async def _accumulate(
    targets: list[str],
    timeout: float | None,
    source: Iterable[int] | AsyncIterator[int],
    context: ssl.SSLContext | None = None,
    resume: bool = True,
) -> None:
    out = sys.stdout
    if out is None:
        raise OSError("stdout is closed")
    bad: list[InputError] = []
    if isinstance(source, AsyncIterator):  # stdin: a bad line may come at any time
        source = _until_bad(source, bad)
    async with NumberClient(targets, timeout=timeout, ssl=context, resume=resume) as client:
        sums = client.accumulate(source)
        async with contextlib.aclosing(sums):
            async for total in sums:
                out.write(f"{total}\n")
                out.flush()
    if bad:
        raise bad[0]


async def _until_bad(numbers: AsyncIterator[int], bad: list[InputError]) -> AsyncIterator[int]:
    """``numbers`` up to the first bad one, whose error goes into ``bad``.

    The stream is then half-closed rather than cancelled, so the sums of the
    numbers already sent still come and are printed before the error, as the
    server ends a stream: every valid sum, then the error.
    """
    try:
        async for num in numbers:
            yield num
    except InputError as err:
        bad.append(err)


@main.command(context_settings={"show_default": True})
@click.option("--host", default=DEFAULT_HOST, help="Server address.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_PORT,
    envvar=ENV_PREFIX + "PORT",
    show_envvar=True,
    help="Server port; reads the same variable as serve, so a container checks its own port.",
)
@click.option("--service", default="", help='Service to ask about; "" is the whole server.')
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=healthcheck.DEFAULT_TIMEOUT,
    help="Seconds to wait for the answer.",
)
@_client_tls_options(HEALTH_ENV_PREFIX)
@click.option(
    "--tls-server-name",
    envvar=HEALTH_ENV_PREFIX + "TLS_SERVER_NAME",
    show_envvar=True,
    help="Name the server's certificate must be issued for, when --host is not one "
    "(a container checking itself on 127.0.0.1) [default: --host].",
)
def health(
    host: str,
    port: int,
    service: str,
    timeout: float,
    use_tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_server_name: str | None,
) -> None:
    """Ask the server's gRPC health service; exit 0 if SERVING, else 1 with the reason.

    For container health checks: `HEALTHCHECK CMD number-service health`. Its TLS
    options read NUMBER_SERVICE_HEALTH_TLS_*: serve's NUMBER_SERVICE_TLS_CERT and
    _KEY are the server's own certificate, not the client's.
    """
    context = _client_tls(use_tls, tls_ca, tls_cert, tls_key)
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # as in accumulate
    try:
        check = healthcheck.check(
            host, port, service, timeout, ssl=context, server_name=tls_server_name
        )
        asyncio.run(check)
    except healthcheck.UnhealthyError as err:
        _fail(str(err), 1)
    click.echo("SERVING")


def run() -> None:
    """The console script: like ``main``, with usage errors on one line."""
    try:
        main.main(prog_name="number-service", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as err:
        hint = f" (see: {err.ctx.command_path} --help)" if err.ctx else ""
        _fail(f"{err.format_message()}{hint}", 2)
    except click.ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except click.Abort:
        _fail("interrupted", 130)
