"""Differential tests of AUTH as aiosmtpd programs drive it: ``handle_AUTH``, ``auth_XXX``
mechanisms of their own (on the handler or on an ``SMTP`` subclass) talking to the client
through ``challenge_auth()``, aiosmtpd's LOGIN and PLAIN run by the layer, ``AuthResult`` and
the older tri-state results, ``auth_callback``, ``auth_exclude_mechanism``.

The same program runs on aiosmtpd 1.4.6 and on the layer, driven by the same smtplib (or
aiosmtplib) script. With AUTH hooks the layer answers with aiosmtpd's own texts, so every
reply text is compared (but EHLO's keyword lines, where alephsmtp offers more); what the hooks
saw (their arguments, the session at DATA) is compared too. The differences left are the
``test_difference_...`` tests, each listed in docs/aiosmtpd.md.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ssl
import threading
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
import trustme

from _aiosmtpd_pair import (
    IMPLEMENTATIONS,
    MARK,
    Client,
    Step,
    assert_same_transcript,
    run_one,
    run_pair,
    serve,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:aiosmtpd",
    "ignore:Requiring AUTH while not requiring TLS:UserWarning",
)

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nHi there.\r\n"
USERS = {b"alice": b"s3cret"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def assert_same(original: list[Step], compat: list[Step], *, codes_only: int = -1) -> None:
    """Codes and every reply text the same (EHLO: aiosmtpd's keywords, plus alephsmtp's),
    but the text of step ``codes_only``."""
    assert_same_transcript(original, compat)
    for index, (theirs, ours) in enumerate(zip(original, compat, strict=True)):
        if not theirs.command.startswith("EHLO") and index != codes_only:
            assert ours.text == theirs.text, f"{theirs.command!r}: {theirs.text!r} {ours.text!r}"


def session_view(session: Any) -> dict[str, Any]:
    auth_data = session.auth_data
    return {
        "authenticated": session.authenticated,
        "auth_data": tuple(auth_data) if isinstance(auth_data, tuple) else auth_data,
        "login_data": session._login_data,
    }


def deliver(client: Client) -> None:
    client.cmd("MAIL FROM:<alice@example.org>")
    client.cmd("RCPT TO:<bob@example.com>")
    client.data(MESSAGE)


class Base:
    """Records the session as handle_DATA sees it, and what the AUTH hooks were given."""

    def __init__(self, ns: SimpleNamespace) -> None:
        self.ns = ns
        self.calls: list[tuple[Any, ...]] = []
        self.sessions: list[dict[str, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.append(session_view(session))
        return f"250 delivered {MARK}"


class TwoChallenges(Base):
    """A mechanism of the handler's own with two challenges (name, then secret)."""

    async def auth_X__TWO(self, server: Any, args: list[str]) -> Any:  # X-TWO
        self.calls.append(("X-TWO", args))
        name = await server.challenge_auth("name?")
        if name is self.ns.smtp.MISSING:
            return self.ns.smtp.AuthResult(success=False)
        secret = await server.challenge_auth(b"secret?")
        if secret is self.ns.smtp.MISSING:
            return self.ns.smtp.AuthResult(success=False)
        self.calls.append(("answers", name, secret))
        if USERS.get(name) == secret:
            login = self.ns.smtp.LoginPassword(name, secret)
            return self.ns.smtp.AuthResult(success=True, auth_data=login)
        return self.ns.smtp.AuthResult(
            success=False, handled=False, message=f"535 5.7.8 not you {MARK}"
        )


def test_two_challenges_alike() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH X-TWO")
        client.cmd(b64(b"alice"))
        client.cmd(b64(b"wrong"))
        client.cmd("AUTH X-TWO")
        client.cmd(b64(b"alice"))
        client.cmd(b64(b"s3cret"))
        client.cmd("AUTH X-TWO")  # already authenticated
        deliver(client)

    original, compat = run_pair(TwoChallenges, script, auth_require_tls=False)
    # The third AUTH is alephsmtp's session's to refuse ("503 Error: already authenticated").
    assert_same(original.steps, compat.steps, codes_only=8)
    assert [s.code for s in compat.steps[2:9]] == [334, 334, 535, 334, 334, 235, 503]
    assert compat.steps[2].text == b64(b"name?")
    assert compat.steps[4].text == f"5.7.8 not you {MARK}"
    assert compat.handler.calls == original.handler.calls
    assert compat.handler.sessions == original.handler.sessions


@pytest.mark.parametrize("answer", ["*", "not base64!", "YWxpY2U"])
def test_an_answer_that_ends_the_exchange(answer: str) -> None:
    """``*`` cancels (RFC 4954 4) and text that is not base64 is refused: challenge_auth()
    answers 501 itself, returns MISSING, and the session goes on."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH X-TWO")
        client.cmd(answer)
        client.cmd("NOOP")
        client.cmd("AUTH X-TWO")
        client.cmd(b64(b"alice"))
        client.cmd(b64(b"s3cret"))

    original, compat = run_pair(TwoChallenges, script, auth_require_tls=False)
    assert_same(original.steps, compat.steps)
    expected = "5.7.0 Auth aborted" if answer == "*" else "5.5.2 Can't decode base64"
    assert (compat.steps[3].code, compat.steps[3].text) == (501, expected)
    assert [s.code for s in compat.steps[4:]] == [250, 334, 334, 235]
    assert compat.handler.calls == original.handler.calls


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_aiosmtpds_own_login_and_plain_when_the_program_has_auth_hooks(mechanism: str) -> None:
    """With AUTH hooks the layer runs LOGIN and PLAIN as aiosmtpd does: its prompts
    (``User Name\\0``), ``*``, any bytes as credentials, judged by the authenticator."""

    def make(ns: SimpleNamespace) -> Any:
        return TwoChallenges(ns)

    def authenticator_for(impl: str) -> Any:
        smtp = IMPLEMENTATIONS[impl].smtp

        def authenticator(server: Any, session: Any, envelope: Any, mech: str, data: Any) -> Any:
            accepted = USERS.get(data.login) == data.password
            return smtp.AuthResult(success=accepted, handled=False, auth_data=data)

        return authenticator

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd(f"AUTH {mechanism}")
        client.cmd("*")
        if mechanism == "LOGIN":
            client.cmd("AUTH LOGIN " + b64(b"\xffbob"))  # not UTF-8: aiosmtpd takes any bytes
            client.cmd(b64(b"x"))
            client.cmd("AUTH LOGIN")
            client.cmd(b64(b"alice"))
            client.cmd(b64(b"s3cret"))
        else:
            client.cmd("AUTH PLAIN " + b64(b"alice\0s3cret"))  # two parts, not three
            client.cmd("AUTH PLAIN")
            client.cmd(b64(b"\0alice\0s3cret"))
        deliver(client)

    outcomes = []
    for impl in ("aiosmtpd", "compat"):
        outcomes.append(
            run_one(
                impl, make, script, auth_require_tls=False, authenticator=authenticator_for(impl)
            )
        )
    original, compat = outcomes
    assert_same(original.steps, compat.steps)
    if mechanism == "LOGIN":
        assert [s.text for s in compat.steps[2:4]] == [b64(b"User Name\0"), "5.7.0 Auth aborted"]
        assert [s.code for s in compat.steps[4:9]] == [334, 535, 334, 334, 235]
    else:
        assert [s.code for s in compat.steps[2:7]] == [334, 501, 501, 334, 235]
        assert compat.steps[4].text == "5.5.2 Can't split auth value"
    assert compat.handler.sessions == original.handler.sessions
    assert compat.handler.sessions[0]["auth_data"] == (b"alice", b"s3cret")


class HookedAuth(Base):
    """handle_AUTH: answers SPECIAL itself, leaves every other mechanism to the server."""

    def __init__(self, ns: SimpleNamespace, sets_authenticated: bool = True) -> None:
        super().__init__(ns)
        self.sets_authenticated = sets_authenticated

    async def handle_AUTH(self, server: Any, session: Any, envelope: Any, args: list[str]) -> Any:
        self.calls.append(("handle_AUTH", list(args), session.authenticated))
        if args[0] != "SPECIAL":
            return self.ns.smtp.MISSING
        if len(args) == 1:
            answer = await server.challenge_auth("who?")
            if answer is self.ns.smtp.MISSING:
                return None  # challenge_auth answered the client
            self.calls.append(("answer", answer))
        if self.sets_authenticated:
            session.authenticated = True
            session.auth_data = "special-user"
        return f"235 2.7.0 welcome {MARK}"

    async def auth_SPECIAL(self, server: Any, args: list[str]) -> Any:
        raise AssertionError("handle_AUTH answers SPECIAL")


@pytest.mark.parametrize("initial", [True, False])
def test_handle_auth_returning_a_status(initial: bool) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        if initial:
            client.cmd("AUTH SPECIAL " + b64(b"hi"))
        else:
            client.cmd("AUTH SPECIAL")
            client.cmd(b64(b"me"))
        client.cmd("AUTH SPECIAL")  # authenticated now
        deliver(client)

    original, compat = run_pair(HookedAuth, script, auth_require_tls=False, auth_required=True)
    second = len(compat.steps) - 5
    # The second AUTH: alephsmtp's session answers it ("503 Error: already authenticated").
    assert_same(original.steps, compat.steps, codes_only=second)
    assert compat.steps[second].code == 503
    assert compat.handler.calls == original.handler.calls
    assert compat.handler.sessions == original.handler.sessions
    assert compat.handler.sessions[0]["authenticated"] is True


def test_handle_auth_returning_missing_runs_the_mechanism() -> None:
    """MISSING from handle_AUTH: the mechanism's method runs (here aiosmtpd's PLAIN and
    LOGIN, with the deprecated auth_callback)."""

    def callback(mechanism: str, login: bytes, password: bytes) -> bool:
        return USERS.get(login) == password

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH LOGIN " + b64(b"alice"))
        client.cmd(b64(b"nope"))
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))
        deliver(client)

    original, compat = run_pair(HookedAuth, script, auth_require_tls=False, auth_callback=callback)
    assert_same(original.steps, compat.steps)
    assert [s.code for s in compat.steps[2:5]] == [334, 535, 235]
    assert compat.steps[2].text == b64(b"Password\0")
    assert compat.handler.calls == original.handler.calls
    assert [call[1][0] for call in compat.handler.calls] == ["LOGIN", "PLAIN"]
    assert compat.handler.sessions == original.handler.sessions
    assert compat.handler.sessions[0]["login_data"] == b"alice"


def test_handle_auth_that_leaves_session_authenticated_unset() -> None:
    """A 235 from handle_AUTH that does not set session.authenticated: aiosmtpd's
    auth_required still refuses MAIL (530), and so does the layer."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH SPECIAL " + b64(b"hi"))
        client.cmd("MAIL FROM:<alice@example.org>")
        client.cmd("QUIT")

    original, compat = run_pair(
        lambda ns: HookedAuth(ns, sets_authenticated=False),
        script,
        auth_require_tls=False,
        auth_required=True,
    )
    assert_same_transcript(original.steps, compat.steps)
    assert [s.code for s in compat.steps[2:]] == [235, 530, 221]


class HandledMechanisms(Base):
    """Mechanisms that answer the client themselves (AuthResult handled=True, None) and the
    tri-state results of aiosmtpd's older convention."""

    async def auth_PUSHED(self, server: Any, args: list[str]) -> Any:
        await server.push(f"535 5.7.8 pushed by the mechanism {MARK}")
        return self.ns.smtp.AuthResult(success=False, handled=True)

    async def auth_NONE(self, server: Any, args: list[str]) -> Any:
        await server.push(f"454 4.7.0 try later {MARK}")
        return None

    async def auth_DENYMISSING(self, server: Any, args: list[str]) -> Any:
        return self.ns.smtp.MISSING

    async def auth_DENYFALSE(self, server: Any, args: list[str]) -> Any:
        return False

    async def auth_MESSAGE(self, server: Any, args: list[str]) -> Any:
        return self.ns.smtp.AuthResult(
            success=False, handled=False, message=f"535 5.7.8 refused {MARK}"
        )

    async def auth_WELCOME(self, server: Any, args: list[str]) -> Any:
        return self.ns.smtp.AuthResult(
            success=True, message=f"235 2.7.0 hello {MARK}", auth_data=b"opaque-token"
        )


@pytest.mark.parametrize(
    ("mechanism", "code"),
    [
        ("PUSHED", 535),
        ("NONE", 454),
        ("DENYMISSING", 535),
        ("DENYFALSE", 535),
        ("MESSAGE", 535),
        ("WELCOME", 235),
    ],
)
def test_what_a_mechanism_returns(mechanism: str, code: int) -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd(f"AUTH {mechanism}")
        client.cmd("NOOP")
        if code == 235:
            deliver(client)

    original, compat = run_pair(HandledMechanisms, script, auth_require_tls=False)
    assert_same(original.steps, compat.steps)
    assert [s.code for s in compat.steps[2:4]] == [code, 250]
    assert compat.handler.sessions == original.handler.sessions


def test_auth_exclude_mechanism_with_mechanisms_of_ones_own() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH LOGIN")
        client.cmd("AUTH DENYFALSE")
        client.cmd("AUTH WELCOME")

    original, compat = run_pair(
        HandledMechanisms,
        script,
        auth_require_tls=False,
        auth_exclude_mechanism=["LOGIN", "PUSHED", "NONE", "MESSAGE", "DENYMISSING"],
    )
    # alephsmtp's session refuses the excluded mechanism ("504 Unrecognized ...").
    assert_same(original.steps, compat.steps, codes_only=2)
    assert "AUTH DENYFALSE PLAIN WELCOME" in compat.steps[1].text.splitlines()
    assert [s.code for s in compat.steps[2:]] == [504, 535, 235]


def test_a_subclass_overriding_a_built_in_mechanism_and_adding_one() -> None:
    """``auth_PLAIN`` overridden on an SMTP subclass (calling aiosmtpd's), and a mechanism
    of the subclass's own."""

    def subclass(ns: SimpleNamespace) -> type:
        class Counting(ns.smtp.SMTP):  # type: ignore[misc,name-defined]
            seen: list[Any] = []

            async def auth_PLAIN(self, server: Any, args: list[str]) -> Any:
                Counting.seen.append(("PLAIN", list(args)))
                result = await super().auth_PLAIN(server, args)
                Counting.seen.append(("result", result.success))
                return result

            @ns.smtp.auth_mechanism("x-id")
            async def auth_whoever(self, server: Any, args: list[str]) -> Any:
                return "somebody"  # the older convention: who logged in

        return Counting

    seen: dict[str, list[Any]] = {}

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH PLAIN")
        client.cmd(b64(b"\0alice\0s3cret"))
        client.cmd("RSET")

    def script_id(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH X-ID")
        deliver(client)

    results = {}
    for impl in ("aiosmtpd", "compat"):
        cls = subclass(IMPLEMENTATIONS[impl])
        results[impl] = run_one(
            impl,
            Base,
            script,
            smtp_class=lambda ns, cls=cls: cls,
            auth_require_tls=False,
            auth_callback=lambda mechanism, login, password: password == b"s3cret",
        )
        seen[impl] = list(cls.seen)
        results[impl + "-id"] = run_one(
            impl, Base, script_id, smtp_class=lambda ns, cls=cls: cls, auth_require_tls=False
        )
    assert_same(results["aiosmtpd"].steps, results["compat"].steps)
    assert results["compat"].steps[3].code == 235
    assert seen["compat"] == seen["aiosmtpd"] == [("PLAIN", ["PLAIN"]), ("result", True)]
    assert_same(results["aiosmtpd-id"].steps, results["compat-id"].steps)
    assert "AUTH LOGIN PLAIN X-ID" in results["compat-id"].steps[1].text.splitlines()


def test_aiosmtplib_logs_in_through_the_hooks() -> None:
    """aiosmtplib's own AUTH LOGIN and PLAIN (its initial-response forms) and a mechanism of
    the program's own through execute_command."""

    def callback(mechanism: str, login: bytes, password: bytes) -> bool:
        return USERS.get(login) == password

    async def client(port: int) -> list[Any]:
        seen: list[Any] = []
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await smtp.auth_login("alice", "wrong")
            seen.append(refused.value.code)
            response = await smtp.auth_plain("alice", "s3cret")
            seen.append((response.code, response.message))
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
            await smtp.ehlo()
            seen.append(smtp.esmtp_extensions["auth"])
            response = await smtp.execute_command(b"AUTH", b"X-TWO")
            seen.append((response.code, response.message))
            response = await smtp.execute_command(b64(b"alice").encode())
            response = await smtp.execute_command(b64(b"s3cret").encode())
            seen.append((response.code, response.message))
            await smtp.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)
        return seen

    seen = {}
    handlers = {}
    for impl in ("aiosmtpd", "compat"):
        handlers[impl] = handler = TwoChallenges(IMPLEMENTATIONS[impl])
        with serve(impl, handler, auth_require_tls=False, auth_callback=callback) as (_, port):
            seen[impl] = _run_in_thread(client(port))
    assert seen["compat"] == seen["aiosmtpd"]
    assert seen["compat"][0] == 535
    assert seen["compat"][1][0] == 235
    assert handlers["compat"].sessions == handlers["aiosmtpd"].sessions


def _run_in_thread(coroutine: Any) -> Any:
    """asyncio.run() in a thread of its own (pytest-asyncio may own this one's loop)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as error:  # handed to the test's thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return result[0]


@pytest.fixture(scope="module")
def tls() -> SimpleNamespace:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return SimpleNamespace(server=server, client=client)


def test_auth_require_tls_with_a_mechanism_of_ones_own(tls: SimpleNamespace) -> None:
    """auth_require_tls (the default): 538 before STARTTLS (RFC 4954 4), served after it."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH X-TWO")
        client.starttls(tls.client)
        client.ehlo()
        client.cmd("AUTH X-TWO")
        client.cmd(b64(b"alice"))
        client.cmd(b64(b"s3cret"))
        deliver(client)

    original, compat = run_pair(TwoChallenges, script, tls_context=tls.server)
    # 538's text is alephsmtp's session's ("Encryption required for requested authentication").
    assert_same(original.steps, compat.steps, codes_only=2)
    assert [s.code for s in compat.steps[2:9]] == [538, 220, 250, 334, 334, 235, 250]
    assert "AUTH" not in compat.steps[1].text  # offered over TLS only
    assert compat.handler.sessions == original.handler.sessions


# --- documented differences ------------------------------------------------------------------


def test_difference_a_status_after_a_complete_pushed_reply_is_not_sent() -> None:
    """A mechanism that returns False after challenge_auth() answered ``*`` itself: aiosmtpd
    sends two replies to one command (the second is read as the next command's reply); the
    layer sends the first only."""

    class Careless(Base):
        async def auth_CARELESS(self, server: Any, args: list[str]) -> Any:
            await server.challenge_auth("go on")
            return False

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH CARELESS")
        client.cmd("*")
        client.cmd("NOOP")

    original, compat = run_pair(Careless, script, auth_require_tls=False)
    assert [s.code for s in original.steps[2:]] == [334, 501, 535]  # out of step
    assert [s.code for s in compat.steps[2:]] == [334, 501, 250]


def test_difference_a_mechanism_that_answers_nothing_gets_535() -> None:
    """AuthResult(success=False, handled=True) or None with nothing pushed: aiosmtpd sends
    nothing and the client waits; the layer answers 535."""

    class Silent(Base):
        async def auth_SILENT(self, server: Any, args: list[str]) -> Any:
            return self.ns.smtp.AuthResult(success=False)

    def script(client: Client) -> None:
        client.ehlo()
        client.smtp.sock.settimeout(1)
        client.cmd("AUTH SILENT")

    original, compat = run_pair(Silent, script, auth_require_tls=False)
    assert original.steps[-1].code == 0  # no reply within the client's second
    assert (compat.steps[-1].code, compat.steps[-1].text) == (
        535,
        "5.7.8 Authentication credentials invalid",
    )


def test_difference_an_identity_returned_sets_session_authenticated() -> None:
    """The older convention's identity (any other value): aiosmtpd answers 235 and keeps it
    as login_data but leaves session.authenticated unset; the layer sets it, as the 235 says."""

    class Identity(Base):
        async def auth_ID(self, server: Any, args: list[str]) -> Any:
            return "somebody"

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH ID")
        deliver(client)

    original, compat = run_pair(Identity, script, auth_require_tls=False)
    assert_same(original.steps, compat.steps)
    assert original.handler.sessions[0]["authenticated"] is None
    assert compat.handler.sessions[0] == {
        "authenticated": True,
        "auth_data": None,
        "login_data": "somebody",
    }


def test_difference_a_challenge_that_is_not_base64() -> None:
    """challenge_auth(text, encode_to_b64=False): base64 text goes out as it is on both;
    other text aiosmtpd sends raw (no client can decode it), the layer base64-encodes."""

    class Raw(Base):
        async def auth_RAW(self, server: Any, args: list[str]) -> Any:
            await server.challenge_auth(b64(b"ready"), encode_to_b64=False)
            return self.ns.smtp.AuthResult(success=False, handled=False)

        async def auth_TEXT(self, server: Any, args: list[str]) -> Any:
            await server.challenge_auth("challenge", encode_to_b64=False)
            return self.ns.smtp.AuthResult(success=False, handled=False)

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH RAW")
        client.cmd(b64(b"answer"))
        client.cmd("AUTH TEXT")
        client.cmd(b64(b"answer"))

    original, compat = run_pair(Raw, script, auth_require_tls=False)
    assert_same(original.steps[:4], compat.steps[:4])
    assert original.steps[2].text == compat.steps[2].text == b64(b"ready")
    assert original.steps[4].text == "challenge"
    assert compat.steps[4].text == b64(b"challenge")
    assert [s.code for s in compat.steps[4:]] == [334, 535]


def test_difference_mechanism_names_in_any_case() -> None:
    """aiosmtpd looks the mechanism up as the client wrote it (``auth x-two``: 504); the
    layer in any case, as alephsmtp's session does (RFC 4954 4 after RFC 5321 2.4)."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH x-two")
        client.cmd("*")

    original, compat = run_pair(TwoChallenges, script, auth_require_tls=False)
    assert [s.code for s in original.steps[2:]] == [504, 500]
    assert [s.code for s in compat.steps[2:]] == [334, 501]
    assert compat.handler.calls == [("X-TWO", ["x-two"])]


def test_difference_failed_auth_is_limited() -> None:
    """aiosmtpd lets a client guess passwords for ever; alephsmtp answers each failure after
    the first ``auth_failure_delay`` late (1 s; 0 here, through the layer's session_config())
    and closes after ``max_auth_failures`` (5) with 421 (docs/security.md)."""

    def subclass(ns: SimpleNamespace) -> type:
        if ns.name == "aiosmtpd":
            return ns.smtp.SMTP  # type: ignore[no-any-return]

        class Undelayed(ns.smtp.SMTP):  # type: ignore[misc,name-defined]
            def session_config(self, implicit_tls: Any = None) -> Any:
                config = super().session_config(implicit_tls)
                return dataclasses.replace(config, auth_failure_delay=0.0)

        return Undelayed

    def script(client: Client) -> None:
        client.ehlo()
        for _ in range(6):
            client.cmd("AUTH DENYFALSE")

    original, compat = run_pair(
        HandledMechanisms, script, smtp_class=subclass, auth_require_tls=False
    )
    assert [s.code for s in original.steps[2:]] == [535] * 6
    assert [s.code for s in compat.steps[2:]] == [535] * 5 + [421]


class Careless(Base):
    """Mechanisms that ignore what aiosmtpd's rules say about the exchange."""

    async def auth_TWICE(self, server: Any, args: list[str]) -> Any:
        first = await server.challenge_auth("first")
        second = await server.challenge_auth("second")  # even after "*"
        self.calls.append((first is self.ns.smtp.MISSING, second is self.ns.smtp.MISSING))
        return self.ns.smtp.AuthResult(success=False)

    async def auth_CHATTY(self, server: Any, args: list[str]) -> Any:
        await server.push("235-2.7.0 about to ask")
        await server.challenge_auth("ask")
        return self.ns.smtp.AuthResult(success=True, message="235 2.7.0 done")

    async def auth_ARG(self, server: Any, args: list[str]) -> Any:
        self.calls.append(("ARG", args))
        return self.ns.smtp.AuthResult(success=False, handled=False)


def test_difference_challenge_auth_after_the_exchange_ended() -> None:
    """After challenge_auth() answered ``*`` with its 501, aiosmtpd sends the next
    challenge anyway (the client reads it as its next command's reply); the layer returns
    MISSING without sending."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH TWICE")
        client.cmd("*")
        client.cmd("NOOP")

    original, compat = run_pair(Careless, script, auth_require_tls=False)
    assert [s.code for s in original.steps[2:]] == [334, 501, 334]  # out of step
    assert [s.code for s in compat.steps[2:]] == [334, 501, 250]
    assert compat.handler.calls == [(True, True)]


def test_difference_lines_pushed_before_a_challenge() -> None:
    """aiosmtpd writes a pushed line at once, before the challenge (a client reads the two as
    one broken reply); the layer sends it with the command's final reply."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH CHATTY")
        client.cmd(b64(b"answer"))

    original, compat = run_pair(Careless, script, auth_require_tls=False)
    # "235-...", then "334 ...": smtplib takes the two for one 334 reply.
    assert [(s.code, s.text) for s in original.steps[2:]] == [
        (334, f"2.7.0 about to ask\n{b64(b'ask')}"),
        (235, "2.7.0 done"),
    ]
    assert [(s.code, s.text) for s in compat.steps[2:]] == [
        (334, b64(b"ask")),
        (235, "2.7.0 about to ask\n2.7.0 done"),
    ]


def test_difference_an_initial_response_that_is_not_base64() -> None:
    """aiosmtpd hands ``AUTH ARG <text>`` to the mechanism whatever the text; alephsmtp's
    session refuses a response that is not base64 first (RFC 4954 4: 501)."""

    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH ARG not-base64")

    original, compat = run_pair(Careless, script, auth_require_tls=False)
    assert original.steps[-1].code == 535
    assert original.handler.calls == [("ARG", ["ARG", "not-base64"])]
    assert compat.steps[-1].code == 501
    assert compat.handler.calls == []


def test_difference_a_second_auth_after_a_2xx_that_left_session_authenticated_unset() -> None:
    def script(client: Client) -> None:
        client.ehlo()
        client.cmd("AUTH SPECIAL " + b64(b"hi"))
        client.cmd("AUTH SPECIAL " + b64(b"hi"))
        client.cmd("MAIL FROM:<alice@example.org>")

    original, compat = run_pair(
        lambda ns: HookedAuth(ns, sets_authenticated=False),
        script,
        auth_require_tls=False,
        auth_required=True,
    )
    assert [s.code for s in original.steps[2:]] == [235, 235, 530]
    assert [s.code for s in compat.steps[2:]] == [235, 503, 530]
