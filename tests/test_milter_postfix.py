"""alephsmtp against Postfix 3.7 as the reference: the same milters, the same messages, the
same verdicts and the same edits.

One private Postfix (Debian's package, installed by scripts/install-peers) runs for the module
from a configuration in a tmp dir: ``postfix -c DIR start-fg``, chroot off, smtpd on loopback
ports, every accepted message relayed to a capturing alephsmtp sink. Each smtpd listener has its
own ``smtpd_milters``: a scripted fake milter (tests/_fakemilter.py) for the edits and verdicts
real milters cannot be made to give, and the real rspamd and OpenDKIM (tests/_milterpeers.py).
The same client conversation then goes to alephsmtp with the same milter, and the test
compares what the client was told, what the milter was shown, and what was delivered (Postfix's
own Received: field, which it hides from milters, set aside).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from _fakemilter import Conversation, FakeMilter, ThreadedFakeMilter
from _milterpeers import (
    GTUBE,
    MESSAGE,
    OPENDKIM_GENKEY,
    dkim_home_fixture,  # noqa: F401
    opendkim_fixture,  # noqa: F401
    rspamd_fixture,  # noqa: F401
)
from _postfix import Postfix, needs_postfix, private_postfix, relay_to
from alephsmtp.milter import Milters
from alephsmtp.milter import protocol as p
from alephsmtp.testing import SmtpTestServer

pytestmark = needs_postfix


@dataclass
class Setup:
    postfix: Postfix
    sink: SmtpTestServer
    fake: FakeMilter
    endpoints: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Setup]:
    endpoints: dict[str, str] = {}
    with ThreadedFakeMilter() as fake, SmtpTestServer(hostname="sink.test") as sink:
        endpoints["fake"] = fake.endpoint
        # The real milters join when installed (their fixtures skip otherwise).
        for name, fixture in (("rspamd", "rspamd"), ("opendkim", "opendkim")):
            try:
                value = request.getfixturevalue(fixture)
            except pytest.skip.Exception:
                continue
            endpoints[name] = value if isinstance(value, str) else value[0]
        with private_postfix(relay_to(sink.port), endpoints) as postfix:
            # Waiting for smtpd to listen made one session, and so one milter conversation.
            deadline = time.monotonic() + 10
            while not (fake.conversations and fake.conversations[0].closed_by_mta):
                assert time.monotonic() < deadline, "the readiness probe's session did not end"
                time.sleep(0.01)
            yield Setup(postfix, sink, fake, endpoints)


# --- one conversation, with either MTA ---------------------------------------------------------


@dataclass
class Outcome:
    replies: list[tuple[int, str]]
    delivered: list[Any]  # CapturedMessage (envelope, message bytes)


def converse(
    port: int,
    message: bytes = MESSAGE,
    sender: str = "alice@example.org",
    rcpts: tuple[str, ...] = ("bob@example.net",),
) -> list[tuple[int, str]]:
    """EHLO, MAIL, RCPT..., DATA: each reply (code, text), as a real client (smtplib) gets them."""
    replies: list[tuple[int, str]] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        replies.append((code, text.decode()))
        accepted = 0
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            replies.append((code, text.decode()))
            accepted += code // 100 == 2
        if replies[0][0] // 100 == 2 and accepted:
            try:
                code, text = client.data(message)
            except smtplib.SMTPDataError as error:  # DATA itself refused
                code, text = error.smtp_code, error.smtp_error
            replies.append((code, text.decode()))
        else:
            client.rset()
    return replies


def through_postfix(setup: Setup, listener: str, expect: int, **kwargs: Any) -> Outcome:
    before = len(setup.sink.messages)
    replies = converse(setup.postfix.ports[listener], **kwargs)
    delivered = setup.sink.wait_for_messages(before + expect, timeout=60)[before:] if expect else []
    # Only the test's mail: no bounce or notice of Postfix's own (null sender).
    return Outcome(replies, [message for message in delivered if message.envelope.return_path])


def through_alephsmtp(endpoint: str, **kwargs: Any) -> Outcome:
    milters = Milters([endpoint])
    with SmtpTestServer(hostname="mx.test", on_session=milters.wrap()) as server:
        replies = converse(server.port, **kwargs)
        return Outcome(replies, list(server.messages))


def without_own_received(message: bytes) -> bytes:
    """Postfix's message minus its own Received: field (the message's first one: the test
    messages have none). Milters never see it; one that inserts at index 0 goes above it."""
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.lower().startswith(b"received:"))
    end = start + 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\r\n".join(lines[:start] + lines[end:]) + b"\r\n\r\n" + body


def events(conversation: Conversation) -> list[p.Command]:
    """What a milter was shown: every event but the negotiation, macros, abort and quit (which
    Postfix sends before header and body events and after each message too)."""
    skip = {p.SMFIC_OPTNEG, p.SMFIC_MACRO, p.SMFIC_ABORT, p.SMFIC_QUIT}
    return [c for c in conversation.commands if c.code not in skip and c.code != p.SMFIC_CONNECT]


def both(
    setup: Setup, script: dict[bytes, Any], expect: int, **kwargs: Any
) -> tuple[Outcome, Outcome, Conversation, Conversation]:
    """The same conversation through Postfix and alephsmtp, each with the fake milter running
    ``script``; the two outcomes and what the milter saw each time."""
    fake = setup.fake
    fake.script = script
    start = len(fake.conversations)
    postfix = through_postfix(setup, "fake", expect, **kwargs)
    alephsmtp = through_alephsmtp(setup.endpoints["fake"], **kwargs)
    deadline = time.monotonic() + 10
    while len(fake.conversations) < start + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    seen_by_postfix, seen_by_alephsmtp = fake.conversations[start : start + 2]
    return postfix, alephsmtp, seen_by_postfix, seen_by_alephsmtp


# --- the comparisons -----------------------------------------------------------------------------


def test_the_milter_is_shown_the_same_transaction(setup: Setup) -> None:
    message = MESSAGE.replace(b"Subject: milter peers\r\n", b"Subject:  two\r\n\tlines\r\n")
    postfix, alephsmtp, by_postfix, by_alephsmtp = both(setup, {}, 1, message=message)
    assert (
        [code for code, _ in postfix.replies]
        == [code for code, _ in alephsmtp.replies]
        == [250, 250, 250]
    )
    assert events(by_alephsmtp) == events(by_postfix)
    # The offers differ in one flag: alephsmtp does not offer SMFIP_RCPT_REJ (its milter
    # handlers come before the user's, who may still refuse a recipient the milter saw).
    (offer_p,) = by_postfix.of(p.SMFIC_OPTNEG)
    (offer_a,) = by_alephsmtp.of(p.SMFIC_OPTNEG)
    assert offer_p.numbers[:2] == offer_a.numbers[:2] == (6, int(p.ALL_ACTIONS))
    assert offer_p.numbers[2] ^ offer_a.numbers[2] == int(p.Step.RCPT_REJ)
    (connect_p,) = by_postfix.of(p.SMFIC_CONNECT)
    (connect_a,) = by_alephsmtp.of(p.SMFIC_CONNECT)
    assert connect_a.family == connect_p.family == p.SMFIA_INET
    # Postfix looked the client's name up ("localhost", from /etc/hosts); alephsmtp does no
    # lookups and sends the address in brackets, as Postfix does for a client without a name.
    assert connect_p.strings[1] == connect_a.strings[1] == "127.0.0.1"
    assert connect_a.strings[0] == "[127.0.0.1]"
    # The queue id and the {mail_addr}/{rcpt_addr} macros, which both send.
    for stage, name in ((p.SMFIC_MAIL, "{mail_addr}"), (p.SMFIC_RCPT, "{rcpt_addr}")):
        assert by_alephsmtp.macros(stage)[name] == by_postfix.macros(stage)[name]
    assert (
        by_postfix.macros(p.SMFIC_BODYEOB).keys()
        == by_alephsmtp.macros(p.SMFIC_BODYEOB).keys()
        == {"i"}
    )
    assert without_own_received(postfix.delivered[0].data) == alephsmtp.delivered[0].data == message


EDITS = [
    p.AddHeader("X-Added", "appended"),
    p.InsertHeader(0, "X-Top", "first"),
    p.InsertHeader(1, "X-Also-Top", "second"),
    p.InsertHeader(3, "X-Third", "third"),
    p.ChangeHeader(1, "subject", "changed"),
    p.ChangeHeader(1, "To", ""),
    p.ChangeHeader(2, "Date", "added: there is no second Date"),
    p.ChangeHeader(1, "X-Gone", ""),
    p.AddHeader("X-Folded", "line one\nline two\n\tline three"),
]


@pytest.mark.parametrize("leading_space", [False, True], ids=["plain", "leadspc"])
def test_header_edits_come_out_the_same(setup: Setup, leading_space: bool) -> None:
    edits = list(EDITS)
    if leading_space:
        edits.append(p.AddHeader("X-Own-Blank", "  kept"))
    setup.fake.answer = p.Negotiate(
        6, int(p.ALL_ACTIONS), int(p.Step.HDR_LEADSPC) if leading_space else 0
    )
    try:
        postfix, alephsmtp, _, _ = both(setup, {p.SMFIC_BODYEOB: [[*edits, p.Continue()]]}, 1)
    finally:
        setup.fake.answer = p.Negotiate(6, int(p.ALL_ACTIONS), 0)
    assert without_own_received(postfix.delivered[0].data) == alephsmtp.delivered[0].data
    assert (b"X-Top:first" if leading_space else b"X-Top: first") in alephsmtp.delivered[0].data


def test_envelope_edits_come_out_the_same(setup: Setup) -> None:
    edits = [
        p.ChangeSender("<bounces@example.org>"),
        p.AddRecipient("<archive@example.org>"),
        p.DeleteRecipient("<bob@example.net>"),
    ]
    postfix, alephsmtp, _, _ = both(
        setup,
        {p.SMFIC_BODYEOB: [[*edits, p.Continue()]]},
        1,
        rcpts=("bob@example.net", "carol@example.net"),
    )
    (relayed,) = postfix.delivered
    (delivered,) = alephsmtp.delivered
    assert relayed.envelope.return_path == delivered.envelope.return_path == "bounces@example.org"
    assert (
        sorted(relayed.envelope.recipients)
        == sorted(delivered.envelope.recipients)
        == [
            "archive@example.org",
            "carol@example.net",
        ]
    )


def test_body_replacement_comes_out_the_same(setup: Setup) -> None:
    script = {
        p.SMFIC_BODYEOB: [[p.ReplaceBody(b"new\nbody\r\nno"), p.ReplaceBody(b" end"), p.Continue()]]
    }
    postfix, alephsmtp, _, _ = both(setup, script, 1)
    assert without_own_received(postfix.delivered[0].data) == alephsmtp.delivered[0].data
    assert alephsmtp.delivered[0].data.endswith(b"\r\n\r\nnew\r\nbody\r\nno end\r\n")


@pytest.mark.parametrize(
    ("script", "where"),
    [
        ({p.SMFIC_MAIL: [p.Reject()]}, 0),
        ({p.SMFIC_MAIL: [p.Tempfail()]}, 0),
        ({p.SMFIC_RCPT: [p.ReplyCode("550 5.1.1 <bob@example.net>: no such user")]}, 1),
        ({p.SMFIC_DATA: [p.Tempfail()]}, 2),
        ({p.SMFIC_HEADER: [p.Reject()]}, 2),
        ({p.SMFIC_BODYEOB: [p.ReplyCode("554 5.7.1 spam detected")]}, 2),
        ({p.SMFIC_BODYEOB: [p.ReplyCode("451-4.7.1 first\r\n451 4.7.1 second")]}, 2),
    ],
    ids=[
        "mail-reject",
        "mail-tempfail",
        "rcpt-reply",
        "data-tempfail",
        "header-reject",
        "eom-reply",
        "eom-multiline",
    ],
)
def test_refusals_are_the_same(setup: Setup, script: dict[bytes, Any], where: int) -> None:
    postfix, alephsmtp, _, _ = both(setup, script, 0)
    assert postfix.replies[where] == alephsmtp.replies[where]
    assert postfix.replies[where][0] >= 400
    assert alephsmtp.delivered == []


def test_discard_is_accepted_and_dropped_by_both(setup: Setup) -> None:
    postfix, alephsmtp, _, _ = both(setup, {p.SMFIC_BODYEOB: [p.Discard()]}, 0)
    assert (
        [code for code, _ in postfix.replies]
        == [code for code, _ in alephsmtp.replies]
        == [250, 250, 250]
    )
    # The test server captures what the client was told was accepted; no handler of the
    # user's saw it, and the report says why.
    (dropped,) = alephsmtp.delivered
    assert dropped.envelope.milter.discarded
    time.sleep(1)  # Postfix would have relayed it by now
    assert postfix.delivered == []


def test_quarantine_holds_in_postfix_and_is_reported_by_alephsmtp(setup: Setup) -> None:
    # The known difference: Postfix puts the message on hold; alephsmtp has no queue, so it
    # accepts it and tells the handlers (envelope.milter.quarantine) to hold it themselves.
    script = {p.SMFIC_BODYEOB: [[p.Quarantine("suspicious"), p.Continue()]]}
    postfix, alephsmtp, _, _ = both(setup, script, 0)
    assert (
        [code for code, _ in postfix.replies]
        == [code for code, _ in alephsmtp.replies]
        == [250, 250, 250]
    )
    held = [entry for entry in setup.postfix.queue() if entry.get("queue_name") == "hold"]
    assert len(held) == 1
    assert alephsmtp.delivered[0].envelope.milter.quarantine == "suspicious"


def test_a_dead_milter_tempfails_in_both(setup: Setup) -> None:
    postfix, alephsmtp, _, _ = both(setup, {p.SMFIC_RCPT: ["close"]}, 0)
    assert postfix.replies[1] == alephsmtp.replies[1]
    assert postfix.replies[1][0] == 451


def test_rspamd_verdicts_are_the_same(setup: Setup) -> None:
    if "rspamd" not in setup.endpoints:
        pytest.skip("rspamd is not installed (scripts/install-peers)")
    spam = MESSAGE.replace(b"this is a plain message.", GTUBE)
    postfix = through_postfix(setup, "rspamd", 0, message=spam)
    alephsmtp = through_alephsmtp(setup.endpoints["rspamd"], message=spam)
    assert postfix.replies[-1] == alephsmtp.replies[-1] == (554, "5.7.1 Gtube pattern")
    postfix = through_postfix(setup, "rspamd", 1)
    alephsmtp = through_alephsmtp(setup.endpoints["rspamd"])
    ours, theirs = (
        alephsmtp.delivered[0].data,
        without_own_received(postfix.delivered[0].data),
    )
    # The same fields, in the same places; their values differ only where rspamd's do (its
    # queue id, and the symbols about the relaying host, which Postfix's Received: shows).
    names = [
        line.split(b":")[0]
        for line in ours.split(b"\r\n\r\n")[0].split(b"\r\n")
        if line[:1] not in (b" ", b"\t")
    ]
    names_p = [
        line.split(b":")[0]
        for line in theirs.split(b"\r\n\r\n")[0].split(b"\r\n")
        if line[:1] not in (b" ", b"\t")
    ]
    assert names == names_p
    assert b"X-Spam-Status: No" in ours
    assert b"X-Spam-Status: No" in theirs


@pytest.mark.skipif(OPENDKIM_GENKEY is None, reason="opendkim-tools is not installed")
def test_opendkim_signs_the_same(setup: Setup) -> None:
    if "opendkim" not in setup.endpoints:
        pytest.skip("opendkim is not installed (scripts/install-peers)")
    postfix = through_postfix(setup, "opendkim", 1)
    alephsmtp = through_alephsmtp(setup.endpoints["opendkim"])
    ours, theirs = (
        alephsmtp.delivered[0].data,
        without_own_received(postfix.delivered[0].data),
    )

    def tags(message: bytes) -> dict[bytes, bytes]:
        signature = message.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:", 1)[1]
        signature = signature.split(b"\r\n", 1)[0] + b"".join(
            line for line in signature.split(b"\r\n")[1:] if line[:1] in (b" ", b"\t")
        )
        pairs = (
            tag.strip().split(b"=", 1)
            for tag in signature.replace(b"\t", b"").split(b";")
            if tag.strip()
        )
        return {name.strip(): value.replace(b" ", b"") for name, value in pairs}

    mine, reference = tags(ours), tags(theirs)
    # Same key, same header list, same body hash; the time and so the signature differ.
    for tag in (b"v", b"a", b"c", b"d", b"s", b"h", b"bh"):
        assert mine[tag] == reference[tag], tag
    assert ours.startswith(b"DKIM-Signature: ")
    assert theirs.startswith(b"DKIM-Signature: ")
    assert ours.split(b"\r\n\r\n", 1)[1] == theirs.split(b"\r\n\r\n", 1)[1]
