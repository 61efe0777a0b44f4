"""Parser benchmark: DataReader and LineReader throughput, compiled vs pure twin vs memcpy.

Run from the repository root (after ``pip install -e ".[bench]"``, which builds the extension)::

    python benchmarks/parser.py                 # full: 50 MiB bodies, best of 5
    python benchmarks/parser.py --quick         # 8 MiB bodies, best of 3
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
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import time
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB bodies, best of 3")
    parser.add_argument("--size-mib", type=float, help="body size in MiB (default 50, quick 8)")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 5, quick 3)")
    parser.add_argument("--json", default=str(RESULTS / "parser.json"), help="results file")
    args = parser.parse_args()
    size = int((args.size_mib or (8 if args.quick else 50)) * MiB)
    repeat = args.repeat or (3 if args.quick else 5)

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
    print(f"body size {size / MiB:g} MiB, best of {repeat}, implementations: {', '.join(impls)}")

    data_results: list[Result] = []
    for name, make in BODIES.items():
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

    stream = command_stream(size // 3)
    n_lines = stream.count(b"\r\n")
    print(f"  LineReader commands: {len(stream) / MiB:.1f} MiB, {n_lines} lines")
    line_results: list[Result] = []
    cases: list[tuple[str, Chunks]] = [(f"{r // KiB} KiB", chunked(stream, r)) for r in READ_SIZES]
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

    print("\nDataReader: dot-stuffed body + <CRLF>.<CRLF>, fresh reader per run")
    print(table(data_results, impls))
    print("\nLineReader: pipelined command lines")
    print(table(line_results, impls, lines=True))
    wrong = [r for r in data_results + line_results if r.verified is False]
    if wrong:
        print("\nWRONG OUTPUT (the reader's output differs from the input):")
        for r in wrong:
            print(f"  {r.reader} {r.impl} {r.data} {r.read_size}")
    write_json(
        args.json,
        {
            "benchmark": "parser",
            "machine": machine_info(),
            "body_size": size,
            "repeat": repeat,
            "notes": notes,
            "results": [asdict(r) for r in data_results + line_results],
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
