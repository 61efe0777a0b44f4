"""Prometheus metrics: ``/metrics`` over HTTP, for one process or every worker.

``SmtpServer(..., metrics="127.0.0.1:9025")`` (or ``alephsmtp --metrics 127.0.0.1:9025``)
serves ``http://127.0.0.1:9025/metrics``; ``metrics=PrometheusExporter(...)`` takes the
options. Needs the ``metrics`` extra (``pip install alephsmtp[metrics]``: the official
``prometheus-client``, which writes the exposition formats, text and OpenMetrics).

The sessions count as they go into the server's [`Metrics`][alephsmtp.metrics.Metrics]: plain
integers, never a call into ``prometheus_client`` on the path of a command. The exporter
reads them when asked:

- One process: a custom collector ([`MetricsCollector`][alephsmtp.prometheus.MetricsCollector])
  turns ``server.metrics`` into metric families at scrape time, in the event loop (no thread reads
  what the loop writes). ``process_*`` metrics (CPU, memory, descriptors) come with them.
- ``workers=N``: prometheus_client's multiprocess mode. Each worker writes its counts into
  its own files (``PROMETHEUS_MULTIPROC_DIR``: yours if set, else a temporary directory made
  for the run and removed after it) once every ``flush_interval`` seconds and when it stops;
  every worker serves ``/metrics`` on the same port (``SO_REUSEPORT``, as the SMTP port) with
  ``MultiProcessCollector``, which adds up every worker's files, so whichever worker answers
  a scrape, it tells the total. When a worker exits, the supervisor drops its gauges
  (``mark_process_dead``); its counters stay in the totals, as counters must.

The metrics (every counter ends in ``_total``; durations are in seconds, sizes in bytes):
see `FAMILIES` and ``docs/observability.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app, values
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
    from prometheus_client.utils import floatToGoString
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "alephsmtp.prometheus needs prometheus-client: pip install 'alephsmtp[metrics]'"
    ) from error

from .metrics import Histogram
from .workers import _reserve_port

if TYPE_CHECKING:
    from .server import SmtpServer

__all__ = [
    "FAMILIES",
    "Family",
    "MetricsCollector",
    "PrometheusExporter",
    "exporter_for",
    "parse_address",
]

log = logging.getLogger("alephsmtp.prometheus")

PREFIX = "alephsmtp_"
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_REQUEST_TIMEOUT = 10.0  # seconds for a scrape's request to arrive and its answer to leave
_MAX_REQUEST_HEAD = 16 << 10  # bytes of request line and headers
_MAX_SCRAPES = 16  # scrape connections at once; more are closed unanswered

Sample = tuple[tuple[str, ...], "float | Histogram"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One metric: its name (without ``_total``), type, help, label names, and how to read
    its samples (label values, value or [`Histogram`][alephsmtp.metrics.Histogram]) from a server.
    Both the collector and the multiprocess writer read this one table."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...]
    read: Callable[[SmtpServer], Iterable[Sample]]


def _one(value: Callable[[SmtpServer], float | Histogram]) -> Callable[[SmtpServer], list[Sample]]:
    return lambda server: [((), value(server))]


def _by(
    counts: Callable[[SmtpServer], Any], key: Callable[[Any], tuple[str, ...]] | None = None
) -> Callable[[SmtpServer], list[Sample]]:
    """Samples from a ``Counter`` (or a dict of histograms): one per key, keys as labels."""
    to_labels = key if key is not None else (lambda k: (str(k),))
    return lambda server: [(to_labels(k), v) for k, v in list(counts(server).items())]


def _pools(server: SmtpServer) -> list[Sample]:
    samples: list[Sample] = []
    for name, pool in zip(("command", "data"), server.buffer_pools, strict=True):
        samples.append(((name, "in_use"), pool.in_use))
        samples.append(((name, "free"), pool.free))
    return samples


FAMILIES: tuple[Family, ...] = (
    Family(
        PREFIX + "connections_accepted",
        "counter",
        "Connections that reached a session (refused ones included).",
        (),
        _one(lambda s: s.metrics.connections_opened),
    ),
    Family(
        PREFIX + "connections_closed",
        "counter",
        "Sessions whose connection has ended.",
        (),
        _one(lambda s: s.metrics.connections_closed),
    ),
    Family(
        PREFIX + "connections_active",
        "gauge",
        "Connections open now, sessions and those still before their session (PROXY, TLS).",
        (),
        _one(lambda s: s.open_connections),
    ),
    Family(
        PREFIX + "connections_refused",
        "counter",
        "Connections refused at connect (421 4.7.0), by limit: capacity or per-ip.",
        ("reason",),
        _by(lambda s: s.metrics.connections_refused),
    ),
    Family(
        PREFIX + "tls_sessions",
        "counter",
        "Sessions whose TLS came up (STARTTLS or implicit), by protocol version.",
        ("version",),
        _by(lambda s: s.metrics.tls_sessions),
    ),
    Family(
        PREFIX + "tls_handshake_failures",
        "counter",
        "TLS handshakes that failed or did not end in time (STARTTLS, implicit, after PROXY).",
        (),
        _one(lambda s: s.metrics.tls_failures),
    ),
    Family(
        PREFIX + "commands",
        "counter",
        "Commands answered, by verb and reply class (2xx, 3xx, 4xx, 5xx).",
        ("command", "reply_class"),
        _by(lambda s: s.metrics.commands, lambda k: (str(k[0]), str(k[1]))),
    ),
    Family(
        PREFIX + "error_replies",
        "counter",
        "Replies with a 4xx or 5xx code, by code.",
        ("code",),
        _by(lambda s: s.metrics.rejections),
    ),
    Family(
        PREFIX + "messages_accepted",
        "counter",
        "Messages accepted (a 2xx reply after their end).",
        (),
        _one(lambda s: s.metrics.messages),
    ),
    Family(
        PREFIX + "messages_accepted_bytes",
        "counter",
        "Octets of the accepted messages.",
        (),
        _one(lambda s: s.metrics.message_bytes),
    ),
    Family(
        PREFIX + "messages_refused",
        "counter",
        "Messages refused after their end, by reply class (4xx, 5xx).",
        ("reply_class",),
        _by(lambda s: s.metrics.messages_refused),
    ),
    Family(
        PREFIX + "messages_discarded",
        "counter",
        "Messages dropped before their end (connection lost) or streamed and then refused.",
        (),
        _one(lambda s: s.metrics.messages_discarded),
    ),
    Family(
        PREFIX + "message_size_bytes",
        "histogram",
        "Size of the accepted messages, in octets.",
        (),
        _one(lambda s: s.metrics.message_sizes),
    ),
    Family(
        PREFIX + "message_recipients",
        "histogram",
        "Recipients per accepted message.",
        (),
        _one(lambda s: s.metrics.recipients),
    ),
    Family(
        PREFIX + "handler_duration_seconds",
        "histogram",
        "Time the handlers of an event took (with measure_latency), by event.",
        ("event",),
        _by(lambda s: s.metrics.handler_seconds),
    ),
    Family(
        PREFIX + "message_reply_duration_seconds",
        "histogram",
        "Time from the end of a message's data to its reply (with measure_latency).",
        (),
        _one(lambda s: s.metrics.reply_seconds),
    ),
    Family(
        PREFIX + "timeouts",
        "counter",
        "Timeouts, by kind: idle, data, rate, handler, write, tls, proxy.",
        ("kind",),
        _by(lambda s: s.metrics.timeouts),
    ),
    Family(
        PREFIX + "bad_command_closes",
        "counter",
        "Sessions closed for too many bad commands (max_bad_commands).",
        (),
        _one(lambda s: s.metrics.closed_for_errors),
    ),
    Family(
        PREFIX + "auth_attempts",
        "counter",
        "AUTH exchanges, by mechanism and outcome: success, failure, error (ours, 4xx).",
        ("mechanism", "outcome"),
        _by(lambda s: s.metrics.auth, lambda k: (str(k[0]), str(k[1]))),
    ),
    Family(
        PREFIX + "proxy_header_failures",
        "counter",
        "Connections closed before a PROXY header was read: untrusted, malformed, timeout, closed.",
        ("reason",),
        _by(lambda s: s.metrics.proxy_failures),
    ),
    Family(
        PREFIX + "buffer_pool_buffers",
        "gauge",
        "Read buffers of the pools, by pool (command, data) and state (in_use, free).",
        ("pool", "state"),
        _pools,
    ),
)


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]


class MetricsCollector:
    """A prometheus_client collector of a server's metrics, read at scrape time.

    The exporter registers one; to serve them with metrics of your own instead, register one
    in your registry: ``REGISTRY.register(MetricsCollector(server))``.
    """

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    def describe(self) -> Iterator[Metric]:
        """The families without their samples: what a registry checks names with (a clash
        with metrics of yours, ``name[]=`` filters) without reading the server."""
        return self._families(describe=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(describe=False)

    def _families(self, *, describe: bool) -> Iterator[Metric]:
        server = self.server
        for family in FAMILIES:
            samples = () if describe else family.read(server)
            metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
            if family.kind == "counter":
                metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
                for labels, value in samples:
                    assert not isinstance(value, Histogram)
                    metric.add_metric(labels, value)
            elif family.kind == "gauge":
                metric = GaugeMetricFamily(family.name, family.help, labels=family.labels)
                for labels, value in samples:
                    assert not isinstance(value, Histogram)
                    metric.add_metric(labels, value)
            else:
                metric = HistogramMetricFamily(family.name, family.help, labels=family.labels)
                for labels, value in samples:
                    assert isinstance(value, Histogram)
                    metric.add_metric(labels, _buckets(value), value.total)
            yield metric


class _MultiprocessWriter:
    """A worker's counts, written into its prometheus_client multiprocess files.

    Each sample is written as an absolute value (a counter's count, a histogram bucket's own
    count, which MultiProcessCollector accumulates), and only when it changed. A counter
    found in a file already (a dead worker's whose pid this one reuses) keeps that count as
    its base: the totals never go down.
    """

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self._value_class = _value_class()
        self._values: dict[tuple[str, tuple[str, ...]], list[Any]] = {}  # [value, base, last]

    def flush(self) -> None:
        for family in FAMILIES:
            name, labels = family.name, family.labels
            for label_values, value in family.read(self.server):
                if isinstance(value, Histogram):
                    bounds = (*value.bounds, math.inf)
                    for bound, count in zip(bounds, value.counts, strict=True):
                        le = (*label_values, floatToGoString(bound))
                        self._set(family, name + "_bucket", (*labels, "le"), le, count)
                    self._set(family, name + "_sum", labels, label_values, value.total)
                elif family.kind == "counter":
                    self._set(family, name + "_total", labels, label_values, value)
                else:
                    self._set(family, name, labels, label_values, value)

    def _set(
        self,
        family: Family,
        sample: str,
        labels: tuple[str, ...],
        label_values: tuple[str, ...],
        value: float,
    ) -> None:
        key = (sample, label_values)
        entry = self._values.get(key)
        if entry is None:
            gauge = family.kind == "gauge"
            made = self._value_class(
                family.kind,
                family.name,
                sample,
                labels,
                label_values,
                family.help,
                # Gauges of live workers only, added up; a dead worker's are removed.
                multiprocess_mode="livesum" if gauge else "",
            )
            entry = self._values[key] = [made, 0.0 if gauge else made.get(), None]
        total = entry[1] + value
        if total != entry[2]:
            entry[0].set(total)
            entry[2] = total


_own_value_class: Any = None


def _value_class() -> Any:
    """prometheus_client's multiprocess value class: the process's own when it is in
    multiprocess mode already (two classes on one file would corrupt it), else one made for
    this process, writing to ``PROMETHEUS_MULTIPROC_DIR``."""
    global _own_value_class
    current = values.ValueClass
    if getattr(current, "_multiprocess", False):
        return current
    if _own_value_class is None:
        _own_value_class = values.MultiProcessValue()
    return _own_value_class


class PrometheusExporter:
    """Serves a server's metrics at ``http://host:port/metrics`` (port 0: the OS picks one;
    see [`port`][alephsmtp.prometheus.PrometheusExporter.port] once started).

    ``latency`` (default on) makes the server time its handlers and its replies to messages
    (``measure_latency``) for the two duration histograms. ``registry``: serve this
    prometheus_client registry (with metrics of your own), the server's collector added to
    it, instead of one of the exporter's own (which adds the ``process_*`` metrics).
    ``flush_interval``: how often a worker writes its counts for the others (``workers=N``).
    """

    def __init__(
        self,
        host: str | None = "127.0.0.1",
        port: int = 9025,
        *,
        latency: bool = True,
        registry: CollectorRegistry | None = None,
        path: str = "/metrics",
        flush_interval: float = 1.0,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"metrics port out of range: {port}")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        self.host = host
        self._port = port
        self.latency = latency
        self.path = path
        self.flush_interval = flush_interval
        self._user_registry = registry
        self._registry: CollectorRegistry | None = None
        self._collector: MetricsCollector | None = None
        self._app: Callable[..., Iterable[bytes]] | None = None
        self._listener: asyncio.Server | None = None
        self._scrapes = 0
        # Worker mode, set in the supervisor by serving_workers() and inherited by the fork.
        self._multiprocess_dir: str | None = None
        self._writer: _MultiprocessWriter | None = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port served (the OS's choice once started, when 0 was asked for)."""
        if self._listener is not None and self._listener.sockets:
            return int(self._listener.sockets[0].getsockname()[1])
        return self._port

    @property
    def url(self) -> str:
        host = self.host or "0.0.0.0"
        where = f"[{host}]" if ":" in host else host
        return f"http://{where}:{self.port}{self.path}"

    # --- in the serving process (the server's start and stop call these) -----------------

    async def start(self, server: SmtpServer) -> None:
        """Serve ``server``'s metrics (a worker's: every worker's)."""
        if self._listener is not None:
            raise RuntimeError("exporter already started")
        loop = asyncio.get_running_loop()
        if self._multiprocess_dir is not None:
            # A worker: its counts go to the shared directory, the endpoint adds them all up.
            os.environ.setdefault(_MULTIPROC_ENV, self._multiprocess_dir)
            self._writer = _MultiprocessWriter(server)
            self._writer.flush()
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry, path=self._multiprocess_dir)
            self._flusher = loop.create_task(self._flush_periodically())
        else:
            self._collector = MetricsCollector(server)
            if self._user_registry is not None:
                registry = self._user_registry
            else:
                registry = CollectorRegistry(auto_describe=False)
                ProcessCollector(registry=registry)
            registry.register(self._collector)
        self._registry = registry
        self._app = make_wsgi_app(registry)
        try:
            self._listener = await asyncio.start_server(
                self._scrape,
                self.host,
                self._port,
                limit=_MAX_REQUEST_HEAD,
                reuse_port=self._multiprocess_dir is not None or None,
            )
        except BaseException:
            await self._release()
            raise
        if self._multiprocess_dir is None:
            log.info("metrics on %s", self.url)
        else:
            log.debug("metrics of every worker on %s", self.url)

    async def stop(self) -> None:
        """Stop serving; a worker writes its counts a last time."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        await self._release()

    async def _release(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._writer is not None:
            self._writer.flush()
            self._writer = None
        if self._collector is not None and self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
            self._collector = None
        self._registry = None
        self._app = None

    async def _flush_periodically(self) -> None:
        while True:  # cancelled by stop()
            await asyncio.sleep(self.flush_interval)
            if self._writer is not None:
                try:
                    self._writer.flush()
                except OSError as error:  # the directory went away, the disk is full
                    log.warning("cannot write metrics for the other workers: %s", error)

    # --- in the supervisor (workers=N) ------------------------------------------------------

    @contextlib.contextmanager
    def serving_workers(self) -> Iterator[Callable[[int], None]]:
        """Around a supervisor's run: the shared directory and the port every worker serves
        on (bound here first, as the SMTP port, so that port 0 is one port for all). Yields
        the supervisor's ``on_exit(pid)``."""
        directory = os.environ.get(_MULTIPROC_ENV) or None
        made = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="alephsmtp-metrics-")
        elif not os.path.isdir(directory):
            raise ValueError(f"{_MULTIPROC_ENV} is not a directory: {directory}")
        reservation = None
        try:
            reservation = _reserve_port(self.host, self._port)
            self._port = int(reservation.getsockname()[1])
            self._multiprocess_dir = directory
            log.info("metrics of every worker on %s", self.url)

            def worker_exited(pid: int) -> None:
                mark_process_dead(pid, directory)

            yield worker_exited
        finally:
            self._multiprocess_dir = None
            if reservation is not None:
                reservation.close()
            if made:
                shutil.rmtree(directory, ignore_errors=True)

    # --- HTTP -------------------------------------------------------------------------------

    async def _scrape(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer, then the connection closes (HTTP/1.1 ``Connection:
        close``): what a Prometheus scrape needs, from prometheus_client's WSGI app."""
        self._scrapes += 1
        try:
            if self._scrapes > _MAX_SCRAPES:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                return
            status, headers, body = self._answer(head)
            lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers]
            writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass  # the scraper went away or stalled: nothing to tell it
        finally:
            self._scrapes -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", [], b"bad request\n"
        method, target, _ = parts
        url = urllib.parse.urlsplit(target)
        if url.path != self.path:
            return "404 Not Found", [], f"metrics are at {self.path}\n".encode()
        environ: dict[str, str] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": url.path,
            "QUERY_STRING": url.query,
        }
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        if self._writer is not None:
            self._writer.flush()  # this worker's counts as of now; the others' as of their last
        app = self._app
        if app is None:  # stopping
            return "503 Service Unavailable", [], b"stopping\n"
        answer: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            answer.append((status, headers))

        body = b"".join(app(environ, start_response))
        status, headers = answer[0]
        return status, headers, body


def parse_address(text: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface) as (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics address wants HOST:PORT, not {text!r}")
    return host or None, int(port)


def exporter_for(
    metrics: str | tuple[str | None, int] | PrometheusExporter,
) -> PrometheusExporter:
    """What ``SmtpServer(metrics=...)`` takes: ``"HOST:PORT"``, ``(host, port)`` or an
    exporter."""
    if isinstance(metrics, PrometheusExporter):
        return metrics
    if isinstance(metrics, str):
        host, port = parse_address(metrics)
        return PrometheusExporter(host, port)
    if isinstance(metrics, tuple) and len(metrics) == 2:
        return PrometheusExporter(metrics[0], int(metrics[1]))
    raise TypeError(
        "metrics must be 'HOST:PORT', (host, port) or a PrometheusExporter, "
        f"not {type(metrics).__name__}"
    )
