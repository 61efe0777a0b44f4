"""Server CPU per 1 KiB message with and without full sender authentication (warm DNS cache).

    python benchmarks/mailauth.py [--messages 400] [--json FILE]

Starts dnsmasq on loopback with a test zone (SPF, a 2048-bit DKIM key from opendkim-genkey,
DMARC), then, for each mode, an alephsmtp server in its own process, and sends it
``--messages`` DKIM-signed 1 KiB messages from this process over one connection with
smtplib (after a warm-up that fills the resolver's cache). The server's CPU time (utime +
stime from /proc) divided by the messages is the figure: ``plain`` accepts and discards,
``verified`` runs SPF + DKIM + ARC + DMARC (MailAuth, annotate) first. Beside it: OpenSSL's
RSA-2048 verify rate (``openssl speed -seconds 1 rsa2048``) and dkimpy's own cost to verify
the same message with the key in hand (pure-Python RSA, which is what the server pays).
Never asserts; bounded by the message count and a time limit per mode.
"""

from __future__ import annotations

import argparse
import re
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, cpu_seconds, format_table, machine_info, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SERVER = r"""
import asyncio, sys
from alephsmtp import SmtpServer

mode, dns_port = sys.argv[1], int(sys.argv[2])
auth = None
if mode == "verified":
    from alephsmtp.mailauth import DnsResolver, MailAuth
    auth = MailAuth(DnsResolver(["127.0.0.1"], port=dns_port), authserv_id="bench.test")
count = 0

def on_session(session):
    if auth is not None:
        auth.attach(session)
    def received(s, e):
        global count
        count += 1
        results = e.envelope.auth_results
        if count == 1 and results is not None:
            print("RESULTS", results.header().decode().replace("\r\n\t", " ").strip(),
                  flush=True)
    session.message_received += received

async def main():
    server = SmtpServer("127.0.0.1", 0, hostname="bench.test", on_session=on_session)
    await server.start()
    print("READY", server.port, flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

MODES = ("plain", "verified")


def one_kib_message(key: bytes) -> bytes:
    import dkim

    head = (
        b"From: Alice <alice@example.test>\r\nTo: bob@example.org\r\nSubject: benchmark\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = (line * 20)[: 1024 - len(head) - 500]
    data = head + body
    signed: bytes = dkim.sign(data, b"sel", b"example.test", key) + data
    return signed


def run_mode(mode: str, dns_port: int, data: bytes, messages: int, warmup: int) -> dict[str, float]:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode, str(dns_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"server did not start: {line!r}")
        port = int(line.split()[1])
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
            for _ in range(warmup):
                client.sendmail("alice@example.test", ["bob@example.org"], data)
            results_line = ""
            if mode == "verified":
                results_line = server.stdout.readline().strip()
            before = cpu_seconds(server.pid)
            started = time.perf_counter()
            deadline = started + 300
            sent = 0
            while sent < messages and time.perf_counter() < deadline:
                client.sendmail("alice@example.test", ["bob@example.org"], data)
                sent += 1
            wall = time.perf_counter() - started
            cpu = cpu_seconds(server.pid) - before
        return {
            "messages": sent,
            "server_cpu_us_per_message": cpu / sent * 1e6,
            "messages_per_second": sent / wall,
            "results": results_line,  # type: ignore[dict-item]
        }
    finally:
        server.terminate()
        server.wait(10)


def openssl_rsa2048() -> dict[str, float] | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    done = subprocess.run(
        [openssl, "speed", "-seconds", "1", "rsa2048"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"^rsa\s+2048 bits\s+(\S+)s\s+(\S+)s\s+(\S+)\s+(\S+)", done.stdout, re.M)
    if match is None:
        return None
    return {
        "sign_us": float(match.group(1)) * 1e6,
        "verify_us": float(match.group(2)) * 1e6,
        "sign_per_s": float(match.group(3)),
        "verify_per_s": float(match.group(4)),
    }


def dkimpy_verify_us(data: bytes, record: str, rounds: int = 200) -> float:
    import dkim

    answer = record.encode()
    started = time.process_time()
    for _ in range(rounds):
        assert dkim.verify(data, dnsfunc=lambda name, timeout=5: answer)
    return (time.process_time() - started) / rounds * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", default=str(RESULTS / "mailauth.json"))
    args = parser.parse_args()

    from _mailauth import DnsServer, genkey, private_dir

    directory = private_dir()
    key_path, record = genkey(directory, "example.test", "sel", 2048)
    records = {
        ("example.test", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
        ("client.test", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
        ("sel._domainkey.example.test", "TXT"): [record],
        ("_dmarc.example.test", "TXT"): ["v=DMARC1; p=reject"],
    }
    dns = DnsServer(directory, records)
    try:
        data = one_kib_message(key_path.read_bytes())
        results = {
            mode: run_mode(mode, dns.port, data, args.messages, args.warmup) for mode in MODES
        }
    finally:
        dns.stop()
        shutil.rmtree(directory, ignore_errors=True)
    openssl = openssl_rsa2048()
    dkimpy_us = dkimpy_verify_us(data, record)

    plain = results["plain"]["server_cpu_us_per_message"]
    verified = results["verified"]["server_cpu_us_per_message"]
    rows = [
        [
            "plain (accept, discard)",
            f"{plain:,.0f}",
            f"{results['plain']['messages_per_second']:,.0f}",
        ],
        [
            "verified (SPF+DKIM+ARC+DMARC)",
            f"{verified:,.0f}",
            f"{results['verified']['messages_per_second']:,.0f}",
        ],
        ["added by verification", f"{verified - plain:,.0f}", ""],
    ]
    print(f"message: {len(data)} bytes, DKIM rsa-sha256 2048-bit, warm DNS cache")
    print(format_table(["server", "CPU µs / message", "messages / s (1 client)"], rows))
    print()
    print(f"dkimpy verify of the same message, key in hand: {dkimpy_us:,.0f} µs")
    if openssl is not None:
        print(
            f"openssl speed rsa2048: verify {openssl['verify_us']:.1f} µs "
            f"({openssl['verify_per_s']:,.0f}/s), sign {openssl['sign_us']:.0f} µs"
        )
    print(f"verified: {results['verified']['results']}")
    write_json(
        args.json,
        {
            "machine": machine_info(),
            "message_bytes": len(data),
            "modes": results,
            "added_cpu_us_per_message": verified - plain,
            "dkimpy_verify_us": dkimpy_us,
            "openssl_rsa2048": openssl,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
