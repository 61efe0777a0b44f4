"""End-to-end server benchmark: messages/s, MB/s and server CPU per message, over loopback.

Run from the repository root (after ``pip install -e ".[bench]"``)::

    python benchmarks/server.py                       # full run (about 2 minutes a round)
    python benchmarks/server.py --quick               # smoke run, under a minute
    python benchmarks/server.py --servers alephsmtp,aiosmtpd --loadgen python
    python benchmarks/server.py --json /tmp/server.json --repeat 3

Every server runs as its own process on 127.0.0.1, on a free port below the ephemeral range,
with a sink handler (accept and discard): alephsmtp with the compiled core on asyncio and on
uvloop, alephsmtp with the pure-Python twin (``ALEPHSMTP_NO_EXTENSIONS=1``), each of them again
with metrics on (``alephsmtp-metrics-...``: the Prometheus endpoint and latency histograms,
scraped once a second; ``--servers alephsmtp-cython-asyncio,alephsmtp-metrics-cython-asyncio``
runs one pair), aiosmtpd on
asyncio and on uvloop (``benchmarks/_servers.py``), the same aiosmtpd program on alephsmtp's
aiosmtpd layer (``aiosmtpd-compat``: only its import line differs), and Postfix's ``smtp-sink``
when it is installed (Debian package ``postfix``; skipped with a note otherwise).

The load generator is Postfix's ``smtp-source`` when installed (``--loadgen auto``; C, light,
but it does not pipeline: one round trip per command) or the bundled asyncio client
``benchmarks/_loadclient.py`` (``--loadgen python``; pipelines MAIL/RCPT/DATA per RFC 2920,
and the message with the next group). Both send the same message files and are bounded in
messages and in time.

Scenarios: 1 KiB messages on persistent sessions; 1 KiB, one message per connection; 100 KiB
messages with many (25%) dot-stuffed lines; 10 MiB messages. Server CPU seconds (utime +
stime of the server process, ``/proc/<pid>/stat``) are read before and after each scenario:
CPU per message is the stable figure on a shared machine, where wall-clock rates are noisy.
Ratios are paired within one run. With ``--repeat N`` each figure is the best of N rounds.
Results go to ``--json`` (default ``benchmarks/results/server.json``); server stderr logs
(any warning or traceback) go beside it, to ``<server>.stderr.log``.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import (
    HERE,
    RESULTS,
    KiB,
    MiB,
    ServerProcess,
    ServerSpec,
    all_servers,
    cpu_seconds,
    distinct_counts,
    format_table,
    machine_info,
    message_size,
    message_text,
    postfix_tool,
    ratio,
    run_main,
    select_servers,
    server_cleanup,
    status_kib,
    write_json,
)

BASELINE = "alephsmtp-cython-asyncio"


def with_metrics(specs: list[ServerSpec]) -> list[ServerSpec]:
    """Each alephsmtp server followed by the same with its Prometheus endpoint on (latency
    histograms included) and scraped once a second (``_servers.py alephsmtp-metrics``)."""
    out: list[ServerSpec] = []
    for spec in specs:
        out.append(spec)
        if spec.kind == "alephsmtp":
            name = spec.name.replace("alephsmtp-", "alephsmtp-metrics-")
            out.append(ServerSpec(name, "alephsmtp-metrics", spec.loop, spec.pure))
    return out


def with_compat(specs: list[ServerSpec]) -> list[ServerSpec]:
    """Each aiosmtpd server followed by the same program on alephsmtp.compat.aiosmtpd."""
    out: list[ServerSpec] = []
    for spec in specs:
        out.append(spec)
        if spec.kind == "aiosmtpd":
            out.append(
                ServerSpec(
                    spec.name.replace("aiosmtpd", "aiosmtpd-compat"), "aiosmtpd-compat", spec.loop
                )
            )
    return out


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    size: int
    dot_share: float
    persistent: bool
    sessions: int
    messages: int
    quick_messages: int


SCENARIOS = (
    Scenario("1k-persistent", "1 KiB, persistent sessions", KiB, 0.02, True, 10, 50000, 2000),
    Scenario("1k-per-connection", "1 KiB, one per connection", KiB, 0.02, False, 10, 10000, 400),
    Scenario("100k-dots", "100 KiB, 25% dot lines", 100 * KiB, 0.25, True, 4, 5000, 200),
    Scenario("10m", "10 MiB messages", 10 * MiB, 0.015, True, 2, 60, 6),
)  # fmt: skip


@dataclass
class Run:
    """One scenario against one server."""

    server: str
    scenario: str
    loadgen: str
    messages: int = 0  # accepted by the server
    bytes: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    cpu_us_per_msg: float | None = None
    server_cpu_pct: float = 0.0  # of one core, over the scenario's wall time
    client_cpu_pct: float = 0.0  # the load generator's, likewise (is the client the limit?)
    rss_kib_after: int = 0
    errors: list[str] = field(default_factory=list)
    server_stderr: str = ""

    def finish(self, size: int) -> None:
        self.bytes = self.messages * size
        if self.elapsed > 0 and self.messages:
            self.msgs_per_s = self.messages / self.elapsed
            self.mb_per_s = self.bytes / self.elapsed / 1e6
            self.server_cpu_pct = 100 * self.cpu / self.elapsed
        if self.messages:
            self.cpu_us_per_msg = self.cpu / self.messages * 1e6


@dataclass
class LoadResult:
    accepted: int
    elapsed: float
    errors: list[str]
    cpu: float | None = None  # the client's CPU over the run, when it measures it itself


def run_smtp_source(
    port: int, path: Path, scenario: Scenario, count: int, time_limit: float
) -> LoadResult:
    """Postfix's smtp-source; killed past ``time_limit`` (its counter says what got through)."""
    source = postfix_tool("smtp-source")
    assert source is not None
    command = [source, "-c", "-s", str(scenario.sessions), "-m", str(count)]
    if scenario.persistent:
        command.append("-d")
    command += ["-M", "bench.example", "-f", "sender@example.org", "-t", "rcpt@example.net"]
    command += ["-F", str(path), f"127.0.0.1:{port}"]
    errors: list[str] = []
    start = time.monotonic()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as proc:
        try:
            out, err = proc.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            errors.append(f"smtp-source still running after {time_limit:g} s: killed (hang?)")
        elapsed = time.monotonic() - start
        if proc.returncode:
            errors.append(f"smtp-source exited with status {proc.returncode}")
    errors += [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    counters = re.findall(rb"\d+", out)
    accepted = int(counters[-1]) if counters else 0
    return LoadResult(accepted, elapsed, errors)


def run_python_client(
    port: int, path: Path, scenario: Scenario, count: int, time_limit: float
) -> LoadResult:
    """The bundled pipelining client, in its own process (it stops itself at ``time_limit``)."""
    command = [sys.executable, str(HERE / "_loadclient.py"), "--port", str(port)]
    command += ["--message-file", str(path), "--messages", str(count)]
    command += ["--sessions", str(scenario.sessions), "--timeout", str(time_limit)]
    if scenario.persistent:
        command.append("--persistent")
    try:
        proc = subprocess.run(
            command, capture_output=True, timeout=time_limit + 60, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return LoadResult(0, time_limit, ["load client did not stop: killed"])
    if proc.returncode:
        tail = proc.stderr.decode("utf-8", "replace")[-2000:]
        return LoadResult(0, 0.0, [f"load client failed ({proc.returncode}): {tail}"])
    result = json.loads(proc.stdout)
    errors = list(result["errors"])
    if result["error_count"] > len(errors):
        errors.append(f"... {result['error_count']} errors in all")
    if result["timed_out"]:
        errors.append(f"time limit of {time_limit:g} s reached; {result['sent']} sent")
    return LoadResult(result["accepted"], result["elapsed"], errors, result["cpu"])


def children_cpu() -> float:
    """CPU seconds of the waited-for children (the load generators; servers are reaped last)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


LOADGENS = {"smtp-source": run_smtp_source, "python": run_python_client}


def bench_server(
    spec: ServerSpec,
    scenarios: list[Scenario],
    files: dict[str, tuple[Path, int]],
    loadgen: str,
    quick: bool,
    time_limit: float,
    log_dir: Path,
) -> list[Run]:
    """Start ``spec``, warm it up, run every scenario, stop it."""
    runs: list[Run] = []
    load = LOADGENS[loadgen]
    with ServerProcess(spec, log_dir) as server:
        print(f"  {spec.name} (pid {server.pid}, port {server.port}, {server.implementation})")
        warm_path = files["1k-persistent"][0]
        warm = load(server.port, warm_path, SCENARIOS[0], 200, 30.0)
        if warm.errors:
            print(f"    warm-up: {warm.errors[0]}")
        for scenario in scenarios:
            path, size = files[scenario.key]
            count = scenario.quick_messages if quick else scenario.messages
            log_offset = len(server.stderr_text())
            cpu_before = cpu_seconds(server.pid)
            client_before = children_cpu()
            result = load(server.port, path, scenario, count, time_limit)
            client_cpu = children_cpu() - client_before if result.cpu is None else result.cpu
            alive = server.proc is not None and server.proc.poll() is None
            run = Run(spec.name, scenario.key, loadgen)
            run.messages = result.accepted
            run.elapsed = result.elapsed
            run.errors = result.errors
            if alive:
                run.cpu = cpu_seconds(server.pid) - cpu_before
                run.rss_kib_after = status_kib(server.pid, "VmRSS")
            else:
                run.errors.append("the server process died")
            run.server_stderr = server.stderr_text()[log_offset:]
            run.finish(size)
            if run.elapsed > 0 and run.messages:
                run.client_cpu_pct = 100 * client_cpu / run.elapsed
            runs.append(run)
            cpu = f"{run.cpu_us_per_msg:.0f} us/msg" if run.cpu_us_per_msg else "-"
            print(
                f"    {scenario.key:<18} {run.messages:>6} msgs {run.msgs_per_s:>9.0f} msg/s "
                f"{run.mb_per_s:>8.1f} MB/s  {cpu:>12}"
                + ("  ERRORS" if run.errors or run.server_stderr else "")
            )
            if not alive:
                break
    return runs


def best_of(runs: list[Run]) -> Run:
    """The best figures of repeated runs: highest rate, lowest CPU per message."""
    best = max(runs, key=lambda r: r.msgs_per_s)
    merged = Run(**{k: v for k, v in asdict(best).items() if k != "errors"})
    merged.errors = [e for r in runs for e in r.errors]
    merged.server_stderr = "".join(r.server_stderr for r in runs)
    cpus = [r.cpu_us_per_msg for r in runs if r.cpu_us_per_msg]
    merged.cpu_us_per_msg = min(cpus) if cpus else None
    return merged


def report(
    scenarios: list[Scenario],
    runs: dict[tuple[str, str], Run],
    names: list[str],
    rounds: dict[tuple[str, str], list[Run]] | None = None,
) -> str:
    out: list[str] = []
    for scenario in scenarios:
        base = runs.get((BASELINE, scenario.key))
        rows = []
        for name in names:
            run = runs.get((name, scenario.key))
            if run is None:
                continue
            rows.append(
                [
                    name,
                    run.messages,
                    f"{run.msgs_per_s:,.0f}",
                    f"{run.mb_per_s:,.1f}",
                    f"{run.cpu_us_per_msg:,.0f}" if run.cpu_us_per_msg else "-",
                    ratio(run.cpu_us_per_msg, base.cpu_us_per_msg) if base else "-",
                    ratio(run.msgs_per_s, base.msgs_per_s) if base else "-",
                    f"{run.server_cpu_pct:.0f}%" if run.messages else "-",
                    f"{run.client_cpu_pct:.0f}%" if run.messages else "-",
                    "yes" if run.errors or run.server_stderr else "",
                ]
            )
        headers = ["server", "msgs", "msg/s", "MB/s", "CPU us/msg", "CPU vs base"]
        headers += ["msg/s vs base", "server CPU", "client CPU", "errors"]
        out.append(f"\n{scenario.title} ({scenario.key}; base = {BASELINE})")
        out.append(format_table(headers, rows))
    pairs = [
        ("pure / compiled", "alephsmtp-pure-asyncio", "alephsmtp-cython-asyncio"),
        ("aiosmtpd / alephsmtp, asyncio", "aiosmtpd-asyncio", "alephsmtp-cython-asyncio"),
        ("aiosmtpd / alephsmtp, uvloop", "aiosmtpd-uvloop", "alephsmtp-cython-uvloop"),
        (
            "aiosmtpd / its program on compat, asyncio",
            "aiosmtpd-asyncio",
            "aiosmtpd-compat-asyncio",
        ),
        ("aiosmtpd / its program on compat, uvloop", "aiosmtpd-uvloop", "aiosmtpd-compat-uvloop"),
        ("compat / alephsmtp, asyncio", "aiosmtpd-compat-asyncio", "alephsmtp-cython-asyncio"),
        ("asyncio / uvloop, alephsmtp", "alephsmtp-cython-asyncio", "alephsmtp-cython-uvloop"),
        (
            "metrics on / off, asyncio",
            "alephsmtp-metrics-cython-asyncio",
            "alephsmtp-cython-asyncio",
        ),
        ("metrics on / off, uvloop", "alephsmtp-metrics-cython-uvloop", "alephsmtp-cython-uvloop"),
        ("metrics on / off, pure", "alephsmtp-metrics-pure-asyncio", "alephsmtp-pure-asyncio"),
        ("alephsmtp asyncio / smtp-sink", "alephsmtp-cython-asyncio", "postfix-smtp-sink"),
        ("alephsmtp uvloop / smtp-sink", "alephsmtp-cython-uvloop", "postfix-smtp-sink"),
        ("alephsmtp asyncio / floor", "alephsmtp-cython-asyncio", "floor-asyncio"),
        ("alephsmtp uvloop / floor", "alephsmtp-cython-uvloop", "floor-uvloop"),
    ]
    rows = []
    for label, a, b in pairs:
        row: list[object] = [label]
        for scenario in scenarios:
            ra, rb = runs.get((a, scenario.key)), runs.get((b, scenario.key))
            row.append(ratio(ra.cpu_us_per_msg, rb.cpu_us_per_msg) if ra and rb else "-")
        rows.append(row)
    out.append("\nServer CPU per message, paired ratios (above 1: the first uses more CPU)")
    out.append(format_table(["pair", *(s.key for s in scenarios)], rows))
    rows = []
    for name in names:
        if "-metrics-" not in name:
            continue
        off = name.replace("alephsmtp-metrics-", "alephsmtp-")
        for scenario in scenarios:
            on_run, off_run = runs.get((name, scenario.key)), runs.get((off, scenario.key))
            if not (on_run and off_run and on_run.cpu_us_per_msg and off_run.cpu_us_per_msg):
                continue
            added = on_run.cpu_us_per_msg / off_run.cpu_us_per_msg - 1
            # Each round runs off, then on, back to back: the ratio of a pair sees the same
            # neighbours on a shared machine; its median over the rounds is the steady figure.
            pairs = zip(
                (rounds or {}).get((off, scenario.key), []),
                (rounds or {}).get((name, scenario.key), []),
                strict=False,
            )
            ratios = sorted(
                b.cpu_us_per_msg / a.cpu_us_per_msg - 1
                for a, b in pairs
                if a.cpu_us_per_msg and b.cpu_us_per_msg
            )
            paired = "-"
            if ratios:
                median = statistics.median(ratios)
                paired = (
                    f"{100 * median:+.1f}% ({100 * ratios[0]:+.0f}%..{100 * ratios[-1]:+.0f}%"
                    f", {len(ratios)})"
                )
            rows.append(
                [
                    off,
                    scenario.key,
                    f"{off_run.cpu_us_per_msg:,.1f}",
                    f"{on_run.cpu_us_per_msg:,.1f}",
                    f"{100 * added:+.1f}%",
                    paired,
                ]
            )
    if rows:
        out.append("\nMetrics on / off: server CPU per message (endpoint scraped once a second)")
        headers = ["server", "scenario", "off us/msg", "on us/msg", "added (best)"]
        headers.append("added, paired rounds: median (min..max, rounds)")
        out.append(format_table(headers, rows))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--loadgen", choices=["auto", "smtp-source", "python"], default="auto")
    parser.add_argument("--servers", help="comma-separated name filters, e.g. alephsmtp,sink")
    parser.add_argument("--scenarios", help="comma-separated scenario keys (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the best figure is kept")
    parser.add_argument("--time-limit", type=float, help="seconds per scenario (default 60/15)")
    parser.add_argument("--json", default=str(RESULTS / "server.json"), help="results file")
    args = parser.parse_args()

    loadgen = args.loadgen
    have_source = postfix_tool("smtp-source") is not None
    if loadgen == "auto":
        loadgen = "smtp-source" if have_source else "python"
    elif loadgen == "smtp-source" and not have_source:
        parser.error("smtp-source is not installed (Debian package postfix)")
    specs, notes = all_servers()
    specs = select_servers(with_metrics(with_compat(specs)), args.servers)
    scenarios = list(SCENARIOS)
    if args.scenarios:
        keys = {k.strip() for k in args.scenarios.split(",")}
        scenarios = [s for s in SCENARIOS if s.key in keys]
    time_limit = args.time_limit or (15.0 if args.quick else 60.0)
    log_dir = Path(args.json).resolve().parent
    if loadgen == "python" and not have_source:
        notes.append("smtp-source is not installed: the bundled Python load client is used")
    for note in notes:
        print(f"note: {note}")
    print(f"load generator: {loadgen}; servers: {', '.join(s.name for s in specs)}")

    all_runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="alephsmtp-bench-") as tmp, server_cleanup():
        files: dict[str, tuple[Path, int]] = {}
        for scenario in SCENARIOS:
            text = message_text(scenario.size, scenario.dot_share)
            path = Path(tmp) / f"{scenario.key}.txt"
            path.write_text(text, encoding="utf-8")
            files[scenario.key] = (path, message_size(text))
        for round_ in range(args.repeat):
            print(f"\nround {round_ + 1} of {args.repeat}")
            for spec in specs:
                try:
                    runs = bench_server(
                        spec, scenarios, files, loadgen, args.quick, time_limit, log_dir
                    )
                except RuntimeError as error:
                    print(f"    {spec.name}: {error}")
                    continue
                for run in runs:
                    all_runs.setdefault((run.server, run.scenario), []).append(run)

    best = {key: best_of(runs) for key, runs in all_runs.items()}
    names = [s.name for s in specs]
    print(report(scenarios, best, names, all_runs))
    problems = [r for r in best.values() if r.errors or r.server_stderr]
    if problems:
        print("\nErrors and server stderr output:")
        for run in problems:
            print(f"  {run.server} / {run.scenario}:")
            for text in distinct_counts(run.errors)[:10]:
                print(f"    client: {text}")
            stderr = run.server_stderr.splitlines()
            for line in stderr[:20]:
                print(f"    server: {line}")
            if len(stderr) > 20:
                tracebacks = sum(line.startswith("Traceback") for line in stderr)
                print(f"    server: ... {len(stderr)} lines in all, {tracebacks} tracebacks")
    write_json(
        args.json,
        {
            "benchmark": "server",
            "machine": machine_info(),
            "loadgen": loadgen,
            "quick": args.quick,
            "repeat": args.repeat,
            "notes": notes,
            "scenarios": [asdict(s) for s in scenarios],
            "runs": [asdict(r) for r in best.values()],
            "all_runs": [asdict(r) for runs in all_runs.values() for r in runs],
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
