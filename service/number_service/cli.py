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
from .serving import logs, metrics, options, supervisor, tls, tracing
from .serving.settings import DEFAULT_HOST, DEFAULT_PORT
from .serving.worker import Worker
from .targets import Target, parse_targets

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
@options.serve_options(ENV_PREFIX, defaults={"max_message_size": server.MAX_MESSAGE_SIZE})
def serve(**values: Any) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT, then drain and exit 0.

    Every option can also be set by its environment variable; an option given on
    the command line wins.
    """
    worker = Worker.from_env(server.NAME)
    fields = worker.log_fields() if worker is not None else None
    json = values["log_format"].lower() == "json"
    logs.configure(values["log_level"], "json" if json else "text", fields)
    # Metric values live in memory, whatever PROMETHEUS_MULTIPROC_DIR says, except in
    # a worker whose supervisor collects them from the directory it gave it.
    shared = worker is not None and values["metrics_port"] is not None
    metrics.use_values(os.environ.get(metrics.MULTIPROC_ENV) if shared else None)
    config = options.serve_config(values, server.ServeConfig())
    workers: int = values["workers"]
    why = ""
    if not workers:  # auto
        workers, why = supervisor.auto_workers()
        why = f"auto: {why}"
        if workers == 1 and worker is None:
            logs.log.info("one process (%s %s)", options.flag("workers"), why)
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
@click.option("--timeout", type=options.Seconds(min=0, min_open=True), help="Deadline, seconds.")
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
    envvar=options.env_var(ENV_PREFIX, "port"),
    show_envvar=True,
    help="Server port; reads the same variable as serve, so a container checks its own port.",
)
@click.option("--service", default="", help='Service to ask about; "" is the whole server.')
@click.option(
    "--timeout",
    type=options.Seconds(min=0, min_open=True),
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
