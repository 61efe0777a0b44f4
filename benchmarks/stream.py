"""A large message streamed through ``message_chunk``: the server's memory stays flat.

    python benchmarks/stream.py [--mib 1024] [--port 0] [--json FILE]

Starts an alephsmtp server in a separate process whose ``message_chunk`` handler only counts
and hashes the pieces, sends one message of ``--mib`` MiB from this process over loopback,
and prints the server's peak RSS (VmHWM) before and after, the time, the throughput and whether
the server's SHA-256 of the body equals the sender's. Writes JSON like the other scripts. Never
asserts; bounded by the message size and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import time

from _common import RESULTS, machine_info, write_json

SERVER = r"""
import asyncio, hashlib, sys
from alephsmtp import SmtpServer

def on_session(session):
    digest = hashlib.sha256()
    session.message_chunk += lambda s, e: digest.update(e.chunk)
    session.message_received += lambda s, e: print("RECEIVED", e.size, digest.hexdigest(),
                                                   flush=True)

async def main():
    server = SmtpServer("127.0.0.1", int(sys.argv[1]), max_message_size=0,
                        hostname="stream.test", on_session=on_session)
    await server.start()
    print("READY", server.port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"""
BLOCK = (b"x" * 1022 + b"\r\n") * 1024  # 1 MiB of 1 KiB lines


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


async def send(port: int, mib: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    while not (await reader.readline()).startswith(b"354"):
        pass
    started = time.perf_counter()
    for _ in range(mib):
        writer.write(BLOCK)
        await writer.drain()
    writer.write(b".\r\nQUIT\r\n")
    await asyncio.wait_for(reader.read(), 600)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--port", type=int, default=0, help="0: the OS chooses")
    parser.add_argument("--json", default=str(RESULTS / "stream.json"), help="results file")
    args = parser.parse_args()
    digest = hashlib.sha256()
    for _ in range(args.mib):
        digest.update(BLOCK)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(args.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
        port = int(ready[1])
        time.sleep(0.3)
        before = peak_rss_kib(server.pid)
        elapsed = asyncio.run(send(port, args.mib))
        received = server.stdout.readline().split()
        after = peak_rss_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"message          {args.mib} MiB, received as {received[1]} bytes")
    print(f"time             {elapsed:.2f} s ({args.mib / elapsed:.0f} MiB/s)")
    print(f"server peak RSS  {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after")
    same = received[2] == digest.hexdigest()
    print(f"SHA-256          {'equal to' if same else 'DIFFERENT from'} what was sent")
    result = {
        "mib": args.mib,
        "received_bytes": int(received[1]),
        "digest_equal": same,
        "seconds": elapsed,
        "mib_per_s": args.mib / elapsed,
        "peak_rss_kib_before": before,
        "peak_rss_kib_after": after,
    }
    write_json(args.json, {"machine": machine_info(), "stream": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
