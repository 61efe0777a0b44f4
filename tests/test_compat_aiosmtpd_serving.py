"""Differential tests of how an aiosmtpd program is served: its controllers (threaded,
unthreaded, Unix socket, SMTPS), LMTP, the PROXY protocol, timeouts, subclass commands; and
the documented differences (docs/aiosmtpd.md), each shown on both implementations.
"""

from __future__ import annotations

import asyncio
import ipaddress
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
import trustme

from _aiosmtpd_pair import (
    HOST,
    IDENT,
    IMPLEMENTATIONS,
    MARK,
    SERVER_NAME,
    Client,
    Step,
    assert_same_transcript,
    free_port,
    run_one,
    run_pair,
    serve,
)
from alephsmtp.compat.aiosmtpd import smtp as compat_smtp

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:aiosmtpd",
    "ignore:Requiring AUTH while not requiring TLS:UserWarning",
)

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nHi there.\r\n"


class Keep:
    """Keeps (mail_from, rcpt_tos, content) of every message."""

    def __init__(self, ns: SimpleNamespace | None = None) -> None:
        self.messages: list[tuple[Any, ...]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return f"250 kept {MARK}"


def send(client: Client, rcpts: tuple[str, ...] = ("bob@example.com",)) -> None:
    client.ehlo()
    client.cmd("MAIL FROM:<alice@example.org>")
    for rcpt in rcpts:
        client.cmd(f"RCPT TO:<{rcpt}>")
    client.data(MESSAGE)
    client.cmd("QUIT")


@pytest.fixture(scope="module")
def tls() -> SimpleNamespace:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return SimpleNamespace(server=server, client=client)


# --- controllers -----------------------------------------------------------------------------


def controller_run(impl: str, script: Any, **kwargs: Any) -> tuple[list[Step], Any, Any]:
    """The implementation's own threaded Controller on a fixed free port."""
    ns = IMPLEMENTATIONS[impl]
    handler = Keep()
    controller = ns.controller.Controller(
        handler, hostname=HOST, port=free_port(), server_hostname=SERVER_NAME, **kwargs
    )
    controller.start()
    try:
        assert controller.smtpd is not None
        client = Client(HOST, controller.port, implicit_tls=kwargs.get("client_tls"))
        try:
            script(client)
        finally:
            client.close()
    finally:
        controller.stop()
    return client.steps, handler, controller


def test_threaded_controllers_serve_alike() -> None:
    (ours, our_handler, our_controller) = controller_run("compat", send, ident=IDENT)
    (theirs, their_handler, their_controller) = controller_run("aiosmtpd", send, ident=IDENT)
    assert_same_transcript(theirs, ours)
    assert our_handler.messages == their_handler.messages
    assert our_controller.SMTP_kwargs == their_controller.SMTP_kwargs
    # Stopped: nothing listens any more (aiosmtpd's documentation shows this too).
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, our_controller.port), 2).close()


def test_controller_as_a_context_manager_and_on_port_zero() -> None:
    handler = Keep()
    ns = IMPLEMENTATIONS["compat"]
    with ns.controller.Controller(handler, hostname=HOST, port=0) as controller:
        assert controller.port != 0
        client = Client(HOST, controller.port)
        send(client)
        client.close()
    assert handler.messages == [("alice@example.org", ["bob@example.com"], MESSAGE)]


@pytest.mark.parametrize("impl", ["aiosmtpd", "compat"])
def test_controller_keyword_arguments(impl: str) -> None:
    ns = IMPLEMENTATIONS[impl]
    with pytest.warns(DeprecationWarning, match="server_kwargs"):
        controller = ns.controller.Controller(
            Keep(), timeout=200, server_kwargs={"timeout": 400, "ident": "x"}
        )
    assert controller.SMTP_kwargs == {"timeout": 200, "ident": "x", "enable_SMTPUTF8": True}
    assert controller.hostname == ns.controller.get_localhost()
    assert controller.port == 8025
    controller.loop.close()


@pytest.mark.parametrize("impl", ["aiosmtpd", "compat"])
def test_a_failing_factory_fails_start(impl: str) -> None:
    ns = IMPLEMENTATIONS[impl]

    class Broken(ns.controller.Controller):  # type: ignore[misc,name-defined]
        def factory(self) -> Any:
            raise ValueError("no server today")

    controller = Broken(Keep(), hostname=HOST, port=free_port())
    with pytest.raises(ValueError, match="no server today"):
        controller.start()
    controller.stop(no_assert=True)


@pytest.mark.parametrize("impl", ["aiosmtpd", "compat"])
def test_unthreaded_controller(impl: str) -> None:
    ns = IMPLEMENTATIONS[impl]
    loop = asyncio.new_event_loop()
    handler = Keep()
    controller = ns.controller.UnthreadedController(
        handler, hostname=HOST, port=free_port(), loop=loop
    )
    controller.begin()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        client = Client(HOST, controller.port)
        send(client)
        client.close()
    finally:
        loop.call_soon_threadsafe(controller.end)
        assert controller.ended.wait(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert [s.code for s in client.steps] == [220, 250, 250, 250, 354, 250, 221]
    assert handler.messages == [("alice@example.org", ["bob@example.com"], MESSAGE)]


@pytest.mark.parametrize("threaded", [True, False])
def test_unix_socket_controllers_serve_alike(tmp_path: Any, threaded: bool) -> None:
    steps: dict[str, list[Step]] = {}
    kept: dict[str, Any] = {}
    for impl in ("aiosmtpd", "compat"):
        ns = IMPLEMENTATIONS[impl]
        path = str(tmp_path / f"{impl}.sock")
        handler = Keep()
        kwargs = {"server_hostname": SERVER_NAME, "ident": IDENT}
        if threaded:
            controller: Any = ns.controller.UnixSocketController(
                handler, unix_socket=path, **kwargs
            )
            controller.start()
            stop = controller.stop
        else:
            loop = asyncio.new_event_loop()
            controller = ns.controller.UnixSocketUnthreadedController(
                handler, unix_socket=path, loop=loop, **kwargs
            )
            controller.begin()
            thread = threading.Thread(target=loop.run_forever, daemon=True)
            thread.start()

            def stop(
                loop: asyncio.AbstractEventLoop = loop,
                thread: Any = thread,
                controller: Any = controller,
            ) -> None:
                loop.call_soon_threadsafe(controller.end)
                assert controller.ended.wait(10)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(10)
                loop.close()

        try:
            client = Client("", 0, unix_path=path)
            send(client)
            client.close()
        finally:
            stop()
        steps[impl], kept[impl] = client.steps, handler.messages
    assert_same_transcript(steps["aiosmtpd"], steps["compat"])
    assert kept["compat"] == kept["aiosmtpd"]
    assert steps["compat"][0].text == f"{SERVER_NAME} {IDENT}"


class Authenticated(Keep):
    sessions: list[Any]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((session.authenticated, session.ssl is not None))
        return f"250 kept {MARK}"


def test_smtps_controller(tls: SimpleNamespace) -> None:
    """``ssl_context``: TLS from the first byte. aiosmtpd refuses AUTH there (538: it
    requires STARTTLS itself); alephsmtp counts implicit TLS as TLS (RFC 8314)."""
    results = {}
    for impl in ("aiosmtpd", "compat"):
        ns = IMPLEMENTATIONS[impl]
        handler = Authenticated()

        def authenticator(*args: Any, ns: SimpleNamespace = ns) -> Any:
            return ns.smtp.AuthResult(success=True, auth_data=args[-1])

        controller = ns.controller.Controller(
            handler,
            hostname=HOST,
            port=free_port(),
            ssl_context=tls.server,
            server_hostname=SERVER_NAME,
            authenticator=authenticator,
        )
        controller.start()
        try:
            client = Client(HOST, controller.port, implicit_tls=tls.client)
            client.ehlo()
            client.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==")
            client.cmd("MAIL FROM:<alice@example.org>")
            client.cmd("RCPT TO:<bob@example.com>")
            client.data(MESSAGE)
            client.close()
        finally:
            controller.stop()
        results[impl] = (client.steps, handler.messages)
    (theirs, their_messages), (ours, our_messages) = results["aiosmtpd"], results["compat"]
    assert [s.code for s in theirs] == [220, 250, 538, 250, 250, 354, 250]
    assert [s.code for s in ours] == [220, 250, 235, 250, 250, 354, 250]
    assert their_messages == [(None, False)]  # aiosmtpd: session.ssl only after STARTTLS
    assert our_messages == [(True, True)]


# --- LMTP ------------------------------------------------------------------------------------


def test_lmtp_gives_one_reply_per_recipient() -> None:
    """aiosmtpd's LMTP answers the message once, whatever the number of recipients (an LMTP
    client then waits for the rest, RFC 2033 4.2); alephsmtp once per recipient."""

    def script(client: Client) -> None:
        client.cmd("EHLO client.example")
        client.cmd("LHLO client.example")
        client.cmd("MAIL FROM:<alice@example.org>")
        client.cmd("RCPT TO:<bob@example.com>")
        client.cmd("RCPT TO:<carol@example.com>")
        client.data(MESSAGE)
        client.smtp.sock.settimeout(0.5)
        try:
            code, text = client.smtp.getreply()
        except (TimeoutError, OSError, smtplib.SMTPServerDisconnected):
            code, text = 0, b"no second reply"
        client.steps.append(Step("<second recipient>", code, text.decode()))

    original, compat = run_pair(Keep, script, smtp_class=lambda ns: ns.lmtp.LMTP)
    assert_same_transcript(original.steps[:-1], compat.steps[:-1])
    assert original.steps[1].code == 500  # EHLO is not LMTP
    assert original.steps[-1].code == 0
    assert (compat.steps[-1].code, compat.steps[-1].text) == (250, f"kept {MARK}")
    assert compat.handler.messages == original.handler.messages


# --- the PROXY protocol ----------------------------------------------------------------------


class ProxyJudge:
    def __init__(self, ns: SimpleNamespace, verdict: Any = True) -> None:
        self.verdict = verdict
        self.seen: list[dict[str, Any]] = []
        self.peers: list[Any] = []

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> Any:
        tlv = proxy_data.tlv
        self.seen.append(
            {
                "valid": proxy_data.valid,
                "version": proxy_data.version,
                "command": proxy_data.command,
                "family": proxy_data.family,
                "protocol": proxy_data.protocol,
                "src": (proxy_data.src_addr, proxy_data.src_port),
                "dst": (proxy_data.dst_addr, proxy_data.dst_port),
                "rest": bytes(proxy_data.rest),
                "tlv": dict(tlv) if tlv is not None else None,
            }
        )
        return self.verdict

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        peer = session.peer
        self.peers.append((peer[0], session.proxy_data.src_addr))
        return f"250 via proxy {MARK}"


PROXY_V1 = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\n"


def proxy_v2(tlvs: bytes = b"") -> bytes:
    addresses = bytes([192, 0, 2, 10, 198, 51, 100, 1]) + (56324).to_bytes(2, "big")
    addresses += (25).to_bytes(2, "big")
    body = addresses + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


@pytest.mark.parametrize("entry", ["protocol", "controller"])
@pytest.mark.parametrize(
    "header",
    [PROXY_V1, proxy_v2(), proxy_v2(tlv(0x05, b"conn-42") + tlv(0x02, b"mx.example.org"))],
    ids=["v1", "v2", "v2-tlvs"],
)
def test_proxy_protocol_header_reaches_handle_proxy(entry: str, header: bytes) -> None:
    outcomes = {}
    for impl in ("aiosmtpd", "compat"):
        outcomes[impl] = run_one(
            impl,
            ProxyJudge,
            send,
            preamble=header,
            proxy_protocol_timeout=5,
            **({"entry": entry} if impl == "compat" else {}),
        )
    original, compat = outcomes["aiosmtpd"], outcomes["compat"]
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.seen == original.handler.seen
    (seen,) = compat.handler.seen
    assert seen["src"] == (ipaddress.ip_address("192.0.2.10"), 56324)
    assert compat.handler.peers == original.handler.peers == [("127.0.0.1", seen["src"][0])]


@pytest.mark.parametrize("verdict", [False, None])
def test_proxy_refused_by_handle_proxy_is_closed_without_greeting(verdict: Any) -> None:
    outcomes = {}
    for impl in ("aiosmtpd", "compat"):
        outcomes[impl] = run_one(
            impl,
            lambda ns: ProxyJudge(ns, verdict),
            lambda client: None,
            preamble=PROXY_V1,
            proxy_protocol_timeout=5,
        )
    assert outcomes["aiosmtpd"].steps == outcomes["compat"].steps == [Step("connect", 0, "closed")]


def test_proxy_without_handle_proxy_refuses_everyone() -> None:
    outcomes = {
        impl: run_one(impl, Keep, lambda c: None, preamble=PROXY_V1, proxy_protocol_timeout=5)
        for impl in ("aiosmtpd", "compat")
    }
    assert outcomes["aiosmtpd"].steps == outcomes["compat"].steps == [Step("connect", 0, "closed")]


def test_proxy_data_whole_raw() -> None:
    raws = {}
    for impl in ("aiosmtpd", "compat"):

        class Raw:
            def __init__(self, impl: str) -> None:
                self.impl = impl

            async def handle_PROXY(
                self, server: Any, session: Any, envelope: Any, data: Any
            ) -> Any:
                raws[self.impl] = bytes(data.whole_raw)
                return True

        run_one(
            impl, lambda ns, impl=impl: Raw(impl), send, preamble=PROXY_V1, proxy_protocol_timeout=5
        )
    assert raws["compat"] == raws["aiosmtpd"] == PROXY_V1


# --- commands of a subclass, HELP ------------------------------------------------------------


def ping_server(ns: SimpleNamespace) -> type:
    class PingServer(ns.smtp.SMTP):  # type: ignore[misc,name-defined]
        @ns.smtp.syntax("PING [ignored]")
        async def smtp_PING(self, arg: Any) -> None:
            await self.push(f"259 Pong {arg} {MARK}")

    return PingServer


def test_subclass_commands_and_help() -> None:
    """Commands a subclass adds are served; HELP lists them. HELP answers 214 here (RFC 5321
    4.2.3), 250 in aiosmtpd; the texts are the same."""

    def script(client: Client) -> None:
        client.cmd("PING")
        client.cmd("PING pong")
        client.cmd("HELP")
        client.cmd("HELP PING")
        client.cmd("HELP NOSUCH")
        client.ehlo()
        client.cmd("HELP MAIL")
        client.cmd("UNKNOWN")

    original, compat = run_pair(Keep, script, smtp_class=ping_server)
    codes = [(a.code, b.code) for a, b in zip(original.steps, compat.steps, strict=True)]
    assert codes == [
        (220, 220),
        (259, 259),
        (259, 259),
        (250, 214),
        (250, 214),
        (501, 501),
        (250, 250),
        (250, 214),
        (500, 500),
    ]
    for theirs, ours in zip(original.steps, compat.steps, strict=True):
        if not theirs.command.startswith("EHLO"):
            assert ours.text == theirs.text, theirs.command
    assert compat.steps[3].text == (
        "Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP PING QUIT RCPT RSET VRFY"
    )


def test_replacing_a_built_in_command_is_refused() -> None:
    class Custom(compat_smtp.SMTP):
        async def smtp_HELO(self, arg: str) -> None:
            await self.push("250 mine")

    with pytest.raises(NotImplementedError, match="smtp_HELO"):
        Custom(Keep())


# --- what needs a session hook (NEEDS.md) ----------------------------------------------------


class KeywordEditor:
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        kept = [line for line in responses if "8BITMIME" not in line]
        return [*kept[:-1], "250-XFOO", kept[-1]]


def test_handle_ehlo_edits_the_keywords() -> None:
    original, compat = run_pair(lambda ns: KeywordEditor(), lambda client: client.ehlo())
    theirs = original.steps[1].text.splitlines()
    ours = compat.steps[1].text.splitlines()
    assert "XFOO" in theirs
    assert "8BITMIME" not in theirs
    # What the hook kept, in its order; alephsmtp's extra keywords may stay (docs/aiosmtpd.md).
    assert [line for line in ours if line in theirs] == theirs
    assert "8BITMIME" not in ours


def xoauth_handler(ns: SimpleNamespace) -> Any:
    class XOAuth2:
        async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
            token = await server.challenge_auth("")
            return ns.smtp.AuthResult(success=token == b"token", auth_data=token)

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return f"250 as {session.auth_data!r} {MARK}"

    return XOAuth2()


def test_custom_auth_mechanism() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH XOAUTH2")
        client.cmd("dG9rZW4=")
        send(client)

    original, compat = run_pair(xoauth_handler, script, auth_require_tls=False)
    assert_same_transcript(original.steps, compat.steps)


def test_handle_auth_hook() -> None:
    class Auth:
        async def handle_AUTH(
            self, server: Any, session: Any, envelope: Any, args: list[str]
        ) -> str:
            session.authenticated = True
            return f"235 2.7.0 welcome {args[0]} {MARK}"

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH SPECIAL")

    original, compat = run_pair(lambda ns: Auth(), script, auth_require_tls=False)
    assert_same_transcript(original.steps, compat.steps)


# --- documented differences ------------------------------------------------------------------


def test_difference_bare_lf_ends_no_command() -> None:
    """aiosmtpd reads a command line that ends in a bare LF; alephsmtp refuses it (500 5.5.2,
    RFC 5321 2.3.8: lines end with CRLF; the same gap lets SMTP smuggling through)."""

    def script(client: Client) -> None:
        client.smtp.send(b"NOOP\n")
        client.smtp.sock.settimeout(2)
        code, text = client.smtp.getreply()
        client.steps.append(Step("NOOP<LF>", code, text.decode()))

    original, compat = run_pair(Keep, script)
    assert original.steps[-1].code == 250
    assert compat.steps[-1].code == 500


def test_difference_pipelining_is_offered_and_served() -> None:
    """aiosmtpd offers no PIPELINING (so aiosmtplib sends one command at a time); alephsmtp
    does, and answers a pipelined group in order."""
    results = {}
    for impl in ("aiosmtpd", "compat"):
        handler = Keep()
        with serve(impl, handler) as (host, port):

            async def go(port: int = port) -> Any:
                async with aiosmtplib.SMTP(hostname=host, port=port, timeout=10) as client:
                    errors, _ = await client.sendmail(
                        "alice@example.org",
                        ["bob@example.com", "carol@example.com"],
                        MESSAGE,
                    )
                    return client.supports_extension("pipelining"), errors

            results[impl] = (asyncio.run(go()), handler.messages)
    (their_pipelining, their_errors), their_messages = results["aiosmtpd"]
    (our_pipelining, our_errors), our_messages = results["compat"]
    assert (their_pipelining, our_pipelining) == (False, True)
    assert our_errors == their_errors == {}
    assert our_messages == their_messages


def test_difference_idle_timeout_says_421() -> None:
    """aiosmtpd closes an idle connection without a word; alephsmtp says 421 4.4.2 first
    (RFC 5321 4.5.3.2, 3.8)."""

    def script(client: Client) -> None:
        client.ehlo()
        client.smtp.sock.settimeout(10)
        start = time.monotonic()
        try:
            code, text = client.smtp.getreply()
        except smtplib.SMTPServerDisconnected:
            code, text = 0, b"closed"
        client.steps.append(Step("<idle>", code, text.decode()))
        assert time.monotonic() - start < 9

    original, compat = run_pair(Keep, script, timeout=0.3)
    assert original.steps[-1].code == 0
    assert compat.steps[-1].code == 421


def test_difference_auth_refused_by_an_authenticator_with_handled_true_gets_a_reply() -> None:
    """aiosmtpd sends nothing when an authenticator refuses with ``handled=True`` (the
    default), and the client waits; the layer answers 535."""

    def make(ns: SimpleNamespace) -> Any:
        return Keep()

    steps = {}
    for impl in ("aiosmtpd", "compat"):
        ns = IMPLEMENTATIONS[impl]

        def script(client: Client) -> None:
            client.ehlo()
            client.smtp.sock.settimeout(1)
            client.cmd("AUTH PLAIN AGFsaWNlAHdyb25n")

        steps[impl] = run_one(
            impl,
            make,
            script,
            auth_require_tls=False,
            authenticator=lambda *a, ns=ns: ns.smtp.AuthResult(success=False),
        ).steps
    assert steps["aiosmtpd"][-1].code == 0  # no reply within the client's second
    assert steps["compat"][-1].code == 535


def test_hooks_run_with_a_running_loop_and_may_await_anything() -> None:
    """A hook that really suspends (a sleep, a lock) runs as a task, with current_task set."""

    class Awaiting:
        def __init__(self) -> None:
            self.lock = asyncio.Lock()
            self.tasks: list[bool] = []

        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            async with self.lock, asyncio.timeout(5):
                await asyncio.sleep(0.01)
            self.tasks.append(asyncio.current_task() is not None)
            envelope.rcpt_tos.append(address)
            return f"250 after a pause {MARK}"

    original, compat = run_pair(lambda ns: Awaiting(), send)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.tasks == original.handler.tasks == [True]


def test_the_layer_needs_no_aiosmtpd_installed() -> None:
    """The layer imports nothing from aiosmtpd (a test-only dependency)."""
    code = (
        "import sys; sys.modules['aiosmtpd'] = None\n"
        "import alephsmtp.compat.aiosmtpd.controller, alephsmtp.compat.aiosmtpd.handlers\n"
        "import alephsmtp.compat.aiosmtpd.lmtp, alephsmtp.compat.aiosmtpd.proxy_protocol\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


BENCHMARK_SERVERS = Path(__file__).resolve().parents[1] / "benchmarks" / "_servers.py"


@pytest.mark.skipif(not BENCHMARK_SERVERS.is_file(), reason="benchmarks/ not shipped here")
@pytest.mark.parametrize("kind", ["aiosmtpd", "aiosmtpd-compat"])
def test_the_benchmark_program_serves(kind: str) -> None:
    """benchmarks/_servers.py runs one aiosmtpd program for both kinds (only its import line
    differs); each must serve a message (the figures come from benchmarks/server.py)."""
    script = BENCHMARK_SERVERS
    with subprocess.Popen(
        [sys.executable, str(script), kind, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().split()
            assert ready[0] == "READY", ready
            port = int(ready[1])
            assert ready[2] == ("aiosmtpd" if kind == "aiosmtpd" else "alephsmtp.compat.aiosmtpd")
            with smtplib.SMTP(HOST, port, timeout=10) as client:
                assert client.sendmail("a@example.org", ["b@example.com"], MESSAGE) == {}
        finally:
            proc.terminate()
            _, stderr = proc.communicate(timeout=10)
    assert "Traceback" not in stderr
