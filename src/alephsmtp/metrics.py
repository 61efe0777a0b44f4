"""What a server counts, cheaply enough to count always, and an optional hook.

``server.metrics`` is a [`Metrics`][alephsmtp.metrics.Metrics]: plain integers, ``Counter``\\ s and
bucketed [`Histogram`][alephsmtp.metrics.Histogram]\\ s that the sessions update as they go (an
integer or dict increment on the hot path, never a lock or a call into an exporter). Exporters read
them when asked: [`alephsmtp.prometheus`][alephsmtp.prometheus] serves them on ``/metrics``
(``SmtpServer(metrics=...)``, ``alephsmtp --metrics``); the ``metrics_hook`` callable, for other
systems, is told of the main changes as they happen, ``hook(name, amount, code)`` (``code`` is the
reply code for ``"rejections"``, else ``None``). A hook that raises is logged and otherwise ignored.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "SIZE_BUCKETS", "Histogram", "Metrics", "MetricsHook"]

log = logging.getLogger("alephsmtp.metrics")

MetricsHook = Callable[[str, int, "int | None"], None]

# Upper bounds of the histogram buckets (the last one, +Inf, is implicit).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20,
                64 << 20)  # fmt: skip
RECIPIENT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 1000)


class Histogram:
    """Observations counted in buckets (``counts[i]``: at most ``bounds[i]``; the last,
    anything larger), with their sum: what a Prometheus histogram exposes."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """How many observations."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most that)`` per bucket, ``inf`` last."""
        running = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Metrics:
    """The counters of one server (one worker process).

    Connections: ``connections_opened``, ``connections_closed`` (and ``connections``, open
    now), ``connections_refused`` by reason (``capacity``, ``per-ip``); sessions
    whose TLS came up, by version (``tls_sessions``), ``tls_failures``. Commands by verb and
    reply class (``commands[("MAIL", "2xx")]``). Messages: ``messages`` accepted and their
    ``message_bytes``, ``messages_refused`` by reply class, ``messages_discarded`` (abandoned
    by the client, or streamed and refused), ``message_sizes`` and ``recipients``
    histograms. Replies refused by code (``rejections``). ``timeouts`` by kind (``idle``,
    ``data``, ``rate``, ``handler``, ``write``, ``tls``); ``closed_for_errors`` (sessions ended
    at ``max_bad_commands``); ``auth`` by (mechanism, ``success``/``failure``/``error``).
    Connections behind a load balancer that never got a session: ``proxy_failures`` by reason
    (``untrusted``: a peer outside the trusted networks; ``malformed``: a bad header;
    ``timeout``: no whole header in time; ``closed``: the peer closed before it); their TLS
    handshake failures count in ``tls_failures`` (and a silent client in ``timeouts["tls"]``).
    Latency: ``handler_seconds`` per event, ``reply_seconds`` from a message's end to its reply.
    """

    connections_opened: int = 0
    connections_closed: int = 0
    messages: int = 0  # accepted (2xx after the end of data)
    message_bytes: int = 0  # of the accepted messages
    rejections: Counter[int] = field(default_factory=Counter)  # 4xx/5xx replies by code
    connections_refused: Counter[str] = field(default_factory=Counter)
    tls_sessions: Counter[str] = field(default_factory=Counter)
    tls_failures: int = 0
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    messages_refused: Counter[str] = field(default_factory=Counter)
    messages_discarded: int = 0
    message_sizes: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))
    recipients: Histogram = field(default_factory=lambda: Histogram(RECIPIENT_BUCKETS))
    timeouts: Counter[str] = field(default_factory=Counter)
    closed_for_errors: int = 0
    auth: Counter[tuple[str, str]] = field(default_factory=Counter)
    proxy_failures: Counter[str] = field(default_factory=Counter)
    handler_seconds: dict[str, Histogram] = field(default_factory=dict)
    reply_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    hook: MetricsHook | None = None

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self.connections_opened - self.connections_closed

    def connection_opened(self) -> None:
        self.connections_opened += 1
        if self.hook is not None:
            self._tell("connections_opened", 1, None)

    def connection_closed(self) -> None:
        self.connections_closed += 1
        if self.hook is not None:
            self._tell("connections_closed", 1, None)

    def tls_failed(self, *, timeout: bool) -> None:
        """A TLS handshake that failed (STARTTLS, implicit TLS, behind a PROXY header);
        ``timeout``: it did not end in time."""
        self.tls_failures += 1
        if timeout:
            self.timeouts["tls"] += 1

    def message_accepted(self, size: int, recipients: int) -> None:
        self.messages += 1
        self.message_bytes += size
        # Histogram.observe, inline: once per message, on the hot path.
        sizes = self.message_sizes
        sizes.counts[bisect.bisect_left(sizes.bounds, size)] += 1
        sizes.total += size
        counts = self.recipients
        counts.counts[bisect.bisect_left(counts.bounds, recipients)] += 1
        counts.total += recipients
        if self.hook is not None:
            self._tell("messages", 1, None)
            self._tell("message_bytes", size, None)

    def message_refused(self, code: int) -> None:
        self.messages_refused[f"{code // 100}xx"] += 1

    def rejected(self, code: int) -> None:
        self.rejections[code] += 1
        if self.hook is not None:
            self._tell("rejections", 1, code)

    def handler_done(self, event: str, seconds: float) -> None:
        histogram = self.handler_seconds.get(event)
        if histogram is None:
            histogram = self.handler_seconds[event] = Histogram(LATENCY_BUCKETS)
        # Histogram.observe, inline: once per event with handlers, with measure_latency.
        histogram.counts[bisect.bisect_left(histogram.bounds, seconds)] += 1
        histogram.total += seconds

    def _tell(self, name: str, amount: int, code: int | None) -> None:
        if self.hook is None:
            return
        try:
            self.hook(name, amount, code)
        except Exception:
            log.exception("metrics hook failed")
