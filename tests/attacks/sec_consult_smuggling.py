"""Runs SEC Consult's SMTP Smuggling Scanner against the CLI server on loopback.

Drives ``smtp_smuggling_scanner.py`` from the public GitHub repository
``The-Login/SMTP-Smuggling-Tools`` (Timo Longin, SEC Consult); it needs ``colorama`` and
``dnspython`` in the interpreter that runs it. Get the repository (a clone, or the search
tool's fetch), then:

    .venv/bin/python tests/attacks/sec_consult_smuggling.py \
        --tool PATH/smtp_smuggling_scanner.py --tool-python PYTHON_WITH_COLORAMA [--pure]

or set ``SMTP_SMUGGLING_SCANNER`` to the script's path. Without it the driver says so and
exits 0. Not run by the test suite.

Inbound: for each transport (plain, STARTTLS, implicit TLS) and each ``--bare-newline``
policy it starts ``python -m alephsmtp --eml-dir DIR`` and runs the scanner with
``--inbound-smtp-server 127.0.0.1`` (so it looks up no MX record). The scanner sends, per fake
end-of-data sequence (``\\n.\\n``, ``\\r.\\r``, ``\\r\\n\\x00.\\r\\n``...), a message with a second
``MAIL FROM:<smuggled@...>`` transaction after the fake end; the server is smuggled into if a
stored message has ``Return-Path: <smuggled@...>``.

Outbound: the CLI server with ``--relay`` to a recorder of this driver's own (a minimal SMTP
receiver that keeps the exact bytes of each DATA), and the scanner in its outbound mode. A
relay passes a fake end-of-data sequence on if the bytes between ``SMUGGLINGSTART`` and
``SMUGGLINGEND`` on the wire hold a bare CR or LF, a line that is only ``.``, or a NUL.

Every run is bounded (the scanner's own 5 s socket timeout per sequence, and a 300 s limit per
run). Loopback only. Exit status 1 on a finding.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import serving, skip

__all__ = ["main"]

_SENDER_DOMAIN = "example.org"  # only written into the messages; nothing is looked up
_RECEIVER = "bob@example.org"


def _stored(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(directory.glob("*.eml"))]


def _run_scanner(tool: Path, python: str, port: int, extra: list[str]) -> str:
    command = [
        python,
        str(tool),
        "--inbound-smtp-server",
        "127.0.0.1",
        "--port",
        str(port),
        "--sender-domain",
        _SENDER_DOMAIN,
        "--debug",
        *extra,
        _RECEIVER,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    return done.stdout + done.stderr


def _reply_summary(output: str) -> list[str]:
    """The scanner's debug lines with the reply to each message's end of data."""
    return re.findall(r"^data: \((\d{3}), b'([^']*)'\)", output, re.MULTILINE)[1::2]


def inbound(tool: Path, python: str, pure: bool, results: Path) -> list[str]:
    findings: list[str] = []
    for policy in ("reject", "normalize"):
        for transport, tls, extra in (
            ("plain", "starttls", []),
            ("STARTTLS", "starttls", ["--starttls"]),
            ("implicit TLS", "implicit", ["--tls"]),
        ):
            store = (
                results / f"inbound-{'pure' if pure else 'compiled'}-{policy}-{tls}-{len(extra)}"
            )
            store.mkdir(parents=True, exist_ok=True)
            options = ["--eml-dir", str(store), "--bare-newline", policy]
            with serving(tls, pure=pure, options=options, lifetime=400) as server:
                output = _run_scanner(tool, python, server.port, extra)
                tracebacks = server.tracebacks()
                core = server.implementation
            (store / "scanner.out").write_text(output)
            messages = _stored(store)
            smuggled = [m for m in messages if m.startswith(b"Return-Path: <smuggled@")]
            print(
                f"inbound, {core} core, {transport}, bare_newline={policy}: "
                f"{len(messages)} message(s) stored, {len(smuggled)} smuggled; "
                f"end-of-data replies: {_reply_summary(output)}"
            )
            if smuggled or tracebacks:
                findings.append(
                    f"inbound {core} {transport} {policy}: {len(smuggled)} smuggled, "
                    f"{len(tracebacks)} tracebacks"
                )
    return findings


class _Recorder:
    """A minimal SMTP receiver on 127.0.0.1 that keeps the exact bytes of every DATA."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder ESMTP\r\n")
        try:
            while line := await asyncio.wait_for(reader.readline(), 30):
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-recorder\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    self.messages.append(await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 30))
                    writer.write(b"250 2.0.0 recorded\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def outbound(tool: Path, python: str, pure: bool, results: Path) -> list[str]:
    findings: list[str] = []
    for policy in ("reject", "normalize"):
        recorder = _Recorder()
        options = ["--relay", f"127.0.0.1:{recorder.port}", "--bare-newline", policy]
        try:
            with serving("none", pure=pure, options=options, lifetime=400) as server:
                command = [
                    python,
                    str(tool),
                    _RECEIVER,
                    "--outbound-smtp-server",
                    "127.0.0.1",
                    "--port",
                    str(server.port),
                    "--sender-address",
                    "alice@example.org",
                    "--debug",
                ]
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=300, check=False
                )
                tracebacks = server.tracebacks()
                core = server.implementation
        finally:
            recorder.stop()
        name = f"outbound-{'pure' if pure else 'compiled'}-{policy}"
        (results / f"{name}.out").write_text(done.stdout + done.stderr)
        passed_on = []
        for index, raw in enumerate(recorder.messages):
            (results / f"{name}-{index}.wire").write_bytes(raw)
            found = re.search(rb"SMUGGLINGSTART\r\n(.*)\r\nSMUGGLINGEND", raw, re.DOTALL)
            if found is None:
                passed_on.append(f"markers not found in {raw[:80]!r}")
                continue
            between = found.group(1)
            bare = re.search(rb"\r(?!\n)|(?<!\r)\n", between)
            if bare or b"\x00" in between or re.search(rb"(^|\r\n)\.(\r\n|$)", between):
                passed_on.append(repr(between))
        print(
            f"outbound (relay), {core} core, bare_newline={policy}: "
            f"{len(recorder.messages)} message(s) relayed; "
            f"end-of-data replies: {_reply_summary(done.stdout + done.stderr)}; "
            f"passed on unfiltered: {passed_on or 'none'}"
        )
        if passed_on or tracebacks:
            findings.append(f"outbound {core} {policy}: {passed_on}, {len(tracebacks)} tracebacks")
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", type=Path, default=os.environ.get("SMTP_SMUGGLING_SCANNER"))
    parser.add_argument(
        "--tool-python",
        default=sys.executable,
        help="interpreter with colorama and dnspython (default: this one)",
    )
    parser.add_argument("--pure", action="store_true", help="ALEPHSMTP_NO_EXTENSIONS=1")
    parser.add_argument("--results", type=Path, default=Path("smuggling-scanner-results"))
    args = parser.parse_args(argv)
    args.results = args.results.resolve()  # the server runs in a directory of its own
    if args.tool is None or not args.tool.is_file():
        skip("SEC Consult's smtp_smuggling_scanner.py not found (--tool or SMTP_SMUGGLING_SCANNER)")
    args.results.mkdir(parents=True, exist_ok=True)
    findings = inbound(args.tool, args.tool_python, args.pure, args.results)
    findings += outbound(args.tool, args.tool_python, args.pure, args.results)
    print("findings:", findings or "none")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
