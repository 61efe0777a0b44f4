"""Differential tests: the same aiosmtpd handler classes on aiosmtpd 1.4.6 and on
``alephsmtp.compat.aiosmtpd``, driven by the same smtplib script.

Each test compares the two transcripts (every reply code; the texts a handler chose, marked
``[h]``) and what the handler's hooks received (envelope and session at each hook). Where
aiosmtpd's behaviour is a defect the layer does not copy, the test says what each side does;
every such difference is listed in docs/aiosmtpd.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import smtplib
import ssl
from types import SimpleNamespace
from typing import Any

import pytest
import trustme

from _aiosmtpd_pair import (
    IDENT,
    MARK,
    SERVER_NAME,
    Client,
    assert_same_transcript,
    run_one,
    run_pair,
)
from alephsmtp.testing import SmtpTestServer

pytestmark = pytest.mark.filterwarnings(
    # aiosmtpd's own warnings about deprecated hooks and insecure AUTH settings.
    "ignore::DeprecationWarning:aiosmtpd",
    "ignore:Requiring AUTH while not requiring TLS:UserWarning",
)

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nHi there.\r\n.dot line\r\n"
ENTRIES = ["protocol", "controller"]


def session_view(session: Any) -> dict[str, Any]:
    peer = session.peer
    return {
        "peer": peer[0] if isinstance(peer, tuple) else peer,
        "host_name": session.host_name,
        "extended_smtp": session.extended_smtp,
        "ssl": sorted(session.ssl) if session.ssl is not None else None,
        "authenticated": session.authenticated,
        "auth_data": session.auth_data,
    }


def envelope_view(envelope: Any) -> dict[str, Any]:
    names = ("mail_from", "mail_options", "rcpt_tos", "rcpt_options", "smtp_utf8")
    view = {name: getattr(envelope, name) for name in names}
    view["content"] = envelope.content
    view["original_content"] = envelope.original_content
    return view


class Recorder:
    """Every hook records what it was given and returns MISSING: the server's defaults."""

    def __init__(self, ns: SimpleNamespace, awaits: bool = False) -> None:
        self.missing = ns.smtp.MISSING
        self.awaits = awaits
        self.calls: list[tuple[Any, ...]] = []

    async def _note(self, hook: str, session: Any, envelope: Any, *args: Any) -> Any:
        if self.awaits:
            await asyncio.sleep(0)  # a hook that suspends: run as a task
        self.calls.append((hook, session_view(session), envelope_view(envelope), args))
        return self.missing

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> Any:
        return await self._note("HELO", session, envelope, hostname)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> Any:
        return await self._note("MAIL", session, envelope, address, options)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> Any:
        return await self._note("RCPT", session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> Any:
        return await self._note("DATA", session, envelope)

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> Any:
        return await self._note("RSET", session, envelope)

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: Any) -> Any:
        return await self._note("NOOP", session, envelope, arg)

    async def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> Any:
        return await self._note("VRFY", session, envelope, address)

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> Any:
        return await self._note("QUIT", session, envelope)


def transaction(client: Client, *, rcpts: tuple[str, ...] = ("bob@example.com",)) -> None:
    client.cmd("MAIL FROM:<alice@example.org>")
    for rcpt in rcpts:
        client.cmd(f"RCPT TO:<{rcpt}>")
    client.data(MESSAGE)


def full_dialogue(client: Client) -> None:
    client.ehlo()
    client.cmd("NOOP hello")
    client.cmd("VRFY <bob@example.com>")
    client.cmd("MAIL FROM:<alice@example.org> SIZE=100 BODY=8BITMIME")
    client.cmd("RCPT TO:<bob@example.com>")
    client.cmd("RCPT TO:<carol@example.com>")
    client.data(MESSAGE)
    client.cmd("MAIL FROM:<>")
    client.cmd("RCPT TO:<dave@example.com>")
    client.cmd("RSET")
    client.cmd("HELO client.example")
    transaction(client)
    client.cmd("QUIT")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("awaits", [False, True], ids=["await-free", "awaiting"])
def test_hooks_returning_missing_get_the_defaults_and_the_same_arguments(
    entry: str, awaits: bool
) -> None:
    original, compat = run_pair(lambda ns: Recorder(ns, awaits), full_dialogue, entry=entry)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.calls == original.handler.calls
    hooks = " ".join(call[0] for call in compat.handler.calls)
    assert hooks == "NOOP VRFY MAIL RCPT RCPT DATA MAIL RCPT RSET HELO MAIL RCPT DATA QUIT"


def test_default_texts_of_a_plain_transaction_are_aiosmtpd_s() -> None:
    """With the stock Sink (no hooks) every reply, text included, is aiosmtpd's but EHLO's
    extra keywords."""

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        client.cmd("NOOP")
        client.cmd("RSET")
        client.cmd("VRFY bob")
        client.cmd("QUIT")

    original, compat = run_pair(lambda ns: ns.handlers.Sink(), script)
    assert_same_transcript(original.steps, compat.steps)
    for ours, theirs in zip(compat.steps, original.steps, strict=True):
        if not ours.command.startswith("EHLO"):
            assert ours.text == theirs.text, ours.command
    assert compat.steps[0].text == f"{SERVER_NAME} {IDENT}"


class Filter:
    """aiosmtpd's documentation example, with marked texts: a relay for example.com."""

    def __init__(self, ns: SimpleNamespace) -> None:
        self.messages: list[tuple[Any, ...]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not address.endswith("@example.com"):
            return f"550 not relaying to that domain {MARK}"
        envelope.rcpt_tos.append(address)
        return f"250 OK {MARK}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return f"250 Message accepted for delivery {MARK}"


@pytest.mark.parametrize("entry", ENTRIES)
def test_filter_refuses_and_accepts_with_its_own_texts(entry: str) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        transaction(client, rcpts=("bob@example.com", "eve@example.net", "carol@example.com"))
        transaction(client, rcpts=("eve@example.net",))  # nobody accepted: DATA gets 503
        client.cmd("QUIT")

    original, compat = run_pair(Filter, script, entry=entry)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.messages == original.handler.messages
    assert compat.handler.messages == [
        ("alice@example.org", ["bob@example.com", "carol@example.com"], MESSAGE)
    ]
    refusal = [s for s in compat.steps if s.command == "DATA"][-1]
    assert refusal.code == 503


class ForgetfulHooks:
    """Hooks that say 250 but do not record the address: the server must notice."""

    def __init__(self, ns: SimpleNamespace, forget: str) -> None:
        self.forget = forget

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if self.forget != "EHLO":
            session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.forget != "MAIL":
            envelope.mail_from = address
        return f"250 sender noted {MARK}"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.forget != "RCPT":
            envelope.rcpt_tos.append(address)
        return f"250 recipient noted {MARK}"


@pytest.mark.parametrize("forget", ["EHLO", "MAIL", "RCPT", "nothing"])
def test_a_hook_that_does_not_record_leaves_the_transaction_unstarted(forget: str) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        client.cmd("QUIT")

    original, compat = run_pair(lambda ns: ForgetfulHooks(ns, forget), script)
    assert_same_transcript(original.steps, compat.steps)
    codes = [s.code for s in compat.steps]
    expected = {
        "EHLO": [220, 250, 503, 503, 503, 221],  # MAIL: send HELO first; RCPT, DATA follow
        "MAIL": [220, 250, 250, 503, 503, 221],  # RCPT: need MAIL
        "RCPT": [220, 250, 250, 250, 503, 221],  # DATA: need RCPT
        "nothing": [220, 250, 250, 250, 354, 250, 221],
    }[forget]
    assert codes == expected


class Greeter:
    def __init__(self, ns: SimpleNamespace) -> None:
        self.seen: list[tuple[str, str]] = []

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self.seen.append(("HELO", hostname))
        return f"250 hello {hostname} {MARK}"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.seen.append(("EHLO", hostname))
        return [f"250-{server.hostname} greets {hostname}", *responses[1:]]

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: Any) -> str:
        return f"250 noop {arg} {MARK}"

    async def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> str:
        return f"550 no such user {address} {MARK}"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return f"250-reset done {MARK}\r\n250 and more {MARK}"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return f"221 see you {MARK}"


def test_command_hooks_choose_their_replies() -> None:
    def script(client: Client) -> None:
        client.cmd("HELO one.example")
        client.ehlo("two.example")
        client.cmd("NOOP")
        client.cmd("NOOP ping")
        client.cmd("VRFY <bob@example.com>")
        client.cmd("RSET")
        transaction(client)
        client.cmd("QUIT")

    original, compat = run_pair(Greeter, script)
    assert_same_transcript(original.steps, compat.steps)
    assert (
        compat.handler.seen
        == original.handler.seen
        == [
            ("HELO", "one.example"),
            ("EHLO", "two.example"),
        ]
    )
    ehlo = next(s for s in compat.steps if s.command.startswith("EHLO"))
    assert ehlo.text.splitlines()[0] == f"{SERVER_NAME} greets two.example"


class OldStyleEhlo:
    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        return "250 HELP"


def test_the_deprecated_four_argument_ehlo_hook() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)

    with pytest.warns(DeprecationWarning, match="5-argument handle_EHLO"):
        original, compat = run_pair(lambda ns: OldStyleEhlo(), script)
    assert_same_transcript(original.steps, compat.steps)


class Failing:
    """handle_DATA raises; with ``recovers``, handle_exception chooses the reply."""

    def __init__(self, ns: SimpleNamespace, recovers: bool, awaits: bool = False) -> None:
        self.errors: list[str] = []
        self.awaits = awaits
        if recovers:
            self.handle_exception = self._handle_exception

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.awaits:
            await asyncio.sleep(0)
        raise ValueError("secret detail")

    async def _handle_exception(self, error: Exception) -> str:
        self.errors.append(repr(error))
        return f"451 4.3.0 please try later {MARK}"


@pytest.mark.parametrize("awaits", [False, True], ids=["await-free", "awaiting"])
def test_handle_exception_chooses_the_reply(awaits: bool) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        client.cmd("RSET")
        transaction(client)
        client.cmd("QUIT")

    original, compat = run_pair(lambda ns: Failing(ns, True, awaits), script)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.errors == original.handler.errors == ["ValueError('secret detail')"] * 2


def test_difference_the_transaction_ends_with_the_reply_to_a_failed_message() -> None:
    """aiosmtpd keeps the envelope when handle_DATA raised, so the next MAIL is "nested"
    (503); the transaction ends with the reply to its message (RFC 5321 4.1.1.4)."""

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        client.cmd("MAIL FROM:<alice@example.org>")

    original, compat = run_pair(lambda ns: Failing(ns, True), script)
    assert (original.steps[-2].code, original.steps[-1].code) == (451, 503)
    assert (compat.steps[-2].code, compat.steps[-1].code) == (451, 250)


def test_difference_an_unhandled_exception_is_a_temporary_failure_without_its_text() -> None:
    """aiosmtpd answers 500 with the exception's text; alephsmtp a 451 and a log entry."""

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        client.cmd("QUIT")

    original, compat = run_pair(lambda ns: Failing(ns, False), script)
    theirs = original.steps[-2]
    ours = compat.steps[-2]
    assert (theirs.code, theirs.text) == (500, "Error: (ValueError) secret detail")
    assert ours.code == 451
    assert "secret" not in ours.text
    assert compat.steps[-1].code == original.steps[-1].code == 221


class SyncHooks:
    def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return f"250 plain function {MARK}"

    def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return f"250 stored {MARK}"


def test_difference_plain_function_hooks_work() -> None:
    """aiosmtpd awaits every hook, so a plain function fails there (500); here it works."""

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)

    original, compat = run_pair(lambda ns: SyncHooks(), script)
    assert [s.code for s in original.steps[2:]] == [250, 500, 354, 500]
    assert [(s.code, s.text) for s in compat.steps[2:]] == [
        (250, "OK"),
        (250, f"plain function {MARK}"),
        (354, "End data with <CR><LF>.<CR><LF>"),
        (250, f"stored {MARK}"),
    ]


class Content:
    def __init__(self, ns: SimpleNamespace) -> None:
        self.seen: list[tuple[Any, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append((envelope.content, envelope.original_content))
        return f"250 got {type(envelope.content).__name__} {MARK}"


@pytest.mark.parametrize("decode_data", [False, True])
@pytest.mark.parametrize("smtputf8", [False, True])
def test_decode_data_both_ways(decode_data: bool, smtputf8: bool) -> None:
    eight_bit = "From: a@example.org\r\nSubject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        client.cmd("MAIL FROM:<alice@example.org>")
        client.cmd("RCPT TO:<bob@example.com>")
        client.data(eight_bit)
        client.cmd("QUIT")

    original, compat = run_pair(Content, script, decode_data=decode_data, enable_SMTPUTF8=smtputf8)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.seen == original.handler.seen
    if decode_data and not smtputf8:
        assert compat.steps[-2].code == 500  # strict ASCII: the 8-bit message is refused


def test_smtputf8_addresses_reach_the_hooks_alike() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.utf8_cmd("MAIL FROM:<j\u00f6rg@example.org> SMTPUTF8")
        client.utf8_cmd("RCPT TO:<\u00e9lise@example.com>")
        client.data(MESSAGE)

    original, compat = run_pair(lambda ns: Recorder(ns), script)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.calls == original.handler.calls
    mail = compat.handler.calls[0]
    assert mail[3] == ("j\u00f6rg@example.org", ["SMTPUTF8"])
    assert compat.handler.calls[-1][2]["smtp_utf8"] is True


def test_size_limit() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("MAIL FROM:<alice@example.org> SIZE=5000")
        transaction(client)
        client.cmd("MAIL FROM:<alice@example.org>")
        client.cmd("RCPT TO:<bob@example.com>")
        client.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 60)
        transaction(client)  # the session is in sync after the refused message
        client.cmd("QUIT")

    original, compat = run_pair(lambda ns: Recorder(ns), script, data_size_limit=2000)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.handler.calls == original.handler.calls
    assert [s.code for s in compat.steps if s.command == "<message>"] == [250, 552, 250]


def test_multiline_and_enhanced_texts_are_sent_as_written() -> None:
    class Texts:
        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            if address.startswith("no"):
                return f"550 5.1.1 <{address}>: no such user {MARK}"
            envelope.rcpt_tos.append(address)
            return f"250-first line {MARK}\r\n250 2.1.5 second line {MARK}"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> bytes:
            return f"250 2.0.0 bytes are fine {MARK}".encode()

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client, rcpts=("nobody@example.com", "bob@example.com"))

    original, compat = run_pair(lambda ns: Texts(), script)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.steps[3].text == f"5.1.1 <nobody@example.com>: no such user {MARK}"
    assert compat.steps[4].text == f"first line {MARK}\n2.1.5 second line {MARK}"


def test_command_call_limit() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        for _ in range(4):
            client.cmd("NOOP")

    original, compat = run_pair(lambda ns: ns.handlers.Sink(), script, command_call_limit=3)
    assert_same_transcript(original.steps, compat.steps)
    assert [s.code for s in compat.steps] == [220, 250, 250, 250, 250, 421]
    assert compat.steps[-1].text == original.steps[-1].text == "4.7.0 NOOP sent too many times"


def test_command_call_limit_per_command() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("NOOP")
        client.cmd("RSET")
        client.cmd("RSET")
        client.cmd("NOOP")

    original, compat = run_pair(
        lambda ns: ns.handlers.Sink(), script, command_call_limit={"NOOP": 1, "*": 5}
    )
    assert_same_transcript(original.steps, compat.steps)
    assert compat.steps[-1].code == 421


def test_nothing_is_answered_after_a_421() -> None:
    """aiosmtpd closes after its 421; commands pipelined behind it get no reply."""

    def script(client: Client) -> None:
        client.ehlo()
        client.smtp.send(b"NOOP\r\nNOOP\r\nNOOP\r\n")
        replies = []
        try:
            for _ in range(3):
                replies.append(client.smtp.getreply()[0])
        except smtplib.SMTPServerDisconnected:
            replies.append(0)
        client.steps.append(type(client.steps[0])("pipelined", 0, repr(replies)))

    original, compat = run_pair(lambda ns: ns.handlers.Sink(), script, command_call_limit=1)
    assert original.steps[-1].text == "[250, 421, 0]"
    assert compat.steps[-1].text == original.steps[-1].text


# --- AUTH ------------------------------------------------------------------------------------

USERS = {b"alice": b"s3cret"}


class AuthRecorder:
    """Records the session as handle_DATA sees it after AUTH."""

    def __init__(self, ns: SimpleNamespace) -> None:
        self.sessions: list[dict[str, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.append(session_view(session))
        return f"250 delivered {MARK}"


def authenticator_for(ns: SimpleNamespace) -> Any:
    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        if USERS.get(auth_data.login) == auth_data.password:
            return ns.smtp.AuthResult(success=True, auth_data=auth_data)
        if auth_data.login == b"mallory":
            return ns.smtp.AuthResult(
                success=False, handled=False, message=f"535 5.7.8 go away {MARK}"
            )
        return ns.smtp.AuthResult(success=False, handled=False)

    return authenticator


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


def auth_script(client: Client) -> None:
    client.ehlo()
    client.cmd("MAIL FROM:<alice@example.org>")  # auth_required: 530
    client.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong"))
    client.cmd("AUTH PLAIN " + b64(b"\0mallory\0x"))
    client.cmd("AUTH LOGIN")
    client.cmd(b64(b"alice"))
    client.cmd(b64(b"s3cret"))
    client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))  # already authenticated: 503
    transaction(client)
    client.cmd("QUIT")


def run_auth_pair(script: Any, entry: str = "protocol", **kwargs: Any) -> tuple[Any, Any]:
    """run_pair, with each side's authenticator returning its own AuthResult."""
    original = run_one(
        "aiosmtpd", AuthRecorder, script, authenticator=authenticator_for(_ns("aiosmtpd")), **kwargs
    )
    compat = run_one(
        "compat",
        AuthRecorder,
        script,
        entry=entry,
        authenticator=authenticator_for(_ns("compat")),
        **kwargs,
    )
    return original, compat


@pytest.mark.parametrize("entry", ENTRIES)
def test_auth_with_an_authenticator(entry: str) -> None:
    original, compat = run_auth_pair(auth_script, entry, auth_require_tls=False, auth_required=True)
    assert_same_transcript(original.steps, compat.steps)
    codes = [s.code for s in compat.steps]
    assert codes == [220, 250, 530, 535, 535, 334, 334, 235, 503, 250, 250, 354, 250, 221]
    assert compat.handler.sessions == original.handler.sessions
    (seen,) = compat.handler.sessions
    assert seen["authenticated"] is True
    assert tuple(seen["auth_data"]) == (b"alice", b"s3cret")


def _ns(impl: str) -> SimpleNamespace:
    from _aiosmtpd_pair import IMPLEMENTATIONS

    return IMPLEMENTATIONS[impl]


def test_auth_with_the_deprecated_auth_callback() -> None:
    def callback(mechanism: str, login: bytes, password: bytes) -> bool:
        return USERS.get(login) == password

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH LOGIN " + b64(b"alice"))
        client.cmd(b64(b"nope"))
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))
        transaction(client)

    original, compat = run_pair(
        AuthRecorder, script, auth_require_tls=False, auth_callback=callback
    )
    assert_same_transcript(original.steps, compat.steps)
    assert [s.code for s in compat.steps[2:5]] == [334, 535, 235]
    assert compat.handler.sessions == original.handler.sessions


def test_auth_exclude_mechanism_and_the_default_always_fails() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH LOGIN")
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))

    original, compat = run_pair(
        AuthRecorder, script, auth_require_tls=False, auth_exclude_mechanism=["LOGIN"]
    )
    assert_same_transcript(original.steps, compat.steps)
    assert "AUTH PLAIN" in compat.steps[1].text.splitlines()
    assert [s.code for s in compat.steps[2:]] == [504, 535]


def test_smtplib_login_works_alike() -> None:
    def script(client: Client) -> None:
        client.smtp.ehlo("client.example")
        client.smtp.login("alice", "s3cret")
        client.smtp.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)

    original, compat = run_auth_pair(script, auth_require_tls=False)
    assert compat.handler.sessions == original.handler.sessions
    assert compat.handler.sessions[0]["authenticated"] is True


# --- STARTTLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> SimpleNamespace:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return SimpleNamespace(server=server, client=client)


class TlsHandler:
    def __init__(self, ns: SimpleNamespace, verdict: bool = True) -> None:
        self.verdict = verdict
        self.tls_sessions: list[dict[str, Any]] = []
        self.sessions: list[dict[str, Any]] = []

    def handle_STARTTLS(self, server: Any, session: Any, envelope: Any) -> bool:
        self.tls_sessions.append(session_view(session))
        return self.verdict

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.append(session_view(session))
        return f"250 over TLS {MARK}"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("verdict", [True, False])
def test_starttls_and_its_hook(tls: SimpleNamespace, entry: str, verdict: bool) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.starttls(tls.client)
        client.cmd("NOOP")
        client.ehlo()
        transaction(client)
        client.cmd("QUIT")

    original, compat = run_pair(
        lambda ns: TlsHandler(ns, verdict), script, entry=entry, tls_context=tls.server
    )
    if verdict:
        assert_same_transcript(original.steps, compat.steps)
    else:
        # Refused by handle_STARTTLS, every command but QUIT gets 554; the EHLO refused, the
        # transaction's commands are out of order first for alephsmtp (503: docs/aiosmtpd.md).
        assert_same_transcript(original.steps[:5], compat.steps[:5])
        assert [s.code for s in original.steps[5:]] == [554, 554, 554, 221]
        assert [s.code for s in compat.steps[5:]] == [503, 503, 503, 221]
    assert compat.handler.tls_sessions == original.handler.tls_sessions
    assert compat.handler.sessions == original.handler.sessions
    if verdict:
        assert compat.handler.sessions[0]["ssl"] == sorted(
            ["sslcontext", "ssl_object", "peercert", "cipher", "compression"]
        )
    else:
        assert [s.code for s in compat.steps[3:5]] == [554, 554]
        assert compat.steps[-1].code == 221


def test_require_starttls(tls: SimpleNamespace) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("NOOP")
        client.cmd("HELP")
        client.cmd("MAIL FROM:<alice@example.org>")
        client.cmd("RSET")
        client.starttls(tls.client)
        client.ehlo()
        transaction(client)

    original, compat = run_pair(
        lambda ns: TlsHandler(ns), script, tls_context=tls.server, require_starttls=True
    )
    assert_same_transcript(original.steps, compat.steps)
    assert [s.code for s in compat.steps[2:6]] == [250, 530, 530, 530]


def test_auth_over_starttls(tls: SimpleNamespace) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))  # before TLS: 538
        client.starttls(tls.client)
        client.ehlo()
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))
        transaction(client)

    original, compat = run_auth_pair(script, tls_context=tls.server)
    assert_same_transcript(original.steps, compat.steps)
    assert compat.steps[2].code == 538
    assert compat.handler.sessions == original.handler.sessions


# --- stock handlers --------------------------------------------------------------------------


def test_debugging_prints_the_same() -> None:
    streams: dict[str, io.StringIO] = {}

    def make(ns: SimpleNamespace) -> Any:
        streams[ns.name] = io.StringIO()
        return ns.handlers.Debugging(streams[ns.name])

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME")
        client.cmd("RCPT TO:<bob@example.com>")
        client.data(MESSAGE)

    original, compat = run_pair(make, script)
    assert_same_transcript(original.steps, compat.steps)

    def normal(text: str) -> str:
        return re.sub(r"X-Peer: \('127\.0\.0\.1', \d+\)", "X-Peer: PEER", text)

    assert normal(streams["compat"].getvalue()) == normal(streams["aiosmtpd"].getvalue())
    assert "mail options: ['BODY=8BITMIME']" in streams["compat"].getvalue()


@pytest.mark.parametrize("kind", ["Message", "AsyncMessage"])
def test_message_handlers_build_the_same_message(kind: str) -> None:
    def make(ns: SimpleNamespace) -> Any:
        base = getattr(ns.handlers, kind)

        class Keep(base):  # type: ignore[misc,valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.kept: list[Any] = []

            if kind == "Message":

                def handle_message(self, message: Any) -> None:
                    self.kept.append(message)

            else:

                async def handle_message(self, message: Any) -> None:
                    await asyncio.sleep(0)
                    self.kept.append(message)

        return Keep()

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client, rcpts=("bob@example.com", "carol@example.com"))

    original, compat = run_pair(make, script)
    assert_same_transcript(original.steps, compat.steps)
    (ours,), (theirs,) = compat.handler.kept, original.handler.kept
    for message in (ours, theirs):
        del message["X-Peer"]  # the client's port
    assert ours.as_bytes() == theirs.as_bytes()
    assert ours["X-RcptTo"] == "bob@example.com, carol@example.com"


def test_mailbox_stores_the_same(tmp_path: Any) -> None:
    def make(ns: SimpleNamespace) -> Any:
        return ns.handlers.Mailbox(tmp_path / ns.name)

    def script(client: Client) -> None:
        client.ehlo()
        transaction(client)
        transaction(client)

    original, compat = run_pair(make, script)
    assert_same_transcript(original.steps, compat.steps)
    ours = [m.as_bytes() for m in compat.handler.mailbox]
    theirs = [m.as_bytes() for m in original.handler.mailbox]
    assert len(ours) == 2
    assert sorted(_without_peer(m) for m in ours) == sorted(_without_peer(m) for m in theirs)


def _without_peer(raw: bytes) -> bytes:
    return b"\n".join(line for line in raw.split(b"\n") if not line.startswith(b"X-Peer"))


def test_proxy_forwards_the_same_message() -> None:
    with SmtpTestServer() as upstream:

        def make(ns: SimpleNamespace) -> Any:
            return ns.handlers.Proxy(upstream.host, upstream.port)

        def script(client: Client) -> None:
            client.ehlo()
            transaction(client)

        original, compat = run_pair(make, script)
        upstream.wait_for_messages(2)
        theirs, ours = upstream.messages
    assert_same_transcript(original.steps, compat.steps)
    assert ours.envelope.return_path == theirs.envelope.return_path == "alice@example.org"
    assert ours.envelope.recipients == theirs.envelope.recipients
    assert ours.message_bytes == theirs.message_bytes
    assert ours.message["X-Peer"] == "127.0.0.1"


def test_difference_proxy_reports_an_unreachable_upstream() -> None:
    """aiosmtpd's Proxy says 250 when nothing was delivered; the layer says 451 (retry)."""
    with socket_closed_port() as port:

        def make(ns: SimpleNamespace) -> Any:
            return ns.handlers.Proxy("127.0.0.1", port)

        def script(client: Client) -> None:
            client.ehlo()
            transaction(client)

        original, compat = run_pair(make, script)
    assert original.steps[-1].code == 250
    assert compat.steps[-1].code == 451


class socket_closed_port:  # reads as a phrase at the call site
    """A loopback port nothing listens on (bound, never listened, then released)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
