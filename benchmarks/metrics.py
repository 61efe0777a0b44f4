"""What metrics and tracing cost, taken apart: CPU per 1 KiB message in the session, CPU per
scrape of the Prometheus endpoint, CPU per worker flush.

    python benchmarks/metrics.py [--messages 20000] [--rounds 7] [--json FILE]

``server.py`` measures the whole server with metrics off and on over loopback, where a shared
machine's noise is as large as the effect. This one removes the network and the event loop:
one session on a fake transport (``tests/_harness.py``'s) answers the same 1 KiB message on a
persistent session (the envelope in one read, the body in another, the reads of
``tests/test_call_budget.py``), with a sink handler, in this process, and ``time.process_time``
measures it. Variants, run in turn within each round (the median over the rounds is kept):

- ``off``: the counters only (always on);
- ``latency``: ``measure_latency`` (what ``metrics=`` turns on for the duration histograms);
- ``tracing``: spans per session and per transaction with the OpenTelemetry SDK, no span
  processor (what making spans costs); ``tracing+batch``: with a ``BatchSpanProcessor`` and
  an exporter that drops what it gets (its thread's CPU counts: it is the process's);
  ``tracing+batch 1%``: the same with a sampler that keeps one trace in a hundred.

Then what a scrape costs (the collector over a server's metrics, encoded as Prometheus text;
and in multiprocess mode a worker's flush and the merge of two workers' files), and what that
adds per message at one scrape a second and a given message rate. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import RESULTS, format_table, machine_info, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _harness import FakeTransport, MockLoop
from alephsmtp import IMPLEMENTATION, SmtpServer
from alephsmtp.handlers import sink
from alephsmtp.session import SmtpSession

BODY = b"Subject: bench\r\n\r\n" + b"y" * 1000 + b"\r\n.\r\n"
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def tracer_provider(batch: bool, ratio: float = 1.0) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    if batch:
        provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


class Variant:
    """A server's configuration and one session of it on a fake transport."""

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.server = SmtpServer("127.0.0.1", 0, hostname="mx.test", **options)
        self.session = SmtpSession(
            self.server.config,
            lambda session: session.message_received.connect(sink),
            pools=self.server._pools,
            loop=MockLoop(),
        )
        self.transport = FakeTransport(self.session)
        self.session.connection_made(self.transport)
        self.send(b"EHLO bench.example\r\n")
        self.samples: list[float] = []

    def send(self, data: bytes) -> None:
        buffer = self.session.get_buffer(-1)
        buffer[: len(data)] = data
        self.session.buffer_updated(len(data))
        self.transport.written.clear()  # what the client would read, dropped

    def run(self, messages: int) -> float:
        """CPU seconds per message."""
        send = self.send
        start = time.process_time()
        for _ in range(messages):
            send(ENVELOPE)
            send(BODY)
        return (time.process_time() - start) / messages


def session_costs(messages: int, rounds: int) -> tuple[list[list[object]], dict[str, Any]]:
    variants = [Variant("off"), Variant("latency", measure_latency=True)]
    try:
        variants += [
            Variant("tracing", tracing=tracer_provider(batch=False)),
            Variant("tracing+batch", tracing=tracer_provider(batch=True)),
            Variant("tracing+batch 1%", tracing=tracer_provider(batch=True, ratio=0.01)),
        ]
    except ImportError:
        print("note: opentelemetry-sdk is not installed: the tracing rows are skipped")
    for variant in variants:
        variant.run(messages // 10)  # warm: rendered replies, parsed answers, caches
    for _ in range(rounds):
        for variant in variants:
            variant.samples.append(variant.run(messages))
    base = statistics.median(variants[0].samples)
    rows: list[list[object]] = []
    for variant in variants:
        median = statistics.median(variant.samples)
        rows.append(
            [
                variant.name,
                f"{median * 1e6:.2f}",
                f"{min(variant.samples) * 1e6:.2f}..{max(variant.samples) * 1e6:.2f}",
                f"{(median - base) * 1e6:+.2f}",
                f"{100 * (median / base - 1):+.1f}%",
            ]
        )
    assert variants[0].session._pools.metrics.messages > 0
    data = {v.name: [s * 1e6 for s in v.samples] for v in variants}
    return rows, data


def best(run: Callable[[], object], times: int) -> float:
    """CPU seconds per call, the median of five batches of ``times`` calls."""
    batches = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(times):
            run()
        batches.append((time.process_time() - start) / times)
    return statistics.median(batches)


def scrape_costs(rate: float) -> tuple[list[list[object]], dict[str, float]]:
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from alephsmtp import prometheus

    # A server with something in every family: traffic through a session first.
    variant = Variant("scraped", measure_latency=True)
    variant.run(2000)
    server = variant.server
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(prometheus.MetricsCollector(server))
    size = len(generate_latest(registry))
    single = best(lambda: generate_latest(registry), 200)

    directory = tempfile.mkdtemp(prefix="alephsmtp-bench-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        writer = prometheus._MultiprocessWriter(server)
        writer.flush()
        unchanged = best(writer.flush, 500)  # nothing changed since: compares only

        def changed() -> None:
            variant.run(1)
            writer.flush()

        flush = best(changed, 200) - best(lambda: variant.run(1), 200)
        # A second worker's files: the same counts under another pid.
        for path in Path(directory).glob(f"*_{os.getpid()}.db"):
            shutil.copy(path, path.with_name(path.name.replace(str(os.getpid()), "1")))
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=directory)
        multi = best(lambda: generate_latest(merged), 100)
    finally:
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)
    rows: list[list[object]] = [
        ["scrape, one process (collector + process_*)", f"{single * 1e6:,.0f}", size],
        ["scrape, two workers' files merged", f"{multi * 1e6:,.0f}", ""],
        ["worker flush, nothing changed", f"{unchanged * 1e6:,.0f}", ""],
        ["worker flush after a message (the message's own cost taken off)", f"{flush * 1e6:,.0f}"],
    ]
    rows[-1].append("")
    per_message = single / rate
    label = f"one scrape a second at {rate:,.0f} msg/s, per message"
    rows.append([label, f"{per_message * 1e6:.2f}", ""])
    data = {
        "scrape_single_us": single * 1e6,
        "scrape_bytes": size,
        "scrape_two_workers_us": multi * 1e6,
        "flush_unchanged_us": unchanged * 1e6,
        "flush_after_message_us": flush * 1e6,
    }
    return rows, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--rate", type=float, default=5000.0, help="msg/s for the per-message scrape cost"
    )
    parser.add_argument("--json", default=str(RESULTS / "metrics.json"))
    args = parser.parse_args()
    print(f"core: {IMPLEMENTATION}; {args.messages} messages x {args.rounds} rounds per variant")
    rows, session_data = session_costs(args.messages, args.rounds)
    print("\nSession CPU per 1 KiB message (persistent session, sink handler, no network)")
    headers = ["variant", "us/msg (median)", "min..max", "added us", "added"]
    print(format_table(headers, rows))
    rows, scrape_data = scrape_costs(args.rate)
    print("\nThe exporter (CPU per operation)")
    print(format_table(["operation", "us", "bytes"], rows))
    write_json(
        args.json,
        {
            "benchmark": "metrics",
            "machine": machine_info(),
            "implementation": IMPLEMENTATION,
            "messages": args.messages,
            "rounds": args.rounds,
            "session_us_per_message": session_data,
            "exporter": scrape_data,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
