"""The ``number-service`` command: ``serve`` runs the server, ``accumulate`` is a client.

Exit codes: 0 success, 1 the call or the server failed, 2 bad input or usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import IO, Any, NoReturn, TypeVar

import click
from grpclib.exceptions import GRPCError

from . import limits, logs, server
from .accumulator import check_int32
from .client import NumberClient

LOG_LEVELS = ("debug", "info", "warning", "error")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class InputError(ValueError):
    """A number given to ``accumulate`` that cannot be sent; names where it came from."""


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"number-service: {message}", err=True)
    sys.exit(code)


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
_F = TypeVar("_F", bound=Callable[..., Any])


def _serve_option(flag: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A click option that also reads NUMBER_SERVICE_<NAME> from the environment."""
    name = flag.removeprefix("--").replace("-", "_").upper()
    return click.option(flag, envvar=ENV_PREFIX + name, show_envvar=True, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="number-service", prog_name="number-service")
def main() -> None:
    """NumberService: a gRPC bidirectional stream that answers each number with the sum so far."""


@main.command(context_settings={"show_default": True})
@_serve_option(
    "--host",
    default=server.DEFAULT_HOST,
    help="Address to listen on; 0.0.0.0 or :: for all interfaces.",
)
@_serve_option(
    "--port",
    type=click.IntRange(0, 65535),
    default=server.DEFAULT_PORT,
    help="TCP port; 0 picks a free one (the ready line says which).",
)
@_serve_option(
    "--grace",
    type=click.FloatRange(min=0),
    default=server.DEFAULT_GRACE,
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
    default=server.DEFAULT_HOST,
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
    "--max-message-size",
    type=click.IntRange(min=0),
    default=limits.DEFAULT_MAX_MESSAGE_SIZE,
    help="Largest request message, bytes; a larger one ends its stream with RESOURCE_EXHAUSTED.",
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
    default=limits.DEFAULT_IDLE_TIMEOUT,
    help="Seconds a connection may have no stream before it is closed with a GOAWAY. 0: never.",
)
@_serve_option(
    "--stream-idle-timeout",
    type=click.FloatRange(min=0),
    default=0,
    help="Seconds a stream may go without a request before it ends with "
    "DEADLINE_EXCEEDED. 0: never.",
)
def serve(
    host: str,
    port: int,
    grace: float,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str,
    max_message_size: int,
    max_concurrent_streams: int,
    max_connections: int,
    keepalive_time: float,
    keepalive_timeout: float,
    idle_timeout: float,
    stream_idle_timeout: float,
) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT, then drain and exit 0.

    Every option can also be set by its environment variable; an option given on
    the command line wins.
    """
    logs.configure(log_level, "json" if log_format.lower() == "json" else "text")
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
        ),
    )
    try:
        asyncio.run(server.serve(config))
    except OSError as err:
        _fail(str(err), 1)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--host", default=server.DEFAULT_HOST, show_default=True, help="Server address.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=server.DEFAULT_PORT, show_default=True
)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Deadline, seconds.")
@click.argument("numbers", nargs=-1)
def accumulate(host: str, port: int, timeout: float | None, numbers: tuple[str, ...]) -> None:
    """Send NUMBERS (or, with - or none, one integer per line of stdin); print each sum.

    Each sum is printed as soon as it arrives: `seq 1 10 | number-service accumulate -`.
    """
    try:
        source = _from_lines(sys.stdin) if numbers in ((), ("-",)) else _from_args(numbers)
        asyncio.run(_accumulate(host, port, timeout, source))
    except InputError as err:
        _fail(str(err), 2)
    except GRPCError as err:
        _fail(f"{err.status.name}: {err.message}", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:  # the reader went away (`| head -1`): stop, like `yes` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE
    except OSError as err:  # stdout cannot be written (a full disk, say)
        _fail(f"cannot write the sums: {err}", 1)


async def _accumulate(
    host: str, port: int, timeout: float | None, source: Iterable[int] | AsyncIterator[int]
) -> None:
    out = sys.stdout
    if out is None:
        raise OSError("stdout is closed")
    async with NumberClient(host, port, timeout=timeout) as client:
        sums = client.accumulate(source)
        async with contextlib.aclosing(sums):
            async for total in sums:
                out.write(f"{total}\n")
                out.flush()


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
