"""Runs EAST's STARTTLS Command Injection Tester against the CLI server on loopback.

Drives ``command-injection-tester`` from the public GitHub repository
``Email-Analysis-Toolkit/command-injection-tester`` (the EAST artifacts of "Why TLS is better
without STARTTLS", Poddebniak, Ising, Böck, Schinzel, USENIX Security 2021; standard library
only). Get the repository (a clone, or the search tool's fetch), then:

    .venv/bin/python tests/attacks/east_starttls_injection.py \
        --tool PATH/command-injection-tester [--pure] [--runs 3]

or set ``EAST_INJECTION_TESTER`` to the script's path. Without it the driver says so and exits
0. Not run by the test suite.

The tester (``--smtp -s PORT 127.0.0.1``) first runs a sanity test (EHLO, NOOP, STARTTLS, a
handshake, QUIT), then sends ``STARTTLS\\r\\nEHLO commandinjectiontester\\r\\n`` in one segment
(CVE-2011-0411): a server that answers the pipelined plaintext EHLO inside TLS is vulnerable.
The driver starts ``python -m alephsmtp --sink --tls-cert ...`` and reads the tester's verdict:
"Probably no command injection here!" or the connection closed at the handshake pass; "Command
injection here!", "Probable/Possible command injection" and "Server unresponsive" are findings,
as is a failed sanity test or a traceback in the server's log. ``--runs`` repeats it (the
injected bytes can arrive in one read or two).

Each run is bounded by the tester's 2 s socket timeout and a 120 s limit. Loopback only. Exit
status 1 on a finding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import serving, skip

__all__ = ["main"]

_PASS = ("Probably no command injection here!", "TLS handshake failed - Server probably closed")
_FAIL = (
    "Command injection here!",
    "Probable command injection",
    "Possible command injection",
    "Server unresponsive",
    "Sanity test failed",
    "Injection test failed",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", type=Path, default=os.environ.get("EAST_INJECTION_TESTER"))
    parser.add_argument("--pure", action="store_true", help="ALEPHSMTP_NO_EXTENSIONS=1")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.tool is None or not args.tool.is_file():
        skip("EAST's command-injection-tester not found (--tool or EAST_INJECTION_TESTER)")
    findings: list[str] = []
    with (
        serving("starttls", pure=args.pure, lifetime=120 * args.runs + 60) as server,
        tempfile.TemporaryDirectory() as logs,
    ):
        for run in range(1, args.runs + 1):
            command = [
                sys.executable,
                str(args.tool),
                "--smtp",
                "-s",
                str(server.port),
                "--nocolor",
                "-l",
                logs,
                "127.0.0.1",
            ]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            output = done.stdout + done.stderr
            failed = [marker for marker in _FAIL if marker in output]
            passed = [marker for marker in _PASS if marker in output]
            verdict = (
                "FINDING: " + ", ".join(failed)
                if failed
                else (passed[0] if passed else "no verdict")
            )
            print(f"{server.implementation} core, run {run}: {verdict}")
            if failed or not passed:
                findings.append(f"run {run}: {verdict}\n{output}")
        trace = [line.split(" - ", 2)[-1] for line in output.splitlines() if "TRACE" in line]
        print("  last run's injection exchange:", " | ".join(trace[-8:]))
        tracebacks = server.tracebacks()
        if tracebacks:
            findings.append(f"{len(tracebacks)} tracebacks in the server's log")
    print("findings:", findings or "none")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
