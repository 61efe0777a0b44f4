"""Parser benchmark: DataReader and LineReader throughput, compiled vs pure twin vs memcpy;
``scan_path`` against ``commands.parse_command``, in ns per call.

Run from the repository root (after ``pip install -e ".[bench]"``, which builds the extension)::

    python benchmarks/parser.py                 # full: 50 MiB bodies, best of 5
    python benchmarks/parser.py --quick         # 8 MiB bodies, best of 3
    python benchmarks/parser.py --only scan_path   # one section (data, lines, scan_path)
    python benchmarks/parser.py --json /tmp/parser.json

Both implementations are imported directly (``alephsmtp._parser`` and ``alephsmtp._parser_py``),
whatever ``ALEPHSMTP_NO_EXTENSIONS`` says; the compiled one is skipped with a note if it is not
built. The reference is a memcpy: the same bytes, in the same read sizes, copied into a
preallocated ``bytearray`` (``buf[:n] = view[i:i + n]``), the least any reader must do.

DataReader gets a fresh reader per run, fed the dot-stuffed body plus ``.<CRLF>`` (the body
ends in CRLF, so the stream ends in ``<CRLF>.<CRLF>``) in 16, 64 and 256 KiB reads, like the
reads of a session; its output is checked once per case, outside the timing, against the
unstuffed body. Bodies: (a) plain ASCII, 76-character lines, 1.5% starting with a dot;
(b) 8-bit text, mostly multi-byte UTF-8; (c) short lines (0-12 characters). LineReader gets
pipelined command lines (MAIL, RCPTs, RSET/NOOP/...), in the same read sizes and in reads of
one RFC 2920 group each (what a server really reads). Every figure is the best (least) time of
several runs, with the garbage collector off. GB/s are 10^9 input bytes per second.

``scan_path`` is timed on typical MAIL and RCPT arguments (as ``split_command`` returns them)
in both cores, alone and after ``split_command`` of the whole line (the two calls a session
makes), against ``commands.parse_command`` of the whole line (what it replaces for a simple
path: the verb, the path and the parameters, into a ``MailCommand``/``RcptCommand``); and on two
arguments it declines (``<>``, ``<Postmaster>``), where the caller falls back to
``parse_command``. A tuple still leaves the caller the parameters (``rest``) and the command
object to make, so the ratio is an upper bound of the saving, not the saving. ns per call: the
best of 9 x ``--repeat`` short runs of a ``timeit`` loop (``--calls`` calls each, GC off: short
runs so that some go undisturbed on a shared machine), divided by the calls; the loop's own
cost (an empty statement) is printed with the table and included in every figure. The results are
checked outside the timing: both cores agree, and a tuple names the address and parameters
``parse_command`` reads.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from _common import (
    RESULTS,
    KiB,
    MiB,
    ascii_body,
    command_stream,
    dot_stuff,
    format_table,
    machine_info,
    run_main,
    short_lines_body,
    utf8_body,
    write_json,
)

from alephsmtp.addresses import parse_parameters
from alephsmtp.commands import MailCommand, RcptCommand, parse_command

READ_SIZES = (16 * KiB, 64 * KiB, 256 * KiB)
BODIES: dict[str, Callable[[int], bytes]] = {
    "ascii-76": ascii_body,
    "utf8-8bit": utf8_body,
    "short-lines": short_lines_body,
}

Chunks = list[memoryview]


@dataclass
class Result:
    reader: str  # "DataReader" or "LineReader"
    data: str  # the body or stream
    read_size: str  # "64 KiB", or "group" for one command group per read
    impl: str  # "memcpy", "cython" or "python"
    bytes: int
    best_s: float
    gb_per_s: float
    pct_of_memcpy: float | None = None
    lines_per_s: float | None = None
    verified: bool | None = None


def chunked(data: bytes, size: int) -> Chunks:
    """``data`` cut into ``size``-byte reads (memoryviews, no copies)."""
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(data), size)]


def best_time(run: Callable[[], object], repeat: int) -> float:
    """The least wall time of ``repeat`` runs, with the garbage collector off."""
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def memcpy_run(chunks: Chunks, size: int) -> Callable[[], None]:
    """The reference: copy every read into one preallocated buffer."""
    buf = bytearray(size)

    def run() -> None:
        for chunk in chunks:
            buf[: len(chunk)] = chunk

    return run


def data_run(module: ModuleType, chunks: Chunks) -> Callable[[], None]:
    """A fresh DataReader fed every read; its output is dropped (checked elsewhere)."""
    reader_class = module.DataReader

    def run() -> None:
        feed = reader_class().feed
        for chunk in chunks:
            feed(chunk)

    return run


def line_run(module: ModuleType, chunks: Chunks) -> Callable[[], None]:
    """A fresh LineReader fed every read; its lines are dropped (checked elsewhere)."""
    reader_class = module.LineReader

    def run() -> None:
        feed = reader_class().feed
        for chunk in chunks:
            feed(chunk)

    return run


def check_data(module: ModuleType, chunks: Chunks, body: bytes) -> bool:
    """The output equals the unstuffed body, and the end mark was found at the very end."""
    reader = module.DataReader()
    out = b"".join([reader.feed(chunk) for chunk in chunks])
    return out == body and reader.done and reader.trailing == b"" and reader.error is None


def check_lines(module: ModuleType, chunks: Chunks, stream: bytes) -> bool:
    """The lines, joined with CRLF, give back the stream; no errors, nothing left held."""
    reader = module.LineReader()
    lines: list[Any] = []
    for chunk in chunks:
        lines.extend(reader.feed(chunk))
    if not all(isinstance(line, bytes) for line in lines):
        return False
    return b"".join(line + b"\r\n" for line in lines) == stream and reader.pending == 0


def measure(
    reader: str,
    data_name: str,
    read_name: str,
    chunks: Chunks,
    total: int,
    implementations: dict[str, ModuleType],
    repeat: int,
    verify: Callable[[ModuleType, Chunks], bool],
    make_run: Callable[[ModuleType, Chunks], Callable[[], None]],
    n_lines: int | None = None,
) -> list[Result]:
    """memcpy, then each implementation, on the same reads."""
    largest = max(len(c) for c in chunks)
    ref = best_time(memcpy_run(chunks, largest), repeat)
    results = [Result(reader, data_name, read_name, "memcpy", total, ref, total / ref / 1e9, 100.0)]
    for impl, module in implementations.items():
        ok = verify(module, chunks)
        seconds = best_time(make_run(module, chunks), repeat)
        result = Result(reader, data_name, read_name, impl, total, seconds, total / seconds / 1e9)
        result.pct_of_memcpy = 100.0 * ref / seconds
        result.verified = ok
        if n_lines:
            result.lines_per_s = n_lines / seconds
        results.append(result)
    return results


def group_chunks(stream: bytes) -> Chunks:
    """One read per RFC 2920 group: the lines up to and including each RSET/NOOP/HELP/VRFY."""
    view = memoryview(stream)
    chunks: Chunks = []
    start = 0
    pos = 0
    for line in stream.split(b"\r\n")[:-1]:
        pos += len(line) + 2
        if not line.upper().startswith((b"MAIL", b"RCPT")):
            chunks.append(view[start:pos])
            start = pos
    if start < len(stream):
        chunks.append(view[start:])
    return chunks


def table(results: Sequence[Result], impls: Sequence[str], lines: bool = False) -> str:
    """One row per (data, read size): GB/s and % of memcpy per implementation, and the ratio."""
    headers = ["data", "read", "memcpy GB/s"]
    for impl in impls:
        headers += [f"{impl} GB/s", f"{impl} %memcpy"]
        if lines:
            headers.append(f"{impl} Mlines/s")
    if "cython" in impls and "python" in impls:
        headers.append("cython/python")
    rows = []
    keys = list(dict.fromkeys((r.data, r.read_size) for r in results))
    for data, read in keys:
        by_impl = {r.impl: r for r in results if (r.data, r.read_size) == (data, read)}
        row: list[object] = [data, read, f"{by_impl['memcpy'].gb_per_s:.2f}"]
        for impl in impls:
            r = by_impl[impl]
            flag = "" if r.verified else " WRONG OUTPUT"
            row += [f"{r.gb_per_s:.3f}{flag}", f"{r.pct_of_memcpy:.1f}%"]
            if lines:
                row.append(f"{(r.lines_per_s or 0) / 1e6:.2f}")
        if "cython" in by_impl and "python" in by_impl:
            row.append(f"{by_impl['python'].best_s / by_impl['cython'].best_s:.2f}x")
        rows.append(row)
    return format_table(headers, rows)


# --- scan_path ---------------------------------------------------------------------------

SCAN_LINES: tuple[tuple[str, bytes], ...] = (
    ("MAIL simple", b"MAIL FROM:<alice@example.org>"),
    ("MAIL + SIZE, BODY", b"MAIL FROM:<first.last@mail.example.com> SIZE=123456 BODY=8BITMIME"),
    ("RCPT simple", b"RCPT TO:<bob@example.net>"),
    ("RCPT + NOTIFY", b"RCPT TO:<bob.smith+tag@sub.example.co.uk> NOTIFY=SUCCESS,FAILURE"),
    # The RFC 5321 4.5.3.1 limits: a 64-octet local part, a 256-octet path.
    (
        "MAIL 256-octet path",
        b"MAIL FROM:<%s@%s.%s.%s>" % (b"l" * 64, b"d" * 63, b"e" * 63, b"f" * 61),
    ),
    ("MAIL <> (declined)", b"MAIL FROM:<> SIZE=1000"),
    ("RCPT <Postmaster> (declined)", b"RCPT TO:<Postmaster>"),
)
KEYWORDS = {b"MAIL": b"FROM:", b"RCPT": b"TO:"}


@dataclass
class ScanResult:
    case: str
    line: str
    impl: str  # "cython" or "python" (scan_path), or "commands" (parse_command)
    what: str  # "scan_path", "split_command+scan_path" or "parse_command"
    ns_per_call: float
    accepted: bool | None = None
    verified: bool | None = None


def ns_per_call(stmt: str, namespace: dict[str, Any], repeat: int, number: int) -> float:
    """The best of ``repeat`` timeit runs of ``number`` calls, in ns per call, GC off."""
    timer = timeit.Timer(stmt, globals=namespace)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def check_scan(implementations: dict[str, ModuleType], line: bytes) -> tuple[bool, bool]:
    """(accepted, verified): whether scan_path gives a tuple; whether every core gives the same
    result and, for a tuple, ``parse_command`` reads the same address and parameters."""
    verb, argument = implementations["python"].split_command(line)
    found = [module.scan_path(argument, KEYWORDS[verb]) for module in implementations.values()]
    if found[0] is None:
        return False, all(result is None for result in found)
    command = parse_command(line)
    assert isinstance(command, MailCommand | RcptCommand)
    address = command.return_path if isinstance(command, MailCommand) else command.recipient_address
    local_part, domain, rest = found[0]
    return True, all(result == found[0] for result in found) and (
        (address.local_part, address.domain) == (local_part, domain)
        and dict(command.parameters) == parse_parameters(rest.decode("utf-8"))
    )


def measure_scan(
    implementations: dict[str, ModuleType], repeat: int, number: int
) -> tuple[list[ScanResult], float]:
    """Every line of SCAN_LINES: scan_path per core, split+scan per core, parse_command."""
    empty = ns_per_call("pass", {}, repeat, number)
    results: list[ScanResult] = []
    for case, line in SCAN_LINES:
        accepted, verified = check_scan(implementations, line)
        verb, argument = implementations["python"].split_command(line)
        namespace: dict[str, Any] = {
            "argument": argument,
            "keyword": KEYWORDS[verb],
            "line": line,
            "parse_command": parse_command,
        }
        text = line.decode()
        for impl, module in implementations.items():
            namespace["scan_path"] = module.scan_path
            namespace["split_command"] = module.split_command
            for what, stmt in (
                ("scan_path", "scan_path(argument, keyword)"),
                ("split_command+scan_path", "scan_path(split_command(line)[1], keyword)"),
            ):
                ns = ns_per_call(stmt, namespace, repeat, number)
                results.append(ScanResult(case, text, impl, what, ns, accepted, verified))
        ns = ns_per_call("parse_command(line)", namespace, repeat, number)
        results.append(ScanResult(case, text, "commands", "parse_command", ns, accepted, verified))
    return results, empty


def scan_table(results: Sequence[ScanResult], impls: Sequence[str]) -> str:
    """One row per line: ns per call of each way; for a simple path, how many times less the
    two calls take than parse_command, else what they add before the fallback to it."""
    headers = ["argument", "tuple?"]
    for impl in impls:
        headers += [f"scan {impl}", f"split+scan {impl}"]
    headers += ["parse_command", f"split+scan {impls[0]} vs parse_command"]
    rows = []
    for case in dict.fromkeys(r.case for r in results):
        by = {(r.impl, r.what): r for r in results if r.case == case}
        first = by[("commands", "parse_command")]
        flag = "" if first.verified else " WRONG"
        row: list[object] = [case, ("yes" if first.accepted else "no") + flag]
        for impl in impls:
            row += [
                f"{by[(impl, 'scan_path')].ns_per_call:.0f}",
                f"{by[(impl, 'split_command+scan_path')].ns_per_call:.0f}",
            ]
        fast = by[(impls[0], "split_command+scan_path")].ns_per_call
        if first.accepted:  # instead of parse_command: how many times less
            versus = f"{first.ns_per_call / fast:.1f}x less"
        else:  # declined: spent before the fallback to parse_command
            versus = f"+{fast:.0f} ns (+{100 * fast / first.ns_per_call:.0f}%) first"
        row += [f"{first.ns_per_call:.0f}", versus]
        rows.append(row)
    return format_table(headers, rows)


SECTIONS = ("data", "lines", "scan_path")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB bodies, best of 3")
    parser.add_argument("--size-mib", type=float, help="body size in MiB (default 50, quick 8)")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 5, quick 3)")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run this section only (repeatable)"
    )
    parser.add_argument("--calls", type=int, help="scan_path: calls per timed run (default 20000)")
    parser.add_argument("--json", default=str(RESULTS / "parser.json"), help="results file")
    args = parser.parse_args()
    size = int((args.size_mib or (8 if args.quick else 50)) * MiB)
    repeat = args.repeat or (3 if args.quick else 5)
    calls = args.calls or 20_000
    sections = args.only or list(SECTIONS)

    implementations: dict[str, ModuleType] = {}
    notes: list[str] = []
    try:
        implementations["cython"] = importlib.import_module("alephsmtp._parser")
    except ImportError as error:
        notes.append(f"compiled core not built ({error}): only the pure twin is measured")
    implementations["python"] = importlib.import_module("alephsmtp._parser_py")
    impls = list(implementations)
    for note in notes:
        print(f"note: {note}")
    print(
        f"sections {', '.join(sections)}; body size {size / MiB:g} MiB, best of {repeat}, "
        f"implementations: {', '.join(impls)}"
    )

    data_results: list[Result] = []
    for name, make in BODIES.items() if "data" in sections else ():
        body = make(size)
        wire = dot_stuff(body) + b".\r\n"
        dots = body.count(b"\r\n.") + body.startswith(b".")
        n_body_lines = body.count(b"\n")
        print(
            f"  DataReader {name}: {len(wire) / MiB:.1f} MiB on the wire, "
            f"{n_body_lines} lines, {dots} dot lines"
        )
        for read_size in READ_SIZES:
            chunks = chunked(wire, read_size)
            data_results += measure(
                "DataReader",
                name,
                f"{read_size // KiB} KiB",
                chunks,
                len(wire),
                implementations,
                repeat,
                functools.partial(check_data, body=body),
                data_run,
            )

    line_results: list[Result] = []
    if "lines" in sections:
        stream = command_stream(size // 3)
        n_lines = stream.count(b"\r\n")
        print(f"  LineReader commands: {len(stream) / MiB:.1f} MiB, {n_lines} lines")
        cases: list[tuple[str, Chunks]] = [
            (f"{r // KiB} KiB", chunked(stream, r)) for r in READ_SIZES
        ]
        groups = group_chunks(stream)
        cases.append((f"group (~{len(stream) // len(groups)} B)", groups))
        for read_name, chunks in cases:
            line_results += measure(
                "LineReader",
                "commands",
                read_name,
                chunks,
                len(stream),
                implementations,
                repeat,
                functools.partial(check_lines, stream=stream),
                line_run,
                n_lines,
            )

    scan_results: list[ScanResult] = []
    empty_ns = None
    if "scan_path" in sections:
        print(f"  scan_path: {len(SCAN_LINES)} lines, best of {9 * repeat} runs of {calls} calls")
        scan_results, empty_ns = measure_scan(implementations, 9 * repeat, calls)

    if data_results:
        print("\nDataReader: dot-stuffed body + <CRLF>.<CRLF>, fresh reader per run")
        print(table(data_results, impls))
    if line_results:
        print("\nLineReader: pipelined command lines")
        print(table(line_results, impls, lines=True))
    if scan_results:
        print(
            f"\nscan_path on MAIL/RCPT arguments vs parse_command of the line, ns per call "
            f"(timeit loop overhead, included: {empty_ns:.0f} ns)"
        )
        print(scan_table(scan_results, impls))
    wrong = [
        f"{r.reader} {r.impl} {r.data} {r.read_size}"
        for r in data_results + line_results
        if r.verified is False
    ]
    wrong += [f"scan_path {r.case}" for r in scan_results if r.verified is False]
    if wrong:
        print("\nWRONG OUTPUT (a reader's output differs from its input; or scan_path differs")
        print("between the cores, or from the address and parameters parse_command reads):")
        for line in dict.fromkeys(wrong):
            print(f"  {line}")
    write_json(
        args.json,
        {
            "benchmark": "parser",
            "machine": machine_info(),
            "sections": sections,
            "body_size": size,
            "repeat": repeat,
            "notes": notes,
            "results": [asdict(r) for r in data_results + line_results],
            "scan_path": {
                "calls_per_run": calls,
                "runs": 9 * repeat,
                "empty_loop_ns": empty_ns,
                "results": [asdict(r) for r in scan_results],
            },
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
