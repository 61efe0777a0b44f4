"""A boofuzz model of an SMTP session, run against the CLI server on loopback.

Drives boofuzz (PyPI ``boofuzz``; the model below is this project's own). Get it into a
virtualenv of its own, with trustme for the server's certificate:

    python -m venv /tmp/boofuzz && /tmp/boofuzz/bin/pip install boofuzz trustme
    /tmp/boofuzz/bin/python tests/attacks/boofuzz_smtp.py --server-python .venv/bin/python \
        [--pure] [--tls none|implicit] [--cases 5000] [--stride 12] [--max-seconds 900]

The server is ``python -m alephsmtp --sink --auth-file F --auth-over-plaintext --tls-cert C``
(STARTTLS offered; plus ``--implicit-tls`` for ``--tls implicit``), started by
``_server.serving`` with ``--server-python`` (the project's environment). The graph: EHLO, then
MAIL, RCPT and DATA with a body, or BDAT; AUTH PLAIN; STARTTLS and the junk verbs with
arguments; every field a boofuzz primitive. After each case a monitor reads what is left of
the replies and fails the case when

* a reply line is not ``NNN`` + space or hyphen (RFC 5321 4.2),
* a 4xx/5xx reply lacks an enhanced code of the same class (RFC 2034 3, RFC 3463),
* the server process has died, or every 100 cases a fresh connection does not get a ``220``
  greeting and a ``250`` to EHLO within 10 s.

At the end the server's log is searched for tracebacks. Bounded by ``--cases`` (boofuzz's
``index_end``) and ``--max-seconds`` (the run stops itself). Loopback only. Exit status 1 when
anything failed. Not run by the test suite; without boofuzz it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import select
import socket
import ssl
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import Server, serving, skip

try:
    import boofuzz as bf
except ImportError:  # pragma: no cover - the tool is optional
    bf = None

__all__ = ["main"]

_REPLY_LINE = re.compile(rb"^([2-5])\d\d[ -]")
_ENHANCED = re.compile(rb"^([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")
_TLS_READY = re.compile(rb"^220 2\.0\.0 Ready to start TLS")


class _Deadline(Exception):
    """The run's time bound was reached."""


def _check_replies(received: bytes) -> list[str]:
    """What is wrong with the reply lines received in one case (the greeting included)."""
    problems = []
    for line in received.split(b"\r\n")[:-1]:  # the last piece is an incomplete line, if any
        if _TLS_READY.match(line):
            break  # what follows is TLS, or the server's reaction to plaintext as TLS
        found = _REPLY_LINE.match(line)
        if found is None:
            problems.append(f"not a reply line: {line[:120]!r}")
        elif found.group(1) in b"45":
            enhanced = _ENHANCED.match(line)
            if enhanced is None or enhanced.group(1) != enhanced.group(2):
                problems.append(f"no enhanced code of the same class: {line[:120]!r}")
    return problems


def _healthy(port: int, context: ssl.SSLContext | None) -> str | None:
    """None if a fresh client gets a 220 and a 250 to EHLO; else what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            sock: socket.socket = raw
            if context is not None:
                sock = context.wrap_socket(raw, server_hostname="localhost")
            reader = sock.makefile("rb")
            if not reader.readline().startswith(b"220 "):
                return "no 220 greeting"
            sock.sendall(b"EHLO health.example\r\n")
            while (line := reader.readline())[3:4] == b"-":
                pass
            if not line.startswith(b"250 "):
                return f"EHLO answered {line!r}"
            sock.sendall(b"QUIT\r\n")
            return None
    except OSError as error:
        return f"{type(error).__name__}: {error}"


def _build(session: bf.Session, stride: int) -> None:
    """The SMTP graph; every field a primitive boofuzz mutates (every ``stride``-th mutation of
    boofuzz's string library, so a bounded run reaches every field, long strings included)."""

    class String(bf.String):  # type: ignore[misc]
        def mutations(self, default_value):  # type: ignore[no-untyped-def]
            for index, mutation in enumerate(super().mutations(default_value)):
                if index % stride == 0:
                    yield mutation

        def num_mutations(self, default_value):  # type: ignore[no-untyped-def]
            return sum(1 for _ in self.mutations(default_value))

    r, st = bf.Request, bf.Static
    ehlo = r("ehlo", children=(st("v", "EHLO "), String("host", "client.example"), st("e", "\r\n")))
    mail = r(
        "mail",
        children=(
            st("v", "MAIL FROM:"),
            String("path", "<alice@example.org>"),
            String("params", " SIZE=100 BODY=8BITMIME"),
            st("e", "\r\n"),
        ),
    )
    rcpt = r(
        "rcpt",
        children=(
            st("v", "RCPT TO:"),
            String("path", "<bob@example.org>"),
            String("params", " NOTIFY=SUCCESS ORCPT=rfc822;bob@example.org"),
            st("e", "\r\n"),
        ),
    )
    data = r("data", children=(String("v", "DATA"), st("e", "\r\n")))
    endings = ["\r\n.\r\n", "\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r\n\x00.\r\n"]
    body = r(
        "body",
        children=(
            String("text", "Subject: fuzz\r\n\r\n.leading dot\r\nbody\r\n"),
            bf.Group("end", values=endings, default_value=endings[0]),
            st("after", "\r\n.\r\nNOOP\r\n"),
        ),
    )
    bdat = r(
        "bdat",
        children=(
            st("v", "BDAT "),
            String("size", "5"),
            String("last", " LAST"),
            st("e", "\r\n"),
            String("chunk", "hello"),
            st("after", "NOOP\r\n"),
        ),
    )
    auth = r(
        "auth",
        children=(
            st("v", "AUTH "),
            String("mechanism", "PLAIN"),
            st("sp", " "),
            String("response", "AHVzZXIAc2VjcmV0"),  # \0user\0secret
            st("e", "\r\n"),
        ),
    )
    verb = r("verb", children=(String("v", "NOOP"), String("argument", " hello"), st("e", "\r\n")))
    starttls = r(
        "starttls", children=(String("v", "STARTTLS"), String("argument", ""), st("e", "\r\n"))
    )
    session.connect(ehlo)
    session.connect(ehlo, mail)
    session.connect(mail, rcpt)
    session.connect(rcpt, data)
    session.connect(data, body)
    session.connect(rcpt, bdat)
    session.connect(ehlo, auth)
    session.connect(ehlo, verb)
    session.connect(ehlo, starttls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="interpreter with alephsmtp installed (default: this one)",
    )
    parser.add_argument("--pure", action="store_true", help="ALEPHSMTP_NO_EXTENSIONS=1")
    parser.add_argument("--tls", choices=["none", "implicit"], default="none")
    parser.add_argument("--cases", type=int, default=5000, help="boofuzz index_end")
    parser.add_argument(
        "--stride", type=int, default=12, help="use every N-th mutation of each string (default 12)"
    )
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("boofuzz-results"),
        help="directory for boofuzz's database and the server's log",
    )
    args = parser.parse_args(argv)
    args.results = args.results.resolve()  # the server runs in a directory of its own
    if bf is None:
        skip("boofuzz is not installed in this interpreter (pip install boofuzz trustme)")
    args.results.mkdir(parents=True, exist_ok=True)
    credentials = args.results / "credentials"
    credentials.write_text("user:secret\n")
    options = ["--sink", "--auth-file", str(credentials), "--auth-over-plaintext"]
    tag = f"{'pure' if args.pure else 'compiled'}-{args.tls}"
    # "none" still offers STARTTLS (the certificate is loaded), so the model's STARTTLS can succeed.
    mode = "implicit" if args.tls == "implicit" else "starttls"
    with serving(
        mode,
        pure=args.pure,
        options=options,
        lifetime=args.max_seconds + 120,
        python=args.server_python,
        keep_in=args.results / f"server-{tag}",
    ) as server:
        return _fuzz(server, args, tag)


def _fuzz(server: Server, args: argparse.Namespace, tag: str) -> int:
    context = None
    if args.tls == "implicit":
        context = ssl.create_default_context(cafile=str(server.ca_file))
    failures: list[str] = []
    deadline = time.monotonic() + args.max_seconds

    class Recording(bf.SSLSocketConnection if context else bf.TCPSocketConnection):  # type: ignore[misc]
        """Keeps every byte received in the current case, for the monitor."""

        received = b""

        def open(self) -> None:
            Recording.received = b""
            super().open()

        def recv(self, max_bytes: int) -> bytes:
            # boofuzz bounds recv with SO_RCVTIMEO, which a TLS socket's read retries past (it
            # then waits for the server's idle timeout): wait here, bounded, for a record.
            sock = self._sock
            waiting = isinstance(sock, ssl.SSLSocket) and not sock.pending()
            if waiting and not select.select([sock], [], [], self._recv_timeout)[0]:
                return b""
            data = super().recv(max_bytes)
            Recording.received += data
            return data

    class Replies(bf.monitors.BaseMonitor):  # type: ignore[misc]
        """Reads the rest of a case's replies, checks them and that the server lives."""

        cases = 0
        synopsis = ""

        def post_send(self, target=None, fuzz_data_logger=None, session=None) -> bool:  # type: ignore[no-untyped-def]
            Replies.cases += 1
            with contextlib.suppress(Exception):  # what is left of the replies; recv_timeout
                target.recv(65536)
            problems = _check_replies(Recording.received)
            if not server.alive():
                problems.append("the server process died")
            elif Replies.cases % 100 == 0 and (why := _healthy(server.port, context)):
                problems.append(f"health check failed: {why}")
            if time.monotonic() > deadline:
                raise _Deadline
            if problems:
                Replies.synopsis = "; ".join(problems)
                failures.append(f"case {session.total_mutant_index}: {Replies.synopsis}")
                return False
            return True

        def get_crash_synopsis(self) -> str:
            return Replies.synopsis

    if context is not None:
        connection = Recording(
            "127.0.0.1",
            server.port,
            recv_timeout=0.25,
            sslcontext=context,
            server_hostname="localhost",
        )
    else:
        connection = Recording("127.0.0.1", server.port, recv_timeout=0.25)
    log = open(args.results / f"boofuzz-{tag}.log", "w")  # noqa: SIM115 - closed below
    session = bf.Session(
        target=bf.Target(connection=connection, monitors=[Replies()]),
        index_end=args.cases,
        web_port=None,
        keep_web_open=False,
        fuzz_loggers=[bf.FuzzLoggerText(file_handle=log)],
        db_filename=str(args.results / f"boofuzz-{tag}.db"),
        receive_data_after_fuzz=True,
        ignore_connection_reset=True,  # the server may close after a 421; judged by the monitor
        ignore_connection_aborted=True,
        crash_threshold_request=10**9,
        crash_threshold_element=10**9,
        restart_sleep_time=0,
    )
    _build(session, args.stride)
    # The model's size: every single-field mutation of every request (the root node has none).
    size = sum(n.get_num_mutations() for n in session.nodes.values() if hasattr(n, "stack"))
    started = time.monotonic()
    stopped_by = "the end of the model or the case bound"
    try:
        session.fuzz(max_depth=1)  # one field mutated at a time, not combinations
    except _Deadline:
        stopped_by = "the time bound"
    finally:
        log.close()
    elapsed = time.monotonic() - started
    final = _healthy(server.port, context)
    tracebacks = server.tracebacks()
    print(
        f"boofuzz {version('boofuzz')}, {server.implementation} core, tls={args.tls}: "
        f"{Replies.cases} cases of {size} in {elapsed:.0f} s "
        f"(stopped by {stopped_by}); {len(failures)} failed cases; "
        f"final health check: {final or 'ok'}; tracebacks in the server log: {len(tracebacks)}"
    )
    for failure in failures[:50]:
        print("  " + failure)
    return 1 if failures or final or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
