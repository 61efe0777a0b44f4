"""The server side of the attack drivers: alephsmtp as its CLI runs it, with a trustme certificate.

    python tests/attacks/_server.py --tls starttls [--pure] [--lifetime 600] [-- CLI options]

starts ``python -m alephsmtp --port 0 --hostname localhost --sink`` (the options after ``--``
replace ``--sink``), with ``--tls-cert`` for ``starttls`` and ``--implicit-tls`` as well for
``implicit``, prints the port and the CA file the clients should trust, and stops it after
``--lifetime`` seconds or at Ctrl-C. ``--pure`` sets ``ALEPHSMTP_NO_EXTENSIONS=1`` (the
pure-Python twin). The drivers beside this file use :func:`serving` the same way. Loopback only.

Not run by the test suite: these drivers exist to re-run third-party attack tools by hand
(docs/security.md, "Third-party attack tools").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Server", "serving", "skip"]

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@dataclass
class Server:
    """A running CLI server: where it listens, what to trust, what it logged."""

    port: int
    ca_file: Path  # the trustme CA, for clients that verify
    directory: Path  # the temporary directory holding the certificate, log and any store
    implementation: str  # "cython" or "python", as the CLI's --version reports it
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def log_file(self) -> Path:
        return self.directory / "server.log"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def tracebacks(self) -> list[str]:
        """Lines of the server's log that start or belong to a traceback (none expected)."""
        return [line for line in self.log_text().splitlines() if "Traceback" in line]


def skip(reason: str) -> None:
    """Say why a driver cannot run here and exit cleanly (status 0): the tool is absent."""
    print(f"SKIPPED: {reason}")
    sys.exit(0)


def _environment(pure: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ALEPHSMTP_NO_EXTENSIONS", None)
    if pure:
        env["ALEPHSMTP_NO_EXTENSIONS"] = "1"
    return env


@contextlib.contextmanager
def serving(
    tls: str = "starttls",
    *,
    pure: bool = False,
    options: Sequence[str] = ("--sink",),
    lifetime: float = 900.0,
    python: str = sys.executable,
    keep_in: Path | None = None,
    key_type: str = "ecdsa",
) -> Iterator[Server]:
    """Run the CLI on 127.0.0.1 (an OS-chosen port) until the block ends or ``lifetime`` runs out.

    ``tls`` is ``"none"``, ``"starttls"`` or ``"implicit"``; ``options`` are the CLI's output and
    policy options (``--sink`` by default). The server is killed however the block ends. Its
    certificate (``key_type`` ``"ecdsa"`` or ``"rsa"``) and log live in a temporary directory, or
    in ``keep_in`` (kept) if given."""
    import trustme  # the project's test extra

    if tls not in ("none", "starttls", "implicit"):
        raise ValueError(f"tls must be none, starttls or implicit, not {tls!r}")
    env = _environment(pure)
    version = subprocess.run(
        [python, "-m", "alephsmtp", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    implementation = "python" if "(python parser)" in version else "cython"
    with contextlib.ExitStack() as stack:
        if keep_in is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aleph-")))
        else:
            directory = keep_in
            directory.mkdir(parents=True, exist_ok=True)
        kind = getattr(trustme.KeyType, key_type.upper())
        ca = trustme.CA(key_type=kind)
        leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=kind)
        ca_file = directory / "ca.pem"
        chain_file = directory / "server.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(chain_file))
        # coreutils' timeout bounds the server's life even if this process is killed.
        command = ["timeout", "-k", "10", str(lifetime), python, "-m", "alephsmtp"]
        command += ["--port", "0", "--hostname", "localhost"]
        if tls != "none":
            command += ["--tls-cert", str(chain_file)]
        if tls == "implicit":
            command.append("--implicit-tls")
        command += list(options)
        log_file = directory / "server.log"
        with open(log_file, "wb") as log:
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=directory
            )
        try:
            port = _wait_for_port(process, log_file)
            yield Server(port, ca_file, directory, implementation, process)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # timeout passes it on; the CLI stops
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_for_port(process: subprocess.Popen[bytes], log_file: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = _LISTENING.search(log_file.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log_file.read_text(errors='replace')}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the server did not report its port within 60 s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", choices=["none", "starttls", "implicit"], default="starttls")
    parser.add_argument("--pure", action="store_true", help="ALEPHSMTP_NO_EXTENSIONS=1")
    parser.add_argument("--lifetime", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("options", nargs="*", help="CLI options after --, instead of --sink")
    args = parser.parse_args(argv)
    with serving(
        args.tls, pure=args.pure, options=args.options or ["--sink"], lifetime=args.lifetime
    ) as server:
        print(f"port {server.port} ({server.implementation} core); trust {server.ca_file}")
        print(f"log {server.log_file}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
