"""The aiosmtpd layer's smaller parts: reply strings taken verbatim, hooks that misbehave,
``push()``, the server object hooks see, aiosmtpd's legacy APIs, the public helpers (compared
with aiosmtpd's where both have them), and what alephsmtp adds (CHUNKING)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from types import SimpleNamespace
from typing import Any

import aiosmtpd.proxy_protocol
import aiosmtpd.smtp
import pytest

from _aiosmtpd_pair import (
    HOST,
    IMPLEMENTATIONS,
    MARK,
    Client,
    Step,
    assert_same_transcript,
    run_one,
    run_pair,
    serve,
)
from _harness import FakeTransport, Harness, settle
from alephsmtp.compat.aiosmtpd import controller as compat_controller
from alephsmtp.compat.aiosmtpd import handlers as compat_handlers
from alephsmtp.compat.aiosmtpd import proxy_protocol as compat_proxy
from alephsmtp.compat.aiosmtpd import smtp as compat_smtp
from alephsmtp.compat.aiosmtpd._support import verbatim_reply
from alephsmtp.replies import Reply
from alephsmtp.session import SmtpSession

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:aiosmtpd",
    "ignore:Requiring AUTH while not requiring TLS:UserWarning",
)

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def send(client: Client) -> None:
    client.ehlo()
    client.cmd("MAIL FROM:<alice@example.org>")
    client.cmd("RCPT TO:<bob@example.com>")
    client.data(MESSAGE)
    client.cmd("QUIT")


# --- replies as hooks write them -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reply"),
    [
        ("250 OK", Reply(250, "", "OK")),
        ("550 5.1.1 No such user", Reply(550, "", "5.1.1 No such user")),
        ("250-a\r\n250 b", Reply(250, "", ("a", "b"))),
        ("250-a\n250-b\n250 c\r\n", Reply(250, "", ("a", "b", "c"))),
        (b"221 Bye", Reply(221, "", "Bye")),
        ("250", Reply(250, "", "")),
        ("250-unfinished", Reply(250, "", "unfinished")),
    ],
)
def test_verbatim_reply(status: str | bytes, reply: Reply) -> None:
    assert verbatim_reply(status) == reply
    wire = verbatim_reply(status).to_bytes(enhanced_status_codes=True)
    if isinstance(status, str) and not status.endswith("unfinished"):
        expected = status.replace("\r\n", "\n").rstrip("\n").replace("\n", "\r\n") + "\r\n"
        assert wire == expected.encode()


@pytest.mark.parametrize(
    "status",
    ["OK", "", "250 a\r\n550 b", "250 a\r\n250 b", "250 ok\r\n421 smuggled", "99 x", "600 x"],
)
def test_not_a_reply(status: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        verbatim_reply(status)


class Misbehaving:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> Any:
        envelope.rcpt_tos.append(address)
        return self.answer


@pytest.mark.parametrize("answer", ["OK", None, 42, "250 a\r\n550 b"])
def test_a_hook_answer_that_is_no_reply_is_a_temporary_failure(
    answer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "alephsmtp.compat.aiosmtpd"):
        outcome = run_one("compat", lambda ns: Misbehaving(answer), send)
    # RCPT failed (451), so alephsmtp has no recipient and DATA is out of order.
    assert [s.code for s in outcome.steps] == [220, 250, 250, 451, 503, 221]
    assert "not a reply" in caplog.text


class Exceptional:
    def __init__(self, how: str) -> None:
        self.how = how

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raise RuntimeError("storage down")

    def handle_exception(self, error: Exception) -> Any:
        if self.how == "none":
            return None
        if self.how == "raise":
            raise ValueError("handler of handlers broke")
        return f"452 4.3.1 plain function {MARK}"


@pytest.mark.parametrize("how", ["none", "raise", "sync"])
def test_handle_exception_misbehaving_or_synchronous(how: str) -> None:
    outcome = run_one("compat", lambda ns: Exceptional(how), send)
    final = outcome.steps[-2]
    if how == "sync":
        assert (final.code, final.text) == (452, f"4.3.1 plain function {MARK}")
    else:
        assert (final.code, final.text) == (451, "4.3.0 Error: local error in processing")
    assert outcome.steps[-1].code == 221


class Pusher:
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await server.push(f"250-pushed first {MARK}")
        await server.push(f"250-pushed second {MARK}".encode())
        envelope.rcpt_tos.append(address)
        return f"250 returned last {MARK}"


def test_push_lines_come_before_the_reply() -> None:
    original, compat = run_pair(lambda ns: Pusher(), send)
    assert_same_transcript(original.steps, compat.steps)
    assert (
        compat.steps[3].text == f"pushed first {MARK}\npushed second {MARK}\nreturned last {MARK}"
    )


class ServerView:
    def __init__(self, ns: SimpleNamespace) -> None:
        self.views: list[tuple[Any, ...]] = []

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> Any:
        self.views.append(
            (
                server.hostname,
                server.event_handler is self,
                server.session is session,
                server.envelope is envelope,
                server.transport is not None,
                server.loop is asyncio.get_running_loop(),
                session.loop is asyncio.get_running_loop(),
                server.data_size_limit,
                server.enable_SMTPUTF8,
                server.tls_context,
                server.require_starttls,
                type(server.__ident__),
            )
        )
        envelope.mail_from = address
        return f"250 seen {MARK}"


def test_hooks_see_the_server_object_alike() -> None:
    original, compat = run_pair(ServerView, send)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.views == original.handler.views
    assert all(compat.handler.views[0][1:7])


class Legacy:
    async def process_message(
        self, peer: Any, mail_from: str, rcpt_tos: list[str], data: Any
    ) -> Any:
        self.seen = (peer[0], mail_from, rcpt_tos, data)
        return None


def test_the_pre_1_0_process_message_api() -> None:
    original, compat = run_pair(lambda ns: Legacy(), send)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.seen == original.handler.seen
    assert compat.steps[-2].text == original.steps[-2].text == "OK"


# --- helpers and types, compared with aiosmtpd's ---------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n",
        b"auth login YWxpY2U=",
        b"  AUTH   CRAM-MD5 abcdef\r\n",
        b"AUTH LOGIN\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
    ],
)
def test_sanitize_masks_credentials_alike(line: bytes) -> None:
    assert compat_smtp.sanitize(line) == aiosmtpd.smtp.sanitize(line)


def test_auth_types_hide_secrets() -> None:
    login = compat_smtp.LoginPassword(b"alice", b"s3cret")
    assert repr(login) == str(login) == repr(aiosmtpd.smtp.LoginPassword(b"alice", b"s3cret"))
    assert "s3cret" not in repr(compat_smtp.AuthResult(success=True, auth_data=login))
    with pytest.raises(TypeError):
        compat_smtp.AuthResult(True)  # type: ignore[misc] - keyword arguments only


@pytest.mark.parametrize("name", ["xoauth2", "MECH-1", "bad name", "semi;colon"])
def test_auth_mechanism_names_alike(name: str) -> None:
    def outcome(module: Any) -> Any:
        try:
            return module.auth_mechanism(name)(lambda: None).__auth_mechanism_name__
        except ValueError as error:
            return str(error)

    assert outcome(compat_smtp) == outcome(aiosmtpd.smtp)


def test_login_data_is_deprecated_but_there(caplog: pytest.LogCaptureFixture) -> None:
    session = compat_smtp.Session(None)
    with caplog.at_level(logging.WARNING):
        session.login_data = b"alice"
        assert session.login_data == b"alice"
    assert "deprecated" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"proxy_protocol_timeout": 0}, ValueError),
        ({"command_call_limit": "10"}, TypeError),
        ({"command_call_limit": {"NOOP": "1"}}, TypeError),
    ],
)
def test_smtp_parameters_are_checked_alike(kwargs: dict[str, Any], error: type) -> None:
    for module in (aiosmtpd.smtp, compat_smtp):
        with pytest.raises(error):
            module.SMTP(object(), loop=asyncio.new_event_loop(), **kwargs)


class _WithHook:
    async def handle_AUTH(self, *args: Any) -> str:
        return "235 ok"


class _WithMechanism:
    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
        return None

    @compat_smtp.auth_mechanism("x-named")
    async def auth_anything(self, server: Any, args: list[str]) -> Any:
        return None


class _WithHelper:
    """Not a mechanism to the layer: no client could name it (RFC 4422 3.1: 20 characters)."""

    def auth_check_a_user_against_the_database(self) -> bool:
        return True


class _ChallengeLogger(compat_smtp.SMTP):
    async def challenge_auth(self, *args: Any, **kwargs: Any) -> Any:
        return await super().challenge_auth(*args, **kwargs)


class _OtherPrompt(compat_smtp.SMTP):
    AuthLoginUsernameChallenge = "Login:"


class _Pinging(compat_smtp.SMTP):
    async def smtp_PING(self, arg: str) -> None:
        await self.push("250 pong")


_LONG = "CHECK_A_USER_AGAINST_THE_DATABASE"


@pytest.mark.parametrize(
    ("cls", "handler", "kwargs", "mechanisms", "in_layer", "only_aiosmtpd"),
    [
        (compat_smtp.SMTP, object(), {}, ("LOGIN", "PLAIN"), False, set()),
        # aiosmtpd compares the names to exclude as written (docs/aiosmtpd.md).
        (
            compat_smtp.SMTP,
            object(),
            {"auth_exclude_mechanism": ["login"]},
            ("PLAIN",),
            False,
            {"LOGIN"},
        ),
        (_Pinging, compat_handlers.Sink(), {}, ("LOGIN", "PLAIN"), False, set()),
        (compat_smtp.SMTP, _WithHook(), {}, ("LOGIN", "PLAIN"), True, set()),
        (
            compat_smtp.SMTP,
            _WithMechanism(),
            {},
            ("LOGIN", "PLAIN", "X-NAMED", "XOAUTH2"),
            True,
            set(),
        ),
        (
            compat_smtp.SMTP,
            _WithMechanism(),
            {"auth_exclude_mechanism": ["XOAUTH2", "X-NAMED"]},
            ("LOGIN", "PLAIN"),
            False,
            set(),
        ),
        (compat_smtp.SMTP, _WithHelper(), {}, ("LOGIN", "PLAIN"), False, {_LONG}),
        (_ChallengeLogger, object(), {}, ("LOGIN", "PLAIN"), True, set()),
        (_OtherPrompt, object(), {}, ("LOGIN", "PLAIN"), True, set()),
        (_OtherPrompt, object(), {"auth_exclude_mechanism": ["LOGIN"]}, ("PLAIN",), False, set()),
    ],
)
async def test_auth_runs_in_the_layer_only_for_programs_that_change_it(
    cls: type,
    handler: Any,
    kwargs: dict[str, Any],
    mechanisms: tuple[str, ...],
    in_layer: bool,
    only_aiosmtpd: set[str],
) -> None:
    """Without AUTH hooks of its own a program's AUTH is alephsmtp's session's (LOGIN,
    PLAIN): no auth_command handler is connected, nothing is paid. The mechanisms offered are
    aiosmtpd's, but for the differences docs/aiosmtpd.md lists."""
    smtp = cls(handler, auth_require_tls=False, **kwargs)
    assert smtp._mechanisms == mechanisms
    theirs = aiosmtpd.smtp.SMTP(handler, loop=asyncio.get_running_loop(), **kwargs)
    assert {name.upper() for name in theirs._auth_methods} - set(mechanisms) == only_aiosmtpd
    assert set(mechanisms) <= {name.upper() for name in theirs._auth_methods}
    session = SmtpSession(smtp.session_config(), smtp.attach)
    session.connection_made(FakeTransport(session))
    try:
        assert bool(session.auth_command) is in_layer
        assert bool(session.auth) is True
    finally:
        session.close()


async def test_challenge_auth_is_for_an_auth_command() -> None:
    smtp = compat_smtp.SMTP(_WithMechanism())
    with pytest.raises(RuntimeError, match="answering AUTH"):
        await smtp.challenge_auth("x")
    session = SmtpSession(smtp.session_config(), smtp.attach)
    transport = FakeTransport(session)
    session.connection_made(transport)
    with pytest.raises(RuntimeError, match="answering AUTH"):
        await smtp.challenge_auth("x")  # served, but no AUTH command is being answered
    assert b"334" not in transport.written
    session.close()


def test_get_localhost_alike() -> None:
    assert compat_controller.get_localhost() == aiosmtpd.controller.get_localhost()


TLVS = (
    b"\x01\x00\x02h2"  # ALPN
    b"\x05\x00\x07conn-42"  # UNIQUE_ID
    b"\x20\x00\x0f\x07\x00\x00\x00\x00\x21\x00\x07TLSv1.3"  # SSL with a version sub-TLV
    b"\xe0\x00\x01x"  # a type the specification does not name
)


def test_proxy_tlv_parsing_alike() -> None:
    ours, theirs = compat_proxy.ProxyTLV, aiosmtpd.proxy_protocol.ProxyTLV
    assert ours.parse(TLVS) == theirs.parse(TLVS)
    assert dict(ours.from_raw(TLVS) or {}) == dict(theirs.from_raw(TLVS) or {})
    assert ours.from_raw(TLVS).SSL_VERSION == b"TLSv1.3"  # type: ignore[union-attr]
    assert ours.from_raw(b"") is None
    assert ours.parse(TLVS[:-1], partial_ok=True) == theirs.parse(TLVS[:-1], partial_ok=True)
    with pytest.raises(compat_proxy.MalformedTLV):
        ours.from_raw(TLVS[:-1])
    with pytest.raises(compat_proxy.UnknownTypeTLV):
        ours.from_raw(TLVS, strict=True)
    assert ours.name_to_num("SSL_CN") == theirs.name_to_num("SSL_CN") == 0x22
    assert ours.name_to_num("nope") is None


def test_proxy_local_header_alike() -> None:
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    seen: dict[str, Any] = {}

    class Judge:
        def __init__(self, impl: str) -> None:
            self.impl = impl

        async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> Any:
            seen[self.impl] = (bool(data), data.version, data.command, data.src_addr)
            return True

    steps = {
        impl: run_one(
            impl, lambda ns, impl=impl: Judge(impl), send, preamble=local, proxy_protocol_timeout=5
        ).steps
        for impl in ("aiosmtpd", "compat")
    }
    assert_same_transcript(steps["aiosmtpd"], steps["compat"])
    assert seen["compat"] == seen["aiosmtpd"]
    assert seen["compat"][2] == compat_proxy.V2_CMD.LOCAL


@pytest.mark.parametrize(
    ("handler", "args"),
    [
        ("Sink", []),
        ("Sink", ["x"]),
        ("Debugging", []),
        ("Debugging", ["stderr"]),
        ("Debugging", ["nope"]),
        ("Mailbox", []),
        ("Mailbox", ["a", "b"]),
    ],
)
def test_from_cli_alike(handler: str, args: list[str], tmp_path: Any) -> None:
    def outcome(module: Any) -> Any:
        parser = argparse.ArgumentParser()
        try:
            made = getattr(module, handler).from_cli(parser, *args)
        except SystemExit as stop:
            return ("exit", stop.code)
        return type(made).__name__

    assert outcome(compat_handlers) == outcome(aiosmtpd.handlers)


# --- what alephsmtp adds ----------------------------------------------------------------------


class KeepAll:
    def __init__(self, ns: SimpleNamespace) -> None:
        self.messages: list[Any] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (envelope.mail_from, envelope.mail_options, envelope.rcpt_tos, envelope.content)
        )
        return f"250 kept {len(envelope.content)} octets {MARK}"


def test_chunking_reaches_handle_data() -> None:
    """CHUNKING (RFC 3030), which aiosmtpd lacks: BDAT chunks make one message for
    handle_DATA; DSN parameters reach the hooks' options."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("MAIL FROM:<alice@example.org> BODY=BINARYMIME RET=HDRS")
        client.cmd("RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE")
        client.smtp.send(b"BDAT 10\r\nSubject: hBDAT 11 LAST\r\ni\r\n\r\nbody\r\n")
        for command in ("BDAT 10", "BDAT 11 LAST"):
            code, text = client.smtp.getreply()
            client.steps.append(Step(command, code, text.decode()))

    outcome = run_one("compat", KeepAll, script)
    assert [s.code for s in outcome.steps] == [220, 250, 250, 250, 250, 250]
    assert outcome.handler.messages == [
        (
            "alice@example.org",
            ["BODY=BINARYMIME", "RET=HDRS"],
            ["bob@example.com"],
            b"Subject: hi\r\n\r\nbody\r\n",
        )
    ]
    assert outcome.steps[-1].text == f"kept 21 octets {MARK}"


def test_pipelined_commands_are_answered_in_order() -> None:
    handler = KeepAll(IMPLEMENTATIONS["compat"])
    with serve("compat", handler) as (host, port), socket.create_connection((host, port)) as s:
        s.settimeout(10)
        data = b""
        s.sendall(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        )
        while data.count(b"\r\n354 ") < 1:
            data += s.recv(4096)
        s.sendall(b"x\r\n.\r\nRSET\r\nQUIT\r\n")
        while b"221 " not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    codes = [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"221"]
    assert handler.messages[0][3] == b"x\r\n"


def test_the_controller_stops_gracefully() -> None:
    """A session in the middle of a transaction may finish it when the controller stops."""
    handler = KeepAll(IMPLEMENTATIONS["compat"])
    controller = compat_controller.Controller(handler, hostname=HOST, port=0)
    controller.start()
    client = Client(HOST, controller.port)
    client.ehlo()
    client.cmd("MAIL FROM:<alice@example.org>")
    idle = Client(HOST, controller.port)
    try:
        import threading

        stopper = threading.Thread(target=controller.stop)
        stopper.start()
        code, _ = idle.smtp.getreply()  # the idle session is told at once
        client.cmd("RCPT TO:<bob@example.com>")
        client.data(MESSAGE)
        stopper.join(10)
    finally:
        client.close()
        idle.close()
    assert code == 421
    assert [s.code for s in client.steps[-3:]] == [250, 354, 250]
    assert len(handler.messages) == 1


class _Asking:
    """A mechanism of its own that asks once and records how its exchange ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def auth_X_ASK(self, server: Any, args: list[str]) -> Any:
        try:
            answer = await server.challenge_auth("well?")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        self.ended.append("MISSING" if answer is compat_smtp.MISSING else "answered")
        return compat_smtp.AuthResult(success=False)


def _asking_session() -> tuple[_Asking, Harness]:
    handler = _Asking()
    smtp = compat_smtp.SMTP(handler, auth_require_tls=False, hostname="mx.test")
    config = smtp.session_config()
    h = Harness(
        smtp.attach,
        hostname=config.hostname,
        enhanced_status_codes=False,
        auth_mechanisms=config.auth_mechanisms,
        auth_over_plaintext=True,
    )
    h.send(b"EHLO c\r\nAUTH X_ASK\r\n")
    return handler, h


async def test_a_client_gone_during_a_challenge_ends_the_hook_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As in aiosmtpd, the hook is cancelled; nothing is logged as a fault."""
    handler, h = _asking_session()
    await settle()
    assert h.replies()[-1] == "334 d2VsbD8="
    with caplog.at_level(logging.ERROR):
        h.transport.close()
        await settle()
    assert handler.ended == ["cancelled"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_answer_line_over_the_limit_ends_the_exchange() -> None:
    """RFC 4954 4: 12,288 octets at most; a longer line gets a 5xx, the session goes on."""
    handler, h = _asking_session()
    await settle()
    h.output()
    h.send(b"A" * 13000 + b"\r\nNOOP\r\n")
    await settle()
    replies = h.replies()
    assert [line[:3] for line in replies] == ["501", "250"]
    assert "too long" in replies[0]
    assert handler.ended == ["MISSING"]
