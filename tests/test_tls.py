"""TLS and mutual TLS, over loopback: our client, the CLI and grpcio against real servers.

The CAs and certificates are made at test time with trustme and written as PEM files;
the server certificate is issued for 127.0.0.1 and localhost, so clients verify the
server's identity as they would in production. Every test that expects a refusal
also checks that the server still serves a valid client afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpcio_peer import Grpcio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from polling import eventually
from processes import HOST, assert_one_error_line, reap, run, start_server
from rawh2 import H2Client, RawSocket
from scraping import scrape

from number_service import NumberClient, Retry, build_server
from number_service.serving.limits import Limits
from number_service.serving.run import address_of, bind
from number_service.serving.tls import TLSConfig, TLSFileError, client_context, server_context
from number_service_gen.tutorial import NumberRequest, NumberResponse

CALL_TIMEOUT = 10.0  # seconds for every call, so that no test can hang
WORKER_HEADER = "number-service-worker"  # initial metadata: the worker that served
METRICS_LINE = re.compile(r"metrics of all workers on http://127\.0\.0\.1:(\d+)/metrics")
NUMS = [1, 2, 3, -10]
SUMS = [1, 3, 6, -4]


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate from it, client certificates from it
    and from an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path  # issued by other_ca: a stranger to the server
    other_client_key: Path
    elsewhere_cert: Path  # from ca, but for another host name than 127.0.0.1
    elsewhere_key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()

    def write(name: str, blob: trustme.Blob) -> Path:
        blob.write_to_path(out / name)
        return out / name

    def chain(name: str, cert: trustme.LeafCert) -> Path:
        (out / name).write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        return out / name

    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.test")
    stranger = other_ca.issue_cert("client@example.test")
    elsewhere = ca.issue_cert("elsewhere.example.test")
    return Certs(
        ca=write("ca.pem", ca.cert_pem),
        server_cert=chain("server.pem", server),
        server_key=write("server.key", server.private_key_pem),
        client_cert=chain("client.pem", client),
        client_key=write("client.key", client.private_key_pem),
        other_ca=write("other-ca.pem", other_ca.cert_pem),
        other_client_cert=chain("stranger.pem", stranger),
        other_client_key=write("stranger.key", stranger.private_key_pem),
        elsewhere_cert=chain("elsewhere.pem", elsewhere),
        elsewhere_key=write("elsewhere.key", elsewhere.private_key_pem),
    )


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler (where asyncio would report
    e.g. 'SSL handshake failed'); the test asserts it stays empty."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


@asynccontextmanager
async def serving(context: ssl.SSLContext, limits: Limits | None = None) -> AsyncIterator[int]:
    """A real NumberService server with ``context`` on 127.0.0.1:<ephemeral>; yields the port."""
    sock = bind(HOST, 0)
    built = build_server(limits)
    await built.start(sock, context)
    try:
        yield address_of(sock)[1]
    finally:
        await built.shutdown(grace=0)


async def sums(port: int, context: ssl.SSLContext | None, host: str = HOST) -> list[int]:
    async with NumberClient(host, port, ssl=context, timeout=CALL_TIMEOUT) as client:
        return [total async for total in client.accumulate(NUMS)]


async def refused(port: int, context: ssl.SSLContext | None) -> GRPCError:
    with pytest.raises(GRPCError) as caught:
        await sums(port, context)
    assert caught.value.status is Status.UNAVAILABLE, caught.value
    return caught.value


def assert_quiet(caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]) -> None:
    """No traceback, warning or loop error from refused handshakes; at most one line."""
    assert loop_errors == []
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []
    handshake = [r for r in caplog.records if "handshake" in r.getMessage().lower()]
    assert len(handshake) <= 1, handshake


# --- TLS ---------------------------------------------------------------------------


async def test_tls_round_trip_speaks_tls_with_alpn_h2(certs: Certs) -> None:
    async with serving(server_context(certs.server_cert, certs.server_key)) as port:
        assert await sums(port, client_context(ca=certs.ca)) == SUMS
        assert await sums(port, client_context(ca=certs.ca), host="localhost") == SUMS
        # The socket itself: a TLS 1.2+ handshake that selects h2.
        _, writer = await asyncio.open_connection(HOST, port, ssl=client_context(ca=certs.ca))
        try:
            tls = writer.get_extra_info("ssl_object")
            assert tls.selected_alpn_protocol() == "h2"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            writer.close()


async def test_plaintext_client_is_refused_and_server_keeps_serving(
    certs: Certs, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    async with serving(server_context(certs.server_cert, certs.server_key)) as port:
        for _ in range(3):
            err = await refused(port, None)
            assert "connect with TLS" in str(err.message)
        assert await sums(port, client_context(ca=certs.ca)) == SUMS
    assert_quiet(caplog, loop_errors)


async def test_client_verifies_the_server_ca_and_name(certs: Certs) -> None:
    """A server from an untrusted CA, or with a certificate for another name, is refused."""
    async with serving(server_context(certs.server_cert, certs.server_key)) as port:
        err = await refused(port, client_context(ca=certs.other_ca))
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.message)
    async with serving(server_context(certs.elsewhere_cert, certs.elsewhere_key)) as port:
        err = await refused(port, client_context(ca=certs.ca))
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.message)
        assert "127.0.0.1" in str(err.message)  # "IP address mismatch ... '127.0.0.1'"


async def test_retry_gives_up_at_once_on_a_certificate_it_cannot_verify(certs: Certs) -> None:
    """A wrong CA never becomes right: Retry does not back off and try again (the
    first wait alone would be 4 s or more); the status says what was wrong."""
    retry = Retry(attempts=3, initial_backoff=5.0)
    async with serving(server_context(certs.server_cert, certs.server_key)) as port:
        wrong_ca = client_context(ca=certs.other_ca)
        client = NumberClient(HOST, port, ssl=wrong_ca, retry=retry, timeout=30)
        started = time.monotonic()
        with pytest.raises(GRPCError) as caught:
            async with client:
                await asyncio.wait_for(client.accumulate(NUMS).__anext__(), 30)
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"{elapsed:.1f} s: it backed off and retried"
        assert caught.value.status is Status.UNAVAILABLE
        assert "TLS handshake" in str(caught.value.message)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value.message)
        assert await sums(port, client_context(ca=certs.ca)) == SUMS


async def test_a_tls_handshake_never_started_is_cut_after_the_handshake_timeout(
    certs: Certs,
) -> None:
    """TLS handshake timeout 0.5 s, cap 2: ten TCP connections that never send a
    ClientHello (not yet counted by the cap) are all closed by the server; a TLS
    client is served meanwhile and after."""
    assert Limits().tls_handshake_timeout == 10.0
    limits = Limits(tls_handshake_timeout=0.5, max_connections=2)
    async with serving(server_context(certs.server_cert, certs.server_key), limits) as port:
        silent = [await RawSocket.connect(port) for _ in range(10)]
        try:
            assert await sums(port, client_context(ca=certs.ca)) == SUMS
            for peer in silent:
                received = await peer.read(timeout=CALL_TIMEOUT)
                assert received.closed, "a connection stuck before its TLS handshake stayed"
                assert received.data == b""
        finally:
            for peer in silent:
                await peer.close()
        assert await sums(port, client_context(ca=certs.ca)) == SUMS


async def test_serve_takes_the_tls_handshake_timeout_from_its_flag_and_environment(
    certs: Certs,
) -> None:
    """`serve --tls-handshake-timeout 0.5` (and NUMBER_SERVICE_TLS_HANDSHAKE_TIMEOUT):
    a TCP connection that never starts its handshake is closed well before the
    default 10 s; a TLS client is served."""
    tls = ("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    for args, env in (
        (("--tls-handshake-timeout", "0.5"), None),
        ((), {"NUMBER_SERVICE_TLS_HANDSHAKE_TIMEOUT": "0.5"}),
    ):
        srv = start_server(0, *tls, *args, env=env)
        try:
            async with await RawSocket.connect(srv.port) as silent:
                started = time.monotonic()
                received = await silent.read(timeout=5.0)
                assert received.closed, f"{args or env}: not closed after 5 s"
                assert time.monotonic() - started < 5.0
            assert await sums(srv.port, client_context(ca=certs.ca)) == SUMS
        finally:
            assert srv.stop() == 0


async def test_shutdown_closes_tls_connections_left_open(certs: Certs) -> None:
    """A TLS client that holds its connection is closed by the shutdown; one stuck
    before its handshake lasts the handshake timeout at most (on Python 3.13+ it is
    aborted at once). From Python 3.12.1 the first one held shutdown forever."""
    limits = Limits(tls_handshake_timeout=2.0)
    sock = bind(HOST, 0)
    built = build_server(limits)
    connections = built.connections
    assert connections is not None
    await built.start(sock, server_context(certs.server_cert, certs.server_key))
    port = address_of(sock)[1]
    stuck = await RawSocket.connect(port)
    reader, writer = await asyncio.open_connection(HOST, port, ssl=client_context(ca=certs.ca))
    try:
        await eventually(lambda: connections.open == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(built.shutdown(grace=0), CALL_TIMEOUT)
        assert loop.time() - started < limits.tls_handshake_timeout + 2
        # The server's SETTINGS, then the end of the connection.
        assert await asyncio.wait_for(reader.read(), CALL_TIMEOUT)
        assert reader.at_eof()
        assert (await stuck.read(timeout=CALL_TIMEOUT)).closed
    finally:
        writer.close()
        await stuck.close()


# --- mutual TLS --------------------------------------------------------------------


async def test_mtls_refuses_clients_without_an_accepted_certificate(
    certs: Certs, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    valid = client_context(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    no_cert = client_context(ca=certs.ca)
    stranger = client_context(ca=certs.ca, cert=certs.other_client_cert, key=certs.other_client_key)
    context = server_context(certs.server_cert, certs.server_key, client_ca=certs.ca)
    async with serving(context) as port:
        assert await sums(port, valid) == SUMS
        for _ in range(2):
            assert "mTLS" in str((await refused(port, no_cert)).message)
            await refused(port, stranger)
            await refused(port, None)
            assert await sums(port, valid) == SUMS
    assert_quiet(caplog, loop_errors)


def test_server_context_requires_client_certificates_only_for_mtls(certs: Certs) -> None:
    tls = TLSConfig(str(certs.server_cert), str(certs.server_key))
    mtls = TLSConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    assert (tls.mode, tls.server_context().verify_mode) == ("tls", ssl.CERT_NONE)
    assert (mtls.mode, mtls.server_context().verify_mode) == ("mtls", ssl.CERT_REQUIRED)
    assert mtls.server_context().minimum_version is ssl.TLSVersion.TLSv1_2


def test_unusable_files_name_the_file(certs: Certs, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases: list[tuple[Callable[[], ssl.SSLContext], str]] = [
        (lambda: server_context(tmp_path / "missing.pem", certs.server_key), "missing.pem"),
        (lambda: server_context(junk, certs.server_key), "junk.pem"),
        (lambda: server_context(certs.server_cert, certs.client_key), "client.key"),
        (lambda: server_context(certs.server_cert, certs.server_key, junk), "junk.pem"),
        (lambda: client_context(ca=junk), "junk.pem"),
        (lambda: client_context(ca=certs.ca, cert=certs.client_cert), "key"),
    ]
    for build, needle in cases:
        with pytest.raises(TLSFileError, match=needle.replace(".", r"\.")):
            build()


# --- grpcio ------------------------------------------------------------------------


def _grpcio_sums(
    gen: Grpcio, port: int, certs: Certs, with_cert: bool
) -> tuple[list[int], grpc.StatusCode]:
    """A grpcio client over TLS (with the client certificate if ``with_cert``)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes() if with_cert else None,
        certificate_chain=certs.client_cert.read_bytes() if with_cert else None,
    )
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.secure_channel(f"{HOST}:{port}", credentials, options=options) as channel:
        stub = gen.pb2_grpc.NumberServiceStub(channel)
        requests = (gen.pb2.NumberRequest(num=n) for n in NUMS)
        call = stub.AccumulateNumbers(requests, timeout=CALL_TIMEOUT)
        try:
            return [response.sum for response in call], call.code()
        except grpc.RpcError as err:
            return [], err.code()


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
async def test_grpcio_client_over_tls(grpcio_gen: Grpcio, certs: Certs, mtls: bool) -> None:
    """grpcio's own TLS stack (BoringSSL, ALPN h2 required) talks to our server."""
    client_ca = certs.ca if mtls else None
    async with serving(server_context(certs.server_cert, certs.server_key, client_ca)) as port:
        got = await asyncio.to_thread(_grpcio_sums, grpcio_gen, port, certs, True)
        assert got == (SUMS, grpc.StatusCode.OK)
        if mtls:  # and without its certificate, it is turned away
            got = await asyncio.to_thread(_grpcio_sums, grpcio_gen, port, certs, False)
            assert got == ([], grpc.StatusCode.UNAVAILABLE)
            got = await asyncio.to_thread(_grpcio_sums, grpcio_gen, port, certs, True)
            assert got == (SUMS, grpc.StatusCode.OK)


# --- the command line --------------------------------------------------------------


def _accumulate(port: int, *tls_args: Path | str) -> tuple[int, str, str]:
    result = run(
        "accumulate", "--host", HOST, "--port", str(port), "--timeout", str(CALL_TIMEOUT),
        *map(str, tls_args), *map(str, NUMS),
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_cli_serves_and_calls_over_tls(certs: Certs, mtls: bool) -> None:
    """serve --tls-* (files from the environment for TLS, from flags for mTLS) and
    accumulate --tls-*; refused calls are one line and leave the server log clean."""
    expected = "".join(f"{s}\n" for s in SUMS)
    client: tuple[str | Path, ...]
    if mtls:
        srv = start_server(
            0, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
            "--tls-client-ca", str(certs.ca),
        )  # fmt: skip
        client = ("--tls-ca", certs.ca, "--tls-cert", certs.client_cert,
                  "--tls-key", certs.client_key)  # fmt: skip
    else:
        env = {
            "NUMBER_SERVICE_TLS_CERT": str(certs.server_cert),
            "NUMBER_SERVICE_TLS_KEY": str(certs.server_key),
        }
        srv = start_server(0, env=env)
        client = ("--tls-ca", certs.ca)
    try:
        ready = srv.stderr.text()
        assert f"listening on {HOST}:{srv.port} ({'mtls' if mtls else 'tls'})" in ready
        assert _accumulate(srv.port, *client) == (0, expected, "")
        code, out, err = _accumulate(srv.port)  # plaintext
        assert (code, out) == (1, "")
        assert_one_error_line(err, "UNAVAILABLE", "connect with TLS")
        code, out, err = _accumulate(srv.port, "--tls-ca", certs.other_ca)
        assert (code, out) == (1, "")
        assert_one_error_line(err, "UNAVAILABLE", "CERTIFICATE_VERIFY_FAILED")
        if mtls:
            code, out, err = _accumulate(srv.port, "--tls-ca", certs.ca)
            assert (code, out) == (1, "")
            assert_one_error_line(err, "UNAVAILABLE", "mTLS")
        assert _accumulate(srv.port, *client) == (0, expected, "")
        # The health command takes the same TLS flags, for probes of a TLS server.
        health = run("health", "--host", HOST, "--port", str(srv.port), *map(str, client))
        assert (health.returncode, health.stdout) == (0, "SERVING\n"), health
        health = run("health", "--host", HOST, "--port", str(srv.port))
        assert health.returncode == 1, health
        assert_one_error_line(health.stderr, "connection lost", "--tls")
    finally:
        code = srv.stop(signal.SIGTERM)
        log = srv.stderr.rest()
        reap(srv.proc)
    assert code == 0, log
    assert "Traceback" not in log, log
    lines = log.splitlines()
    assert all(" INFO " in line for line in lines), log
    assert sum("stream ended" in line for line in lines) == 2, log  # the valid calls only
    # (the health check logs at debug only)


async def _connect_from(
    port: int, source_port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to ``port`` from 127.0.0.1:``source_port``. Closing it resets
    it (SO_LINGER 0), so that the same source port can connect again at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind((HOST, source_port))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=HOST)
    except BaseException:
        sock.close()
        raise


async def _worker_from(port: int, source_port: int, context: ssl.SSLContext) -> int:
    """The worker that serves a stream from ``source_port`` (its initial metadata)."""
    reader, writer = await _connect_from(port, source_port, context)
    async with H2Client(RawSocket(reader, writer)) as client:
        client.conn.initiate_connection()
        reply = await client.call(bytes(NumberRequest(num=5)), timeout=CALL_TIMEOUT)
    assert reply.grpc_status == 0, reply
    assert reply.messages == [bytes(NumberResponse(sum=5))], reply
    return int(dict(reply.headers)[WORKER_HEADER])


def _refused_from(port: int, source_port: int, context: ssl.SSLContext) -> str:
    """Connect from ``source_port`` without a client certificate: how the server ends
    the connection (it fails the test if the server sends anything, e.g. the HTTP/2
    SETTINGS every accepted client gets first). With TLS 1.3 the client's handshake
    is over before the server checks its certificate; asyncio's server side then
    closes without sending its alert, so the client reads end of file."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(CALL_TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind((HOST, source_port))
        sock.connect((HOST, port))
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            try:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                data = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError) as err:
                return str(err)
            if data == b"":
                return "end of file"
    pytest.fail(f"served a client without a certificate: {data!r}")


async def _held_from(stack: AsyncExitStack, port: int, context: ssl.SSLContext) -> int:
    """A TLS connection kept open (until ``stack`` closes) after one call on it: the
    worker that served the call."""
    reader, writer = await _connect_from(port, 0, context)
    client = await stack.enter_async_context(H2Client(RawSocket(reader, writer)))
    client.conn.initiate_connection()
    reply = await client.call(bytes(NumberRequest(num=5)), timeout=CALL_TIMEOUT)
    assert reply.grpc_status == 0, reply
    assert reply.messages == [bytes(NumberResponse(sum=5))], reply
    return int(dict(reply.headers)[WORKER_HEADER])


async def _parent_counts(metrics_port: int, counts: list[int]) -> None:
    """Wait until the supervisor counts ``counts`` open connections per worker."""
    names = [("grpc_server_worker_connections", frozenset({("worker", str(i))})) for i in (0, 1)]
    latest: list[float] = []

    def seen() -> bool:
        metrics = scrape(metrics_port)
        latest[:] = [metrics.get(name, -1) for name in names]
        return latest == counts

    try:
        await eventually(seen, CALL_TIMEOUT)
    except AssertionError:
        pytest.fail(f"the supervisor counts {latest} connections per worker, not {counts}")


async def test_workers_serve_mtls_each(certs: Certs) -> None:
    """--workers passes the TLS flags on: each worker serves a client certificate and
    refuses a connection without one.

    The supervisor hands a connection to the worker holding fewest: with a valid
    client's connection held on each worker, one closed leaves its worker the one
    the next connection goes to. So, for each worker in turn: close the connection
    held on it, connect without a certificate (refused, and counted closed), then
    with one (served by that same worker)."""
    srv = start_server(
        0, "--workers", "2", "--tls-cert", str(certs.server_cert),
        "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca),
        "--metrics-port", "0",
    )  # fmt: skip
    metrics_port = int(
        next(m.group(1) for line in srv.stderr.seen if (m := METRICS_LINE.search(line)))
    )
    valid = client_context(certs.ca, certs.client_cert, certs.client_key)
    no_cert = client_context(certs.ca)
    served: list[int] = []
    refusals: dict[int, str] = {}
    try:
        assert f"listening on {HOST}:{srv.port} (2 workers, mtls)" in srv.stderr.text()
        async with AsyncExitStack() as outer:
            held: dict[int, AsyncExitStack] = {}
            for _ in range(2):  # one on each: exact balance
                stack = await outer.enter_async_context(AsyncExitStack())
                held[await _held_from(stack, srv.port, valid)] = stack
            assert sorted(held) == [0, 1]
            served += [0, 1]
            await _parent_counts(metrics_port, [1, 1])
            for worker in (0, 1):
                others_only = [int(index != worker) for index in (0, 1)]
                await held[worker].aclose()
                await _parent_counts(metrics_port, others_only)
                refusals[worker] = await asyncio.to_thread(_refused_from, srv.port, 0, no_cert)
                await _parent_counts(metrics_port, others_only)  # closed, counted
                held[worker] = await outer.enter_async_context(AsyncExitStack())
                assert await _held_from(held[worker], srv.port, valid) == worker
                served.append(worker)
                await _parent_counts(metrics_port, [1, 1])
    finally:
        code = srv.stop(signal.SIGTERM)
        log = srv.stderr.rest()
        reap(srv.proc)
    assert sorted(refusals) == [0, 1], (refusals, log)
    assert code == 0, log
    assert "Traceback" not in log, log
    logged = [int(w) for w in re.findall(r"stream ended .* worker=(\d+)", log)]
    assert sorted(logged) == sorted(served), log  # the valid calls, each where it was seen


def test_health_reads_its_own_tls_settings_beside_serves(certs: Certs) -> None:
    """In a container, serve's NUMBER_SERVICE_TLS_CERT/KEY are the server's; the
    HEALTHCHECK finds its CA and client certificate in NUMBER_SERVICE_HEALTH_TLS_*."""
    env = {
        "NUMBER_SERVICE_TLS_CERT": str(certs.server_cert),
        "NUMBER_SERVICE_TLS_KEY": str(certs.server_key),
        "NUMBER_SERVICE_TLS_CLIENT_CA": str(certs.ca),
    }
    srv = start_server(0, env=env)
    try:
        env["NUMBER_SERVICE_PORT"] = str(srv.port)
        result = run("health", env=env)  # serve's variables alone: no TLS client
        assert result.returncode == 1
        assert_one_error_line(result.stderr, "connection lost", "--tls")
        env["NUMBER_SERVICE_HEALTH_TLS_CA"] = str(certs.ca)
        result = run("health", env=env)  # no client certificate
        assert result.returncode == 1
        assert_one_error_line(result.stderr, "connection lost", "mTLS")
        env["NUMBER_SERVICE_HEALTH_TLS_CERT"] = str(certs.client_cert)
        env["NUMBER_SERVICE_HEALTH_TLS_KEY"] = str(certs.client_key)
        result = run("health", env=env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")
    finally:
        assert srv.stop(signal.SIGTERM) == 0
        reap(srv.proc)


def test_health_checks_a_certificate_for_another_name_on_127_0_0_1(certs: Certs) -> None:
    """A container checks itself on 127.0.0.1, but its certificate names the service:
    --tls-server-name (NUMBER_SERVICE_HEALTH_TLS_SERVER_NAME) says which name to verify."""
    srv = start_server(
        0, "--tls-cert", str(certs.elsewhere_cert), "--tls-key", str(certs.elsewhere_key)
    )
    try:
        env = {"NUMBER_SERVICE_PORT": str(srv.port), "NUMBER_SERVICE_HEALTH_TLS_CA": str(certs.ca)}
        result = run("health", env=env)
        assert result.returncode == 1
        assert_one_error_line(result.stderr, "cannot verify", "127.0.0.1", "--tls-server-name")
        env["NUMBER_SERVICE_HEALTH_TLS_SERVER_NAME"] = "elsewhere.example.test"
        result = run("health", env=env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")
    finally:
        assert srv.stop(signal.SIGTERM) == 0
        reap(srv.proc)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["serve", "--tls-cert", "{server_cert}"], ["--tls-cert", "--tls-key"]),
        (["serve", "--tls-key", "{server_key}"], ["--tls-cert", "--tls-key"]),
        (["serve", "--tls-client-ca", "{ca}"], ["--tls-client-ca", "--tls-cert"]),
        (
            ["serve", "--tls-cert", "{tmp}/missing.pem", "--tls-key", "{server_key}"],
            ["certificate", "missing.pem", "No such file"],
        ),
        (
            ["serve", "--tls-cert", "{server_cert}", "--tls-key", "{client_key}"],
            ["key", "client.key"],
        ),
        (
            ["serve", "--tls-cert", "{server_cert}", "--tls-key", "{server_key}",
             "--tls-client-ca", "{server_key}"],
            ["client CA", "server.key"],
        ),
        (
            ["serve", "--workers", "2", "--tls-cert", "{tmp}/missing.pem", "--tls-key",
             "{server_key}"],
            ["certificate", "missing.pem", "No such file"],
        ),
        (["accumulate", "--tls-cert", "{client_cert}", "1"], ["--tls-cert", "--tls-key"]),
        (["accumulate", "--tls-ca", "{server_key}", "1"], ["CA", "server.key"]),
    ],
    ids=["cert-only", "key-only", "ca-only", "missing", "wrong-key", "bad-ca", "workers-missing",
         "client-cert-only",
         "client-bad-ca"],
)  # fmt: skip
def test_cli_bad_tls_settings_are_one_line_exit_2(
    certs: Certs, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    """Usage errors and unusable files: one line naming the flag or file, exit 2,
    before anything listens."""
    paths = {name: str(getattr(certs, name)) for name in Certs.__dataclass_fields__}
    argv = [arg.format(tmp=tmp_path, **paths) for arg in args]
    if argv[0] == "serve":
        argv += ["--host", HOST, "--port", "0"]
    result = run(*argv)
    assert result.returncode == 2, result
    assert_one_error_line(result.stderr, *needles)
    assert "listening" not in result.stderr


# --- the README's recipe -----------------------------------------------------------


def _readme_tls_section() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### TLS and mutual TLS\n", 1)[1]
    return re.split(r"\n##+ ", section, maxsplit=1)[0]  # up to the next heading


def test_readme_recipe_works_as_written(tmp_path: Path) -> None:
    """The README's test-CA script, serve and accumulate commands, and library example."""
    section = _readme_tls_section()
    script = section.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    made = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, timeout=60, check=False
    )
    assert made.returncode == 0, made.stderr

    def argv(line: str) -> list[str]:
        words = line.split("#", 1)[0].split()[2:]  # without "$ number-service"
        return [str(tmp_path / w) if (tmp_path / w).is_file() else w for w in words]

    commands = [argv(line) for line in section.splitlines() if line.startswith("$ number-service")]
    assert [c[0] for c in commands] == ["serve", "accumulate", "serve", "accumulate"]
    example = section.split("```py\n", 1)[1].split("```", 1)[0]
    for serve_args, client_args in (commands[0:2], commands[2:4]):
        srv = start_server(0, *serve_args[1:])
        try:
            result = run(*client_args, "--port", str(srv.port))
            assert (result.returncode, result.stdout) == (0, "1\n3\n6\n"), result.stderr
            code = "import asyncio\nasync def main():\n" + textwrap.indent(
                example.replace("50051", str(srv.port)), "    "
            )
            ran = subprocess.run(
                [sys.executable, "-c", code + "asyncio.run(main())\n"],
                cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert (ran.returncode, ran.stdout) == (0, "[1, 3, 6]\n"), ran.stderr
        finally:
            assert srv.stop(signal.SIGTERM) == 0
            reap(srv.proc)
