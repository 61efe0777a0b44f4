"""Memory per idle connection: server RSS with 2,000 idle SMTP connections, per server.

Run from the repository root (after ``pip install -e ".[bench]"``)::

    python benchmarks/memory.py                     # 2,000 connections per server
    python benchmarks/memory.py --connections 500 --servers alephsmtp
    python benchmarks/memory.py --json /tmp/memory.json

Each server (the same set as ``server.py``: alephsmtp compiled on asyncio and uvloop, the pure
twin, aiosmtpd on asyncio and uvloop, Postfix ``smtp-sink`` when installed) runs as its own
process on 127.0.0.1. The benchmark reads the server's VmRSS from ``/proc/<pid>/status`` after a
few warm-up sessions, opens ``--connections`` connections and reads each greeting, reads VmRSS
again, sends ``EHLO`` on every connection and reads each reply, reads VmRSS a third time, then
closes them all. It reports KiB per connection after the greeting and after the EHLO. The open
files limit is raised as needed (``resource.setrlimit``); everything is bounded by timeouts.
Results go to ``--json`` (default ``benchmarks/results/memory.json``), each server's stderr
beside it (``<server>.stderr.log``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import (
    RESULTS,
    ServerProcess,
    ServerSpec,
    all_servers,
    distinct_counts,
    format_table,
    machine_info,
    raise_fd_limit,
    run_main,
    select_servers,
    server_cleanup,
    status_kib,
    write_json,
)

CONNECT_CONCURRENCY = 100  # connections being opened at once (the accept queue is not flooded)
STEP_TIMEOUT = 60.0  # seconds for all connections to get through one step
SETTLE = 1.0  # seconds to let the server finish its work before reading RSS


@dataclass
class Measurement:
    server: str
    implementation: str
    connections: int = 0
    rss_before_kib: int = 0
    rss_greeted_kib: int = 0
    rss_ehlo_kib: int = 0
    rss_closed_kib: int = 0
    kib_per_conn_greeted: float | None = None
    kib_per_conn_ehlo: float | None = None
    errors: list[str] = field(default_factory=list)
    server_stderr: str = ""


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (all lines of a multi-line one)."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, count: int, errors: list[str]) -> list[Connection]:
    """Open ``count`` connections and read each greeting."""
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> Connection:
        async with limit:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                greeting = await read_reply(reader)
            except BaseException:
                writer.close()
                raise
            if not greeting.startswith(b"220"):
                writer.close()
                raise ConnectionError(f"greeting {greeting!r}")
            return reader, writer

    results = await asyncio.wait_for(
        asyncio.gather(*(one() for _ in range(count)), return_exceptions=True), STEP_TIMEOUT
    )
    connections = []
    for result in results:
        if isinstance(result, BaseException):
            errors.append(f"connect: {result!r}")
        else:
            connections.append(result)
    return connections


async def ehlo_all(connections: list[Connection], errors: list[str]) -> None:
    """Send EHLO on every connection and read every reply."""

    async def one(connection: Connection) -> None:
        reader, writer = connection
        writer.write(b"EHLO client.example\r\n")
        reply = await read_reply(reader)
        if not reply.startswith(b"250"):
            raise ConnectionError(f"EHLO reply {reply!r}")

    results = await asyncio.wait_for(
        asyncio.gather(*(one(c) for c in connections), return_exceptions=True), STEP_TIMEOUT
    )
    errors += [f"EHLO: {r!r}" for r in results if isinstance(r, BaseException)]


async def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(w.wait_closed() for _, w in connections), return_exceptions=True),
            STEP_TIMEOUT,
        )


async def warm_up(port: int) -> None:
    """A few whole sessions, so imports and first-use allocations are not counted."""
    await asyncio.wait_for(_warm_up(port), STEP_TIMEOUT)


async def _warm_up(port: int) -> None:
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO client.example\r\nQUIT\r\n")
        await read_reply(reader)
        await read_reply(reader)
        writer.close()
        await writer.wait_closed()


async def measure(spec: ServerSpec, count: int, log_dir: Path) -> Measurement:
    """Start the server, take the three readings, stop it; errors are recorded, not raised."""
    with ServerProcess(spec, log_dir) as server:
        result = Measurement(spec.name, server.implementation)
        print(f"  {spec.name} (pid {server.pid}, port {server.port})")
        errors: list[str] = []
        try:
            # Each step has its own time limit; this bounds the whole in case of a bug here.
            await asyncio.wait_for(take_readings(server, count, result, errors), 8 * STEP_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as error:
            errors.append(f"failed: {error!r}")
        result.errors = distinct_counts(errors)
        result.server_stderr = server.stderr_text()
        if errors:
            print(f"    {len(errors)} errors")
        return result


async def take_readings(
    server: ServerProcess, count: int, result: Measurement, errors: list[str]
) -> None:
    pid = server.pid
    await warm_up(server.port)
    await asyncio.sleep(SETTLE)
    result.rss_before_kib = status_kib(pid)
    start = time.monotonic()
    connections = await open_idle(server.port, count, errors)
    try:
        result.connections = len(connections)
        await asyncio.sleep(SETTLE)
        result.rss_greeted_kib = status_kib(pid)
        opened = time.monotonic() - start
        await ehlo_all(connections, errors)
        await asyncio.sleep(SETTLE)
        result.rss_ehlo_kib = status_kib(pid)
    finally:
        await close_all(connections)
    await asyncio.sleep(SETTLE)
    result.rss_closed_kib = status_kib(pid)
    if connections:
        n = len(connections)
        result.kib_per_conn_greeted = (result.rss_greeted_kib - result.rss_before_kib) / n
        result.kib_per_conn_ehlo = (result.rss_ehlo_kib - result.rss_before_kib) / n
    print(
        f"    {n} connections opened in {opened:.1f} s; RSS {result.rss_before_kib} -> "
        f"{result.rss_greeted_kib} -> {result.rss_ehlo_kib} KiB (after closing: "
        f"{result.rss_closed_kib} KiB)"
    )


async def run_all(specs: list[ServerSpec], count: int, log_dir: Path) -> list[Measurement]:
    results = []
    for spec in specs:
        try:
            results.append(await measure(spec, count, log_dir))
        except RuntimeError as error:  # it did not start
            print(f"    {spec.name}: {error}")
            results.append(Measurement(spec.name, "", errors=[str(error)]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--servers", help="comma-separated name filters, e.g. alephsmtp,sink")
    parser.add_argument("--json", default=str(RESULTS / "memory.json"), help="results file")
    args = parser.parse_args()

    # Our side holds every connection; each server raises its own limit (the runner does, and
    # smtp-sink inherits ours).
    limit = raise_fd_limit(args.connections + 512)
    if limit < args.connections + 64:
        print(f"note: open files limit {limit}: at most {limit - 64} connections")
        args.connections = limit - 64
    specs, notes = all_servers()
    specs = [s for s in specs if s.kind != "floor"]  # a CPU reference, not a memory one
    specs = select_servers(specs, args.servers)
    for note in notes:
        print(f"note: {note}")
    print(f"{args.connections} idle connections per server")
    with server_cleanup():
        results = asyncio.run(run_all(specs, args.connections, Path(args.json).resolve().parent))

    rows = []
    for m in results:
        rows.append(
            [
                m.server,
                m.connections,
                *(
                    f"{kib / 1024:.1f}" if m.connections else "-"
                    for kib in (m.rss_before_kib, m.rss_greeted_kib, m.rss_ehlo_kib)
                ),
                f"{m.kib_per_conn_greeted:.1f}" if m.kib_per_conn_greeted is not None else "-",
                f"{m.kib_per_conn_ehlo:.1f}" if m.kib_per_conn_ehlo is not None else "-",
                "yes" if m.errors or m.server_stderr else "",
            ]
        )
    headers = ["server", "conns", "RSS MiB idle", "greeted", "after EHLO"]
    headers += ["KiB/conn greeted", "KiB/conn EHLO", "errors"]
    print("\nServer RSS with idle connections (VmRSS)")
    print(format_table(headers, rows))
    for m in results:
        if m.errors or m.server_stderr:
            print(f"\n{m.server}:")
            for error in m.errors[:10]:
                print(f"  client: {error}")
            for line in m.server_stderr.splitlines()[:20]:
                print(f"  server: {line}")
    write_json(
        args.json,
        {
            "benchmark": "memory",
            "machine": machine_info(),
            "connections": args.connections,
            "notes": notes,
            "results": [asdict(m) for m in results],
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
