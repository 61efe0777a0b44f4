"""Observability: the Prometheus endpoint (one process, and ``workers=2``) and OpenTelemetry
spans.

Real clients (smtplib, raw sockets, real TLS with trustme's certificates) run known traffic
against a server on 127.0.0.1 — accepted, refused, timed out, TLS failures, AUTH failures,
PROXY header failures — then the endpoint is scraped over loopback and parsed with
``prometheus_client.parser``. With ``workers=2`` the server is a real process tree, and the
scrape must add up both workers (and drop a killed worker's gauges). Spans are checked with the
OpenTelemetry SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from _cli import start_cli, stop_cli
from alephsmtp import SmtpServer
from alephsmtp.events import AuthEventArgs
from alephsmtp.prometheus import FAMILIES, PrometheusExporter, parse_address
from alephsmtp.tracing import context_of

GIVE_UP = 30.0  # seconds: generous, the machine is shared
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"
REFUSED = b"Subject: refuse\r\n\r\nbody\r\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, accept: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=GIVE_UP) as response:
        return str(response.read().decode("utf-8"))


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(GIVE_UP / 0.02)):  # bounded
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {GIVE_UP} s: {what}")


def received(session: Any, e: Any) -> str | None:
    sizes: list[int] = session.sizes
    sizes.append(e.size)
    return "554 5.7.1 refused by policy" if e.message.startswith(b"Subject: refuse") else None


def check_auth(session: Any, e: AuthEventArgs) -> bool:
    return e.username == "user" and e.check_password("secret")


# --- one process -------------------------------------------------------------------------------


async def test_the_endpoint_counts_known_traffic(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    sizes: list[int] = []
    hooked: list[tuple[str, int, int | None]] = []

    def on_session(session: Any) -> None:
        session.sizes = sizes
        session.message_received += received
        session.auth += check_auth

    server = SmtpServer(
        "127.0.0.1",
        0,
        hostname="mx.test",
        tls_context=server_context,
        data_timeout=1.5,
        max_bad_commands=3,
        metrics="127.0.0.1:0",
        metrics_hook=lambda name, amount, code: hooked.append((name, amount, code)),
        on_session=on_session,
    )
    assert server.config.measure_latency  # the exporter wants the latency histograms
    async with server:
        assert server.exporter is not None
        port = server.port

        def plain() -> None:  # one message, two recipients
            with smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP) as client:
                client.sendmail("a@client.test", ["b@mx.test", "c@mx.test"], MESSAGE)

        def tls_and_auth() -> None:  # STARTTLS; a wrong password, then the right one; two
            with smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP) as client:
                client.starttls(context=client_context)
                client.ehlo()
                client.user, client.password = "user", "wrong"
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.auth("PLAIN", client.auth_plain)
                client.password = "secret"
                client.auth("PLAIN", client.auth_plain)
                client.sendmail("a@client.test", ["b@mx.test"], MESSAGE)
                with pytest.raises(smtplib.SMTPDataError):
                    client.sendmail("a@client.test", ["b@mx.test"], REFUSED)

        def untrusted_certificate() -> None:  # the client refuses the server's certificate
            with (
                smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP) as client,
                pytest.raises(ssl.SSLError),
            ):
                client.starttls(context=ssl.create_default_context())

        def stalls_in_data() -> None:  # a message begun, then nothing: the data timeout
            client = smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP)
            try:
                client.ehlo()
                client.mail("a@client.test")
                client.rcpt("b@mx.test")
                assert client.docmd("DATA")[0] == 354
                client.send(b"Subject: slow\r\n")
                assert client.getreply()[0] == 421
            finally:
                client.close()

        def junk() -> None:  # three bad commands: closed
            client = smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP)
            try:
                codes = [client.docmd("FOO")[0] for _ in range(3)]
                assert codes[:2] == [500, 500]
            finally:
                client.close()

        for client in (plain, tls_and_auth, untrusted_certificate, stalls_in_data, junk):
            await asyncio.to_thread(client)
        await wait_until(lambda: server.metrics.connections == 0, "every session ended")
        text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{server.exporter.port}/metrics")

    s = parse(text)
    assert value(s, "alephsmtp_connections_accepted_total") == 5
    assert value(s, "alephsmtp_connections_closed_total") == 5
    assert value(s, "alephsmtp_connections_active") == 0
    assert value(s, "alephsmtp_messages_accepted_total") == 2
    assert value(s, "alephsmtp_messages_accepted_bytes_total") == sum(sizes[:2]) > 0
    assert value(s, "alephsmtp_messages_refused_total", reply_class="5xx") == 1
    assert value(s, "alephsmtp_message_size_bytes_count") == 2
    assert value(s, "alephsmtp_message_size_bytes_sum") == sum(sizes[:2])
    assert value(s, "alephsmtp_message_size_bytes_bucket", le="1024.0") == 2
    assert value(s, "alephsmtp_message_recipients_count") == 2
    assert value(s, "alephsmtp_message_recipients_sum") == 3
    assert value(s, "alephsmtp_message_recipients_bucket", le="1.0") == 1
    assert value(s, "alephsmtp_commands_total", command="MAIL", reply_class="2xx") == 4
    assert value(s, "alephsmtp_commands_total", command="RCPT", reply_class="2xx") == 5
    assert value(s, "alephsmtp_commands_total", command="STARTTLS", reply_class="2xx") == 2
    assert value(s, "alephsmtp_error_replies_total", code="554") == 1
    assert value(s, "alephsmtp_error_replies_total", code="535") == 1
    tls = {dict(labels)["version"]: n for (name, labels), n in s.items() if "tls_sessions" in name}
    assert sum(tls.values()) == 1
    assert next(iter(tls)).startswith("TLSv1.")
    assert value(s, "alephsmtp_tls_handshake_failures_total") == 1
    assert value(s, "alephsmtp_auth_attempts_total", mechanism="PLAIN", outcome="failure") == 1
    assert value(s, "alephsmtp_auth_attempts_total", mechanism="PLAIN", outcome="success") == 1
    assert value(s, "alephsmtp_timeouts_total", kind="data") == 1
    assert value(s, "alephsmtp_bad_command_closes_total") == 1
    assert value(s, "alephsmtp_messages_discarded_total") == 1  # the stalled one
    # Latency (measure_latency): every message answered, every handler timed.
    assert value(s, "alephsmtp_message_reply_duration_seconds_count") == 3
    assert value(s, "alephsmtp_handler_duration_seconds_count", event="message_received") == 3
    assert value(s, "alephsmtp_handler_duration_seconds_count", event="auth") == 2
    for pool in ("command", "data"):
        assert value(s, "alephsmtp_buffer_pool_buffers", pool=pool, state="in_use") == 0
        free = frozenset({("pool", pool), ("state", "free")})
        assert ("alephsmtp_buffer_pool_buffers", free) in s
    assert value(s, "process_open_fds") > 0  # prometheus_client's process collector
    # The hook still hears of every change, for users who ship metrics elsewhere.
    assert hooked.count(("messages", 1, None)) == 2


async def test_proxy_and_implicit_tls_failures_are_counted(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    behind_proxy = SmtpServer(
        "127.0.0.1",
        0,
        hostname="mx.test",
        proxy_protocol=True,
        proxy_trusted_networks=("127.0.0.2/32",),  # 127.0.0.1 is not trusted
        proxy_header_timeout=0.5,
        implicit_tls=True,
        tls_context=server_context,
        metrics="127.0.0.1:0",
    )
    implicit = SmtpServer(
        "127.0.0.1",
        0,
        hostname="mx.test",
        implicit_tls=True,
        tls_context=server_context,
        tls_handshake_timeout=0.5,
        max_connections=1,
        metrics=("127.0.0.1", 0),
    )
    header = b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 25\r\n"

    def connect(port: int, source: str, send: bytes = b"") -> bytes:
        """Connect from ``source``, send, and read until the server closes."""
        with socket.socket() as sock:
            sock.settimeout(GIVE_UP)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            if send:
                sock.sendall(send)
            try:
                return sock.recv(1024)
            except ConnectionResetError:
                return b""

    def through_proxy_with_tls(port: int) -> bytes:
        with socket.socket() as sock:
            sock.settimeout(GIVE_UP)
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(header)
            with client_context.wrap_socket(sock, server_hostname="localhost") as tls:
                greeting = tls.recv(1024)
                tls.sendall(b"QUIT\r\n")
                tls.recv(1024)
                return greeting

    async with behind_proxy, implicit:
        port = behind_proxy.port
        assert await asyncio.to_thread(connect, port, "127.0.0.1") == b""  # untrusted
        assert await asyncio.to_thread(connect, port, "127.0.0.2", b"PROXY JUNK\r\n") == b""
        assert await asyncio.to_thread(connect, port, "127.0.0.2") == b""  # silent: timeout
        assert await asyncio.to_thread(connect, port, "127.0.0.2", header + b"not TLS\r\n") == b""
        greeting = await asyncio.to_thread(through_proxy_with_tls, port)
        assert greeting.startswith(b"220 ")
        # A trusted proxy that closes before its header:
        await asyncio.to_thread(_connect_and_close, port, "127.0.0.2")
        await wait_until(lambda: behind_proxy.open_connections == 0, "proxy connections done")
        await wait_until(
            lambda: behind_proxy.metrics.proxy_failures["closed"] == 1, "closed counted"
        )

        # Implicit TLS: one silent client holds the only slot; the next is refused (capacity).
        port = implicit.port
        silent = socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP)
        try:
            await wait_until(lambda: implicit.open_connections == 1, "the silent client in")
            assert await asyncio.to_thread(connect, port, "127.0.0.1") == b""
            assert await asyncio.to_thread(silent.recv, 1024) == b""  # handshake timeout
        finally:
            silent.close()
        await wait_until(lambda: implicit.open_connections == 0, "the slot free again")
        assert await asyncio.to_thread(connect, port, "127.0.0.1", b"EHLO not TLS\r\n") == b""
        await wait_until(lambda: implicit.metrics.tls_failures == 2, "the garbage client done")
        assert behind_proxy.exporter is not None
        assert implicit.exporter is not None
        proxied = parse(await asyncio.to_thread(scrape, behind_proxy.exporter.url))
        direct = parse(await asyncio.to_thread(scrape, implicit.exporter.url))

    failures = "alephsmtp_proxy_header_failures_total"
    assert value(proxied, failures, reason="untrusted") == 1
    assert value(proxied, failures, reason="malformed") == 1
    assert value(proxied, failures, reason="timeout") == 1
    assert value(proxied, failures, reason="closed") == 1
    assert value(proxied, "alephsmtp_timeouts_total", kind="proxy") == 1
    assert value(proxied, "alephsmtp_tls_handshake_failures_total") == 1
    assert sum(n for (name, _), n in proxied.items() if "tls_sessions" in name) == 1
    assert value(proxied, "alephsmtp_connections_accepted_total") == 1  # one session

    assert value(direct, "alephsmtp_connections_refused_total", reason="capacity") == 1
    assert value(direct, "alephsmtp_tls_handshake_failures_total") == 2
    assert value(direct, "alephsmtp_timeouts_total", kind="tls") == 1
    assert value(direct, "alephsmtp_connections_accepted_total") == 0  # no session began


def _connect_and_close(port: int, source: str) -> None:
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))


async def test_the_endpoint_speaks_http_as_prometheus_expects() -> None:
    exporter = PrometheusExporter("127.0.0.1", 0, latency=False)
    async with SmtpServer("127.0.0.1", 0, hostname="mx.test", metrics=exporter) as server:
        assert not server.config.measure_latency  # latency=False leaves it off
        base = f"http://127.0.0.1:{exporter.port}"
        assert exporter.url == base + "/metrics"
        # OpenMetrics when asked for (Prometheus asks for it first), parsed by its parser.
        text = await asyncio.to_thread(scrape, exporter.url, "application/openmetrics-text")
        names = {family.name for family in openmetrics_families(text)}
        assert {family.name for family in FAMILIES} <= names
        assert text.rstrip().endswith("# EOF")

        def status(path: str, method: str = "GET") -> int:
            request = urllib.request.Request(base + path, method=method)
            try:
                with urllib.request.urlopen(request, timeout=GIVE_UP) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return int(error.code)

        picked = await asyncio.to_thread(
            scrape, exporter.url + "?name[]=alephsmtp_messages_accepted_total"
        )
        assert set(parse(picked)) == {("alephsmtp_messages_accepted_total", frozenset())}
        assert await asyncio.to_thread(status, "/") == 404
        assert await asyncio.to_thread(status, "/metrics", "POST") == 405
        # A request that never ends its head: closed without an answer, the server unharmed.
        with socket.create_connection(("127.0.0.1", exporter.port), timeout=GIVE_UP) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 4000)
            assert await asyncio.to_thread(sock.recv, 1024) == b""
        assert await asyncio.to_thread(status, "/metrics") == 200
    with pytest.raises(urllib.error.URLError, match="refused"):  # stopped with the server
        await asyncio.to_thread(scrape, base + "/metrics")


def test_the_command_line_serves_metrics() -> None:
    process, port = start_cli("--sink", "--metrics", "127.0.0.1:0")
    try:
        assert process.stderr is not None
        url = ""
        for line in process.stderr:  # the line after "listening on"
            match = re.search(r"metrics on (http://\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/metrics")
        send(port)
        samples = parse(scrape(url))
        assert value(samples, "alephsmtp_messages_accepted_total") == 1
        assert value(samples, "alephsmtp_message_reply_duration_seconds_count") == 1
    finally:
        stop_cli(process)


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ not shipped here")
def test_the_docs_and_the_dashboard_name_the_metrics_there_are() -> None:
    exposed = {f"{f.name}_total" if f.kind == "counter" else f.name for f in FAMILIES}
    table = re.findall(r"^\| `(alephsmtp_\w+)` \|", (DOCS / "observability.md").read_text(), re.M)
    assert sorted(table) == sorted(exposed)
    dashboard = (DOCS / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"alephsmtp_\w+", dashboard)) - {"alephsmtp"}
    assert used, "no metric in the dashboard"
    assert {re.sub(r"_bucket$", "", name) for name in used} <= exposed


async def test_a_metrics_port_in_use_stops_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SmtpServer("127.0.0.1", 0, metrics=("127.0.0.1", taken.getsockname()[1]))
        with pytest.raises(OSError, match="in use"):
            await server.start()
    assert not server.is_serving  # the SMTP side closed again


def test_addresses_and_options_are_checked() -> None:
    assert parse_address("127.0.0.1:9025") == ("127.0.0.1", 9025)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address(":9025") == (None, 9025)
    for wrong in ("127.0.0.1", "host:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(wrong)
    with pytest.raises(ValueError, match="brackets"):
        parse_address("::1:9025")
    with pytest.raises(TypeError):
        SmtpServer("127.0.0.1", 0, metrics=9025)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SmtpServer("127.0.0.1", 0, tracing="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flush_interval"):
        PrometheusExporter(flush_interval=0)


def test_the_workers_directory_is_made_for_the_run_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    exporter = PrometheusExporter("127.0.0.1", 0)
    with exporter.serving_workers() as on_exit:
        directory = exporter._multiprocess_dir
        assert directory is not None
        assert os.path.isdir(directory)
        assert exporter.port != 0  # reserved: one port for every worker
        live = Path(directory, "gauge_livesum_4242.db")
        live.write_bytes(b"")
        kept = Path(directory, "counter_4242.db")
        kept.write_bytes(b"")
        on_exit(4242)
        assert not live.exists()
        assert kept.exists()
    assert not os.path.exists(directory)


# --- workers=2: a real process tree ----------------------------------------------------------

SCRIPT = """
import logging, os, sys
from alephsmtp import SmtpServer
from alephsmtp.prometheus import PrometheusExporter

out, flush = sys.argv[1], float(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(message)s")

def on_session(session):
    def received(sender, e):
        with open(out, "a") as f:
            f.write(f"{os.getpid()}\\n")
        if e.message.startswith(b"Subject: refuse"):
            return "554 5.7.1 refused by policy"
    session.message_received += received
    session.start_transaction(f"220 mx.test ESMTP pid={os.getpid()}")

exporter = PrometheusExporter("127.0.0.1", 0, flush_interval=flush)
SmtpServer("127.0.0.1", 0, workers=2, hostname="mx.test", metrics=exporter).run(on_session)
"""


class Workers:
    """The script as a process tree, with its own multiprocess directory."""

    def __init__(self, tmp_path: Path, flush_interval: float) -> None:
        script = tmp_path / "serve.py"
        script.write_text(SCRIPT)
        self.directory = tmp_path / "prometheus"
        self.directory.mkdir()
        self.records = tmp_path / "records.txt"
        self.log_path = tmp_path / "stderr.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.directory))
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.records), str(flush_interval)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )
        self.port = 0
        self.metrics_url = ""
        deadline = time.monotonic() + GIVE_UP * 2
        while time.monotonic() < deadline:  # bounded by the deadline
            log = self.log()
            listening = [line for line in log.splitlines() if "listening on" in line]
            urls = [line.rsplit(" ", 1)[1] for line in log.splitlines() if "metrics of" in line]
            if len(listening) >= 2 and urls:
                self.port = int(listening[0].rsplit(":", 1)[1])
                self.metrics_url = urls[0]
                return
            assert self.process.poll() is None, f"server exited early:\n{log}"
            time.sleep(0.05)
        pytest.fail(f"workers not listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> Samples:
        return parse(scrape(self.metrics_url))

    def wait_for(self, what: str, check: Callable[[Samples], bool]) -> Samples:
        deadline = time.monotonic() + GIVE_UP
        samples: Samples = {}
        while time.monotonic() < deadline:  # bounded by the deadline
            try:
                samples = self.scrape()
            except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError):
                # Queued on a worker just killed: its listening socket went with it (a real
                # scraper's next scrape lands on a live worker, as this retry does).
                time.sleep(0.1)
                continue
            if check(samples):
                return samples
            time.sleep(0.1)
        pytest.fail(f"not within {GIVE_UP} s: {what}; last scrape: {samples}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=GIVE_UP * 2)

    def kill(self) -> None:
        """Last resort for a failed test: the supervisor (its workers follow on SIGTERM)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=GIVE_UP)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=GIVE_UP)
        self._log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[float], Workers]]:
    started: list[Workers] = []

    def start(flush_interval: float) -> Workers:
        served = Workers(tmp_path, flush_interval)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


needs_workers = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"),
    reason="workers need SO_REUSEPORT and fork",
)


def send(port: int, message: bytes = MESSAGE) -> None:
    """One message on a connection of its own; a refused one must get the policy's 554."""
    with smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP) as client:
        if message is REFUSED:
            with pytest.raises(smtplib.SMTPDataError, match="554"):
                client.sendmail("a@client.test", ["b@mx.test"], message)
        else:
            client.sendmail("a@client.test", ["b@mx.test"], message)


@needs_workers
def test_two_workers_one_endpoint_with_their_totals(
    workers: Callable[[float], Workers],
) -> None:
    served = workers(0.2)
    for number in range(20):  # a connection each: the kernel spreads them over the workers
        send(served.port, REFUSED if number % 10 == 0 else MESSAGE)
    pids = set(served.records.read_text().split())
    assert len(pids) == 2, "every message went to one worker: nothing to add up"

    def totals(s: Samples) -> tuple[float, ...]:
        return (
            value(s, "alephsmtp_messages_accepted_total"),
            value(s, "alephsmtp_messages_refused_total", reply_class="5xx"),
            value(s, "alephsmtp_commands_total", command="MAIL", reply_class="2xx"),
            value(s, "alephsmtp_connections_accepted_total"),
            value(s, "alephsmtp_message_size_bytes_count"),
        )

    s = served.wait_for("both workers' counts", lambda s: totals(s) == (18, 2, 20, 20, 18))
    assert value(s, "alephsmtp_message_reply_duration_seconds_count") == 20
    # Whichever worker answers a scrape, it tells the same totals.
    for _ in range(6):
        assert totals(served.scrape()) == (18, 2, 20, 20, 18)

    # A live gauge: one connection open, on the worker its greeting names; that worker
    # killed, its gauges go with it (the supervisor's mark_process_dead), its counts stay.
    client = smtplib.SMTP(timeout=GIVE_UP)
    try:
        _code, greeting = client.connect("127.0.0.1", served.port)
        pid = int(greeting.split(b"pid=")[1])
        served.wait_for("the open connection", lambda s: gauge(s) == 1)
        os.kill(pid, signal.SIGKILL)
        s = served.wait_for("the dead worker's gauges gone", lambda s: gauge(s) == 0)
    finally:
        client.close()
    assert not list(served.directory.glob(f"gauge_*_{pid}.db"))
    assert list(served.directory.glob(f"counter_{pid}.db"))
    assert totals(s) == (18, 2, 20, 21, 18)  # the killed worker's counts are still there
    assert served.stop() == 0
    assert "worker" in served.log()
    assert f"(pid {pid}) was killed by SIGKILL" in served.log()


def gauge(s: Samples) -> float:
    return value(s, "alephsmtp_connections_active")


@needs_workers
def test_a_stopping_worker_writes_its_counts_a_last_time(
    workers: Callable[[float], Workers],
) -> None:
    served = workers(3600.0)  # no periodic writes: only the last one at the worker's stop
    for _ in range(4):
        send(served.port)
    assert served.stop() == 0
    merged = {
        sample.name: sample.value
        for family in MultiProcessCollector(None, path=str(served.directory)).collect()
        for sample in family.samples
        if not sample.labels
    }
    assert merged["alephsmtp_messages_accepted_total"] == 4
    assert merged["alephsmtp_connections_accepted_total"] == 4


# --- OpenTelemetry ---------------------------------------------------------------------------


async def test_spans_per_session_and_per_transaction(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mine = provider.get_tracer("the.users.store")
    stored: list[trace.SpanContext] = []

    def store(session: Any, e: Any) -> str | None:
        # The user's own span, a child of the transaction's: the message can be followed on.
        with mine.start_as_current_span("store", context=context_of(session)) as span:
            stored.append(span.get_span_context())
        return "554 5.7.1 refused by policy" if e.message.startswith(b"Subject: refuse") else None

    def on_session(session: Any) -> None:
        session.message_received += store
        session.auth += check_auth

    async with SmtpServer(
        "127.0.0.1",
        0,
        hostname="mx.test",
        tls_context=server_context,
        tracing=provider,
        on_session=on_session,
    ) as server:
        port = server.port

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP) as smtp:
                smtp.starttls(context=client_context)
                smtp.login("user", "secret")
                smtp.sendmail("alice@client.test", ["bob@mx.test", "carol@mx.test"], MESSAGE)
                smtp.mail("alice@client.test")  # abandoned by RSET
                smtp.rcpt("bob@mx.test")
                smtp.rset()
                with pytest.raises(smtplib.SMTPDataError):
                    smtp.sendmail("alice@client.test", ["bob@mx.test"], REFUSED)
            # A second session, closed with its transaction open.
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=GIVE_UP)
            smtp.ehlo()
            smtp.mail("dave@client.test")
            smtp.close()

        await asyncio.to_thread(client)
        await wait_until(lambda: server.metrics.connections == 0, "both sessions ended")
        await wait_until(lambda: len(exporter.get_finished_spans()) == 8, "eight spans")

    spans = list(exporter.get_finished_spans())
    sessions = [s for s in spans if s.name == "smtp.session"]
    transactions = [s for s in spans if s.name == "smtp.transaction"]
    users = [s for s in spans if s.name == "store"]
    assert (len(sessions), len(transactions), len(users)) == (2, 4, 2)
    first, second = sorted(sessions, key=lambda s: attrs(s)["smtp.session.id"])
    assert first.kind is trace.SpanKind.SERVER
    assert first.parent is None  # a trace of its own per connection
    assert attrs(first)["client.address"] == "127.0.0.1"
    assert attrs(first)["tls.protocol.name"] == "tls"
    assert str(attrs(first)["tls.protocol.version"]).startswith("1.")
    assert attrs(first)["smtp.authenticated"] is True
    assert attrs(first)["smtp.transactions"] == 3
    assert attrs(second)["smtp.authenticated"] is False
    assert "tls.protocol.version" not in attrs(second)

    def of(session: ReadableSpan) -> list[ReadableSpan]:
        found = [t for t in transactions if t.parent is not None]
        found = [t for t in found if t.parent.span_id == session.context.span_id]  # type: ignore[union-attr]
        return sorted(found, key=lambda t: t.start_time or 0)

    accepted, abandoned, refused = of(first)
    assert {t.context.trace_id for t in (accepted, abandoned, refused)} == {first.context.trace_id}
    assert attrs(accepted)["smtp.transaction.outcome"] == "accepted"
    assert attrs(accepted)["smtp.reply.code"] == 250
    assert attrs(accepted)["smtp.recipients"] == 2
    assert attrs(accepted)["smtp.message.size"] == len(MESSAGE)
    assert attrs(accepted)["smtp.tls"] is True
    assert attrs(accepted)["smtp.authenticated"] is True
    assert attrs(abandoned)["smtp.transaction.outcome"] == "abandoned"
    assert attrs(abandoned)["smtp.recipients"] == 1
    assert attrs(refused)["smtp.transaction.outcome"] == "refused"
    assert attrs(refused)["smtp.reply.code"] == 554
    (closed,) = of(second)
    assert attrs(closed)["smtp.transaction.outcome"] == "closed"
    assert attrs(closed)["smtp.recipients"] == 0
    # The user's spans hang under the transactions whose messages they stored.
    parents = {s.parent.span_id for s in users if s.parent is not None}
    assert parents == {accepted.context.span_id, refused.context.span_id}
    assert len(stored) == 2
    # No address, no subject, no body: nothing personal in any attribute.
    for span in spans:
        for key, attribute in attrs(span).items():
            assert "@" not in str(attribute), (key, attribute)
            assert "hello" not in str(attribute), (key, attribute)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_an_untraced_session_has_no_context() -> None:
    server = SmtpServer("127.0.0.1", 0, hostname="mx.test")
    assert server._pools.tracer is None

    class Session:
        _pools = server._pools

    assert context_of(Session()) is None  # type: ignore[arg-type]


async def test_a_session_left_out_by_the_sampler_makes_no_spans() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    contexts: list[Any] = []

    def on_session(session: Any) -> None:
        session.message_received += lambda s, e: contexts.append(context_of(s))

    async with SmtpServer(
        "127.0.0.1", 0, hostname="mx.test", tracing=provider, on_session=on_session
    ) as server:
        await asyncio.to_thread(send, server.port)
        await wait_until(lambda: server.metrics.connections == 0, "the session ended")
        tracer = server._pools.tracer
        assert tracer is not None
        assert not tracer._open  # nothing kept once the session ended
    assert exporter.get_finished_spans() == ()
    (context,) = contexts  # still a context (the unsampled session's), for propagation
    assert context is not None
    assert not trace.get_current_span(context).is_recording()
