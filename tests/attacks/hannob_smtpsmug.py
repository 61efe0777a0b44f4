"""Runs hannob's smtpsmug against the CLI server on loopback.

Drives the ``smtpsmug`` script from the public GitHub repository ``hannob/smtpsmug`` (Hanno
Böck; standard library only, Python 3.11+). Get the repository (a clone, or the search tool's
fetch), then:

    .venv/bin/python tests/attacks/hannob_smtpsmug.py --tool PATH/smtpsmug [--pure]

or set ``SMTPSMUG`` to the script's path. Without it the driver says so and exits 0. Not run
by the test suite.

For each ``--bare-newline`` policy and each transport smtpsmug has (plain, and implicit TLS
with ``-s``, verifying the trustme certificate through ``SSL_CERT_FILE``), the driver starts
``python -m alephsmtp --eml-dir DIR`` and runs every smtpsmug test (``--list-tests``): a
message ended by a malformed end-of-data (``\\n.\\n``, ``\\r.\\r``, ``\\r\\n\\x00.\\r\\n``...) and
the ``pipelining`` test of Postfix's ``smtpd_forbid_unauth_pipelining`` (run once more with
``--forbid-unauth-pipelining``). A finding: smtpsmug's ``was accepted (bad!)`` (the malformed
ending ended the message), more messages stored than complete ``<CRLF>.<CRLF>`` endings were
sent, or a traceback in the server's log. What smtpsmug itself asks you to judge ("Successfully
sent a mail with ... in it") is printed with the bytes the server stored.

Each test is bounded by smtpsmug's 5 s socket timeout and a 60 s limit. Loopback only. Exit
status 1 on a finding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import serving, skip

__all__ = ["main"]


def _tests(tool: Path) -> list[str]:
    listed = subprocess.run(
        [sys.executable, str(tool), "--list-tests"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split('"')[1].rstrip(":") for line in listed.splitlines() if line.startswith('"')]


def _verdict(output: str) -> str:
    for marker, verdict in (
        ("was accepted (bad!)", "ACCEPTED as an end of data (finding)"),
        ("Successfully sent a mail with", "not an end of data; the message, with it, accepted"),
        ("probably good", "refused"),
        ("Server rejects bad protocol synchronization", "pipelining refused (554)"),
        ("Server accepts bad protocol synchronization", "pipelining accepted"),
        ("Unsure how to interpret", "smtpsmug unsure"),
    ):
        if marker in output:
            return verdict
    if "554 5.5.2" in output or "500 5.5.2" in output:
        return "refused (5.5.2) at the real end of data"
    return "no verdict: " + output.strip().splitlines()[-1][:200] if output.strip() else "no output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", type=Path, default=os.environ.get("SMTPSMUG"))
    parser.add_argument("--pure", action="store_true", help="ALEPHSMTP_NO_EXTENSIONS=1")
    parser.add_argument("--results", type=Path, default=Path("smtpsmug-results"))
    args = parser.parse_args(argv)
    args.results = args.results.resolve()  # the server runs in a directory of its own
    if args.tool is None or not args.tool.is_file():
        skip("hannob's smtpsmug not found (--tool or SMTPSMUG)")
    args.results.mkdir(parents=True, exist_ok=True)
    findings: list[str] = []
    runs = [
        (policy, tls, extra)
        for policy in ("reject", "normalize")
        for tls, extra in (("starttls", []), ("implicit", ["-s"]))
    ]
    runs.append(("reject", "starttls", ["--forbid-unauth-pipelining"]))
    for policy, tls, extra in runs:
        forbid = extra == ["--forbid-unauth-pipelining"]
        store = args.results / (
            f"{'pure' if args.pure else 'compiled'}-{policy}-{tls}" + ("-forbid" if forbid else "")
        )
        store.mkdir(parents=True, exist_ok=True)
        options = ["--eml-dir", str(store), "--bare-newline", policy]
        if forbid:
            options.append("--forbid-unauth-pipelining")
        tests = ["pipelining"] if forbid else _tests(args.tool)
        with serving(tls, pure=args.pure, options=options, lifetime=60 * len(tests) + 60) as server:
            env = dict(os.environ, SSL_CERT_FILE=str(server.ca_file))
            complete_endings = 0
            stored_before = 0
            for test in tests:
                command = [
                    sys.executable,
                    str(args.tool),
                    "--port",
                    str(server.port),
                    "-c",
                    test,
                    *(["-s"] if tls == "implicit" else []),
                    "127.0.0.1",
                ]
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=60, env=env, check=False
                )
                output = done.stdout + done.stderr
                (store / f"{test}.out").write_text(output)
                verdict = _verdict(output)
                if test == "pipelining":
                    # smtpsmug reads its replies once; the stored messages say what happened.
                    count = len(list(store.glob("*.eml"))) - stored_before
                    said = "accepted" if count == 2 else "refused"
                    verdict = f"pipelining {said}: {count} of 2 messages stored ({verdict})"
                stored_before = len(list(store.glob("*.eml")))
                transport = "implicit TLS" if tls == "implicit" else "plain"
                print(
                    f"{server.implementation} core, {transport}, bare_newline={policy}"
                    f"{', forbid' if forbid else ''}, {test}: {verdict}"
                )
                if "finding" in verdict:
                    findings.append(f"{server.implementation} {tls} {policy} {test}: {verdict}")
                # smtpsmug sends a real <CRLF>.<CRLF> after a refused ending only when the server
                # waited (the ending did not end the message); pipelining sends two messages.
                complete_endings += 2 if test == "pipelining" else 1
            tracebacks = server.tracebacks()
            core = server.implementation
        stored = sorted(store.glob("*.eml"))
        for path in stored:
            body = path.read_bytes().split(b"\r\n\r\n", 1)[-1]
            print(f"  stored {path.name}: {body[:160]!r}")
        if len(stored) > complete_endings:
            findings.append(
                f"{core} {tls} {policy}: {len(stored)} messages stored for "
                f"{complete_endings} complete endings"
            )
        if tracebacks:
            findings.append(f"{core} {tls} {policy}: {len(tracebacks)} tracebacks")
    print("findings:", findings or "none")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
