"""One aiosmtpd program, run twice: on aiosmtpd 1.4.6 and on ``alephsmtp.compat.aiosmtpd``.

:func:`run_pair` builds the handler once per implementation (from that implementation's
modules, so a stock handler is each one's own), serves it on 127.0.0.1 (port 0), drives both
with the same client script (smtplib, step by step) and returns both transcripts and both
handlers, for the tests to compare. Handlers record what their hooks received.

The compat side is served through one of the entry points an aiosmtpd program uses:
``protocol`` (``loop.create_server(lambda: SMTP(handler, ...))``, as aiosmtpd's own
documentation shows) or ``controller`` (``Controller(handler, ...)``, which runs an
:class:`alephsmtp.SmtpServer`). aiosmtpd itself is always served the first way, since its
``Controller`` cannot listen on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiosmtpd.controller
import aiosmtpd.handlers
import aiosmtpd.lmtp
import aiosmtpd.smtp

import alephsmtp.compat.aiosmtpd.controller
import alephsmtp.compat.aiosmtpd.handlers
import alephsmtp.compat.aiosmtpd.lmtp
import alephsmtp.compat.aiosmtpd.smtp

HOST = "127.0.0.1"
SERVER_NAME = "mx.example"
IDENT = "test ESMTP"
MARK = "[h]"  # in every reply text a test handler chooses: those texts must match exactly
TIMEOUT = 10.0

IMPLEMENTATIONS = {
    "aiosmtpd": SimpleNamespace(
        name="aiosmtpd",
        smtp=aiosmtpd.smtp,
        controller=aiosmtpd.controller,
        handlers=aiosmtpd.handlers,
        lmtp=aiosmtpd.lmtp,
    ),
    "compat": SimpleNamespace(
        name="compat",
        smtp=alephsmtp.compat.aiosmtpd.smtp,
        controller=alephsmtp.compat.aiosmtpd.controller,
        handlers=alephsmtp.compat.aiosmtpd.handlers,
        lmtp=alephsmtp.compat.aiosmtpd.lmtp,
    ),
}

# What alephsmtp's EHLO lists besides aiosmtpd's keywords (docs/aiosmtpd.md).
EXTRA_KEYWORDS = {"PIPELINING", "CHUNKING", "BINARYMIME", "DSN"}


class LoopThread:
    """An event loop in a daemon thread, stopped and closed by :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def close(self, server: asyncio.AbstractServer | None = None) -> None:
        async def stop() -> None:
            if server is not None:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


@contextlib.contextmanager
def serve(
    impl: str,
    handler: Any,
    *,
    entry: str = "protocol",
    smtp_class: Callable[[SimpleNamespace], type] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **smtp_kwargs: Any,
) -> Iterator[tuple[str, int]]:
    """Serve ``handler`` on ``impl``; yields (host, port)."""
    ns = IMPLEMENTATIONS[impl]
    smtp_kwargs.setdefault("hostname", SERVER_NAME)
    smtp_kwargs.setdefault("ident", IDENT)
    smtp_kwargs.setdefault("enable_SMTPUTF8", True)  # the controllers' default
    cls = smtp_class(ns) if smtp_class is not None else ns.smtp.SMTP
    if entry == "controller":
        assert impl == "compat", "aiosmtpd's Controller cannot listen on port 0"
        hostname = smtp_kwargs.pop("hostname")

        class PairController(ns.controller.Controller):  # type: ignore[name-defined,misc]
            def factory(self) -> Any:
                return cls(self.handler, **self.SMTP_kwargs)

        controller = PairController(
            handler,
            hostname=HOST,
            port=0,
            ssl_context=ssl_context,
            server_hostname=hostname,
            **smtp_kwargs,
        )
        controller.start()
        try:
            yield HOST, controller.port
        finally:
            controller.stop()
        return
    thread = LoopThread()
    server = thread.run(
        thread.loop.create_server(lambda: cls(handler, **smtp_kwargs), HOST, 0, ssl=ssl_context)
    )
    try:
        yield HOST, server.sockets[0].getsockname()[1]
    finally:
        thread.close(server)


@dataclass
class Step:
    command: str
    code: int
    text: str


@dataclass
class Client:
    """An smtplib client that records every exchange as a :class:`Step`.

    ``unix_path`` connects to a Unix-domain socket instead; ``preamble`` is sent before the
    greeting is read (a PROXY protocol header); ``implicit_tls`` wraps the connection in TLS
    from the first byte.
    """

    host: str
    port: int
    implicit_tls: ssl.SSLContext | None = None
    unix_path: str | None = None
    preamble: bytes = b""
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(self.unix_path)
        else:
            sock = socket.create_connection((self.host, self.port), TIMEOUT)
        if self.preamble:
            sock.sendall(self.preamble)
        if self.implicit_tls is not None:
            sock = self.implicit_tls.wrap_socket(sock, server_hostname="localhost")
        self.smtp = smtplib.SMTP(timeout=TIMEOUT)
        self.smtp.sock = sock
        try:
            code, message = self.smtp.getreply()
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            code, message = 0, b"closed"
        self._record("connect", code, message)

    def _record(self, command: str, code: int, message: bytes | str) -> int:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        self.steps.append(Step(command, code, text))
        return code

    def cmd(self, line: str) -> int:
        """Send one command line, record its reply (code 0: the server closed)."""
        try:
            self.smtp.putcmd(line)
            code, message = self.smtp.getreply()
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            return self._record(line, 0, "closed")
        return self._record(line, code, message)

    def utf8_cmd(self, line: str) -> int:
        """A command line with UTF-8 in it (smtplib sends ASCII only)."""
        try:
            self.smtp.send(line.encode("utf-8") + b"\r\n")
            code, message = self.smtp.getreply()
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            return self._record(line, 0, "closed")
        return self._record(line, code, message)

    def ehlo(self, name: str = "client.example") -> int:
        return self.cmd(f"EHLO {name}")

    def data(self, body: bytes) -> int:
        """DATA, then the message (dot-stuffed, CRLF) if the server said 354."""
        code = self.cmd("DATA")
        if code != 354:
            return code
        body = re.sub(rb"\r?\n", b"\r\n", body)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        stuffed = re.sub(rb"(?m)^\.", b"..", body)
        try:
            self.smtp.send(stuffed + b".\r\n")
            code, message = self.smtp.getreply()
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            return self._record("<message>", 0, "closed")
        return self._record("<message>", code, message)

    def starttls(self, context: ssl.SSLContext) -> int:
        code = self.cmd("STARTTLS")
        if code == 220:
            self.smtp.sock = context.wrap_socket(self.smtp.sock, server_hostname="localhost")
            self.smtp.file = None
        return code

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.smtp.close()


Script = Callable[[Client], None]


@dataclass
class Outcome:
    steps: list[Step]
    handler: Any


def run_one(
    impl: str,
    make_handler: Callable[[SimpleNamespace], Any],
    script: Script,
    *,
    client_tls: ssl.SSLContext | None = None,
    preamble: bytes = b"",
    **serve_kwargs: Any,
) -> Outcome:
    handler = make_handler(IMPLEMENTATIONS[impl])
    with serve(impl, handler, **serve_kwargs) as (host, port):
        client = Client(host, port, implicit_tls=client_tls, preamble=preamble)
        try:
            script(client)
        finally:
            client.close()
    return Outcome(client.steps, handler)


def run_pair(
    make_handler: Callable[[SimpleNamespace], Any],
    script: Script,
    *,
    entry: str = "protocol",
    **serve_kwargs: Any,
) -> tuple[Outcome, Outcome]:
    """The same program and client script on aiosmtpd, then on the compat layer."""
    original = run_one("aiosmtpd", make_handler, script, **serve_kwargs)
    compat = run_one("compat", make_handler, script, entry=entry, **serve_kwargs)
    return original, compat


def ehlo_lines(text: str) -> tuple[str, list[str]]:
    lines = text.splitlines()
    return lines[0], lines[1:]


def assert_same_transcript(original: list[Step], compat: list[Step]) -> None:
    """Every reply code the same; the texts a handler chose (marked) the same; EHLO lists
    aiosmtpd's keywords, plus only the extensions alephsmtp serves on top."""
    assert [s.command for s in compat] == [s.command for s in original]
    for ours, theirs in zip(compat, original, strict=True):
        where = (
            f"{theirs.command!r}: aiosmtpd {theirs.code} {theirs.text!r}, "
            f"compat {ours.code} {ours.text!r}"
        )
        assert ours.code == theirs.code, where
        if MARK in theirs.text or MARK in ours.text:
            assert ours.text == theirs.text, where
        if theirs.command.startswith("EHLO") and theirs.code == 250:
            first, keywords = ehlo_lines(theirs.text)
            our_first, our_keywords = ehlo_lines(ours.text)
            assert our_first == first, where
            assert set(keywords) <= set(our_keywords), where
            assert set(our_keywords) - set(keywords) <= EXTRA_KEYWORDS, where


def free_port(low: int = 20000, high: int = 32767) -> int:
    """A TCP port free on 127.0.0.1 below the ephemeral range (aiosmtpd's Controller needs a
    fixed one; below 32768 no client connection takes it meanwhile)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(low, high)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")
