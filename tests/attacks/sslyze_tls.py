"""Runs sslyze against the CLI server's STARTTLS and implicit TLS on loopback.

Drives sslyze (PyPI ``sslyze``), best kept in a virtualenv of its own:

    python -m venv /tmp/sslyze && /tmp/sslyze/bin/pip install sslyze
    .venv/bin/python tests/attacks/sslyze_tls.py --sslyze /tmp/sslyze/bin/sslyze [--pure]

(``--sslyze`` defaults to ``sslyze`` on PATH; without it the driver says so and exits 0). Not
run by the test suite.

For STARTTLS (``--starttls smtp``) and implicit TLS it starts ``python -m alephsmtp --sink
--tls-cert ...`` (a trustme certificate) and runs every sslyze scan: the certificate (against
the trustme CA too), SSL 2.0 to TLS 1.3 cipher suites, compression, OpenSSL CCS injection,
TLS_FALLBACK_SCSV, Heartbleed, ROBOT, renegotiation, resumption, curves, extended master
secret, early data, and Mozilla's "intermediate" configuration. It prints what was accepted
and each check's result from sslyze's JSON. A finding: a protocol older than TLS 1.2 accepted,
a vulnerability sslyze reports, a scan that errored, or a traceback in the server's log.
Mozilla-compliance remarks are printed as remarks: the certificate is a test certificate and
the cipher list is the ``ssl`` module's default, which the application may narrow.

Bounded by a 300 s limit per scan. Loopback only. Exit status 1 on a finding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import serving, skip

__all__ = ["main"]

_SCANS = [
    "--certinfo",
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--compression",
    "--openssl_ccs",
    "--fallback",
    "--heartbleed",
    "--robot",
    "--reneg",
    "--resum",
    "--elliptic_curves",
    "--ems",
    "--early_data",
]
_OLD = (
    "ssl_2_0_cipher_suites",
    "ssl_3_0_cipher_suites",
    "tls_1_0_cipher_suites",
    "tls_1_1_cipher_suites",
)


def _judge(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(summary lines, findings) from one server's sslyze result."""
    summary: list[str] = []
    findings: list[str] = []
    scans = result["scan_result"]
    for name, scan in scans.items():
        if scan["status"] == "ERROR":
            findings.append(f"{name}: scan error {scan.get('error_reason')}")
    for name in (*_OLD, "tls_1_2_cipher_suites", "tls_1_3_cipher_suites"):
        scan = scans[name]
        if scan["status"] != "COMPLETED":
            continue
        accepted = [s["cipher_suite"]["name"] for s in scan["result"]["accepted_cipher_suites"]]
        summary.append(f"{name}: {len(accepted)} accepted {accepted}")
        if accepted and name in _OLD:
            findings.append(f"{name} accepted")

    def result_of(name: str) -> dict[str, Any]:
        scan = scans.get(name, {})
        return scan.get("result") or {} if scan.get("status") == "COMPLETED" else {}

    checks = {
        "compression": not result_of("tls_compression").get("supports_compression", True),
        "ccs injection": not result_of("openssl_ccs_injection").get(
            "is_vulnerable_to_ccs_injection", True
        ),
        "fallback scsv": result_of("tls_fallback_scsv").get("supports_fallback_scsv", False),
        "heartbleed": not result_of("heartbleed").get("is_vulnerable_to_heartbleed", True),
        "robot": "NOT_VULNERABLE" in str(result_of("robot").get("robot_result", "")),
        "client renegotiation dos": not result_of("session_renegotiation").get(
            "is_vulnerable_to_client_renegotiation_dos", True
        ),
        "secure renegotiation": result_of("session_renegotiation").get(
            "supports_secure_renegotiation", False
        ),
        "extended master secret": result_of("tls_extended_master_secret").get(
            "supports_ems_extension", False
        ),
    }
    for check, good in checks.items():
        summary.append(f"{check}: {'ok' if good else 'NOT OK'}")
        if not good:
            findings.append(check)
    resumption = result_of("session_resumption")
    summary.append(
        "resumption: ids {}/{}, tickets {}".format(
            resumption.get("session_id_successful_resumptions_count"),
            resumption.get("session_id_attempted_resumptions_count"),
            resumption.get("tls_ticket_resumption_result"),
        )
    )
    summary.append(
        "early data: {}".format(result_of("tls_1_3_early_data").get("supports_early_data"))
    )
    curves = result_of("elliptic_curves").get("supported_curves") or []
    summary.append(f"curves: {[c['name'] for c in curves]}")
    return summary, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sslyze", default=shutil.which("sslyze"))
    parser.add_argument("--pure", action="store_true", help="ALEPHSMTP_NO_EXTENSIONS=1")
    args = parser.parse_args(argv)
    if args.sslyze is None or not Path(args.sslyze).exists():
        skip("sslyze not found (pip install sslyze; --sslyze PATH)")
    version = subprocess.run(
        [args.sslyze, "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    print(next((line for line in version.splitlines() if "version" in line), "sslyze"))
    findings: list[str] = []
    runs = [
        (tls, extra, key)
        for key in ("ecdsa", "rsa")
        for tls, extra in (("starttls", ["--starttls", "smtp"]), ("implicit", []))
    ]
    for tls, extra, key in runs:
        with (
            serving(tls, pure=args.pure, lifetime=360, key_type=key) as server,
            tempfile.TemporaryDirectory() as tmp,
        ):
            out = Path(tmp) / "sslyze.json"
            command = [
                args.sslyze,
                *_SCANS,
                *extra,
                "--certinfo_ca_file",
                str(server.ca_file),
                "--mozilla_config",
                "intermediate",
                "--json_out",
                str(out),
                f"127.0.0.1:{server.port}",
            ]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
            tracebacks = server.tracebacks()
            core = server.implementation
            if not out.exists():
                findings.append(f"{tls}: sslyze wrote no result: {done.stdout[-500:]}")
                continue
            result = json.loads(out.read_text())["server_scan_results"][0]
        print(f"{core} core, {tls}, {key} certificate: {result['connectivity_status']}")
        if result["scan_status"] != "COMPLETED":
            findings.append(
                f"{tls}: {result['scan_status']} {result.get('connectivity_error_trace')}"
            )
            continue
        summary, found = _judge(result)
        for line in summary:
            print("  " + line)
        compliance = done.stdout.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)[-1]
        remarks = [line.strip() for line in compliance.splitlines() if line.strip().startswith("*")]
        print("  Mozilla intermediate remarks:", remarks or "none")
        findings += [f"{tls}: {f}" for f in found]
        if tracebacks:
            findings.append(f"{tls}: {len(tracebacks)} tracebacks in the server's log")
    print("findings:", findings or "none")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
