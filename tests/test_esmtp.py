"""ESMTP extensions at the session level: CHUNKING, BINARYMIME, DSN, AUTH, LMTP, STARTTLS."""

from __future__ import annotations

import base64
import hmac
from typing import Any

import pytest

from _harness import Harness, MockLoop, settle
from alephsmtp import Reply
from alephsmtp.auth import Credentials, SaslExchange

HELLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


def received(h: Harness) -> list[Any]:
    messages: list[Any] = []
    h.session.message_received += lambda s, e: messages.append(e)
    return messages


def started(**options: Any) -> tuple[Harness, list[Any]]:
    h = Harness(**options)
    messages = received(h)
    h.send(HELLO)
    h.output()
    return h, messages


# --- CHUNKING (RFC 3030) -----------------------------------------------------------------


@pytest.mark.parametrize("read_size", [1, 5, None])
async def test_bdat_chunks_are_read_by_exact_count(read_size: int | None) -> None:
    h, messages = started(read_size=read_size)
    binary = bytes(range(256)) + b"\r\n.\r\n\n\r.." + b"\x00" * 10
    h.send(
        ENVELOPE
        + b"BDAT %d\r\n" % len(binary[:100])
        + binary[:100]
        + b"BDAT %d LAST\r\n" % len(binary[100:])
        + binary[100:]
        + b"NOOP\r\n"
    )
    assert h.replies() == [
        "250 2.1.0 OK",
        "250 2.1.5 OK",
        "250 2.0.0 100 octets received",
        "250 2.0.0 OK: queued",
        "250 2.0.0 OK",
    ]
    # No unstuffing, no line rules: the bytes as sent (RFC 3030 2).
    assert messages[0].message == binary


async def test_bdat_zero_last_and_a_second_transaction() -> None:
    h, messages = started()
    h.send(ENVELOPE + b"BDAT 3\r\nabcBDAT 0 LAST\r\n" + ENVELOPE + b"BDAT 2 LAST\r\nxy")
    assert h.codes() == ["250", "250", "250", "250", "250", "250", "250"]
    assert [m.message for m in messages] == [b"abc", b"xy"]


async def test_refused_bdat_chunk_is_still_read_and_discarded() -> None:
    h, messages = started()
    # Out of order: no MAIL yet. The 10 bytes must not be read as commands.
    h.send(b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert h.replies() == ["503 5.5.1 Error: need MAIL command", "250 2.0.0 OK"]
    assert not h.transport.closed
    assert messages == []


async def test_bdat_handler_refusal_fails_the_transaction() -> None:
    h, messages = started()
    h.session.bdat += lambda s, e: (
        "452 4.3.1 Insufficient system storage" if e.command.last else None
    )
    h.send(ENVELOPE + b"BDAT 2\r\nabBDAT 2 LAST\r\ncdBDAT 1 LAST\r\nz")
    assert h.replies()[2:] == [
        "250 2.0.0 2 octets received",
        "452 4.3.1 Insufficient system storage",
        "503 5.5.1 Error: need MAIL command",
    ]
    assert messages == []


async def test_bdat_over_the_size_limit_is_discarded_with_552() -> None:
    h, messages = started(max_message_size=10)
    h.send(ENVELOPE + b"BDAT 6\r\n123456BDAT 6 LAST\r\n789012NOOP\r\n")
    assert h.replies()[2:] == [
        "250 2.0.0 6 octets received",
        "552 5.3.4 Error: message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert messages == []


@pytest.mark.parametrize(
    ("size", "limit"),
    [
        (b"9223372036854775808", 0),  # 2**63: past what a reader can count
        (b"99999999999999999999", 0),  # 20 digits, the longest a size may be
        (b"9223372036854775807", 10 << 20),  # 2**63 - 1: can be counted, but too large
        (b"11", 10),
    ],
)
async def test_a_chunk_larger_than_any_message_is_refused_and_the_session_closed(
    size: bytes, limit: int
) -> None:
    h, messages = started(max_message_size=limit)
    h.send(ENVELOPE + b"BDAT " + size + b" LAST\r\nNOOP\r\n")
    assert h.replies()[2:] == ["552 5.3.4 Error: message size exceeds fixed maximum message size"]
    assert h.transport.closed
    assert messages == []


async def test_a_chunk_of_the_largest_message_size_is_read() -> None:
    h, messages = started(max_message_size=10)
    h.send(ENVELOPE + b"BDAT 10 LAST\r\n0123456789NOOP\r\n")
    assert h.replies()[2:] == ["250 2.0.0 OK: queued", "250 2.0.0 OK"]
    assert messages[0].message == b"0123456789"


async def test_data_after_bdat_is_a_bad_sequence() -> None:
    h, _ = started()
    h.send(ENVELOPE + b"BDAT 1\r\nxDATA\r\n")
    assert h.replies()[-1] == "503 5.5.1 Error: BDAT in progress"


async def test_binarymime_needs_bdat() -> None:
    h, messages = started()
    h.send(b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert h.replies()[-1] == "503 5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA"
    h.send(b"BDAT 2 LAST\r\n\x00\xff")
    assert h.codes() == ["250"]
    assert messages[0].message == b"\x00\xff"
    assert messages[0].envelope.body_type == "BINARYMIME"


async def test_chunking_off_is_not_advertised_and_still_stays_in_sync() -> None:
    h = Harness(chunking=False)
    h.send(HELLO)
    assert "250-CHUNKING" not in h.replies()
    h.send(ENVELOPE + b"BDAT 4\r\nNOOPNOOP\r\n")
    assert h.replies()[-2:] == ["502 5.5.1 Error: command not implemented", "250 2.0.0 OK"]


# --- DSN (RFC 3461) ----------------------------------------------------------------------


async def test_dsn_parameters_reach_the_envelope() -> None:
    h, messages = started()
    h.send(
        b"MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B314\r\n"
        b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40example.net\r\n"
        b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\n"
        b"DATA\r\nx\r\n.\r\n"
    )
    assert h.codes() == ["250", "250", "250", "354", "250"]
    envelope = messages[0].envelope
    assert (envelope.dsn_ret, envelope.dsn_envid) == ("HDRS", "QQ+314")
    assert envelope.dsn_notify == [("SUCCESS", "DELAY"), ("NEVER",)]
    assert envelope.dsn_orcpt == [("rfc822", "b@example.net"), None]


@pytest.mark.parametrize(
    "command",
    [
        b"MAIL FROM:<a@example.org> RET=ALL\r\n",
        b"MAIL FROM:<a@example.org> ENVID=bad+zz\r\n",
        b"MAIL FROM:<a@example.org> ENVID=" + b"x" * 101 + b"\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> NOTIFY=SOMETIMES\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> ORCPT=b@example.net\r\n",
        # RFC 3461 4: decoded, ENVID and ORCPT are printable US-ASCII: no CR LF, NUL, DEL.
        b"MAIL FROM:<a@example.org> ENVID=ab+0D+0Acd\r\n",
        b"MAIL FROM:<a@example.org> ENVID=a+00b\r\n",
        b"MAIL FROM:<a@example.org> ENVID=a+C3+A9\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> ORCPT=rfc822;b+0D+0A@x.net\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> ORCPT=rfc822;b+7F@example.net\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> ORCPT=utf-8;b+0A@example.net\r\n",
    ],
)
async def test_bad_dsn_parameters_get_501(command: bytes) -> None:
    h, _ = started()
    h.send(command)
    assert h.replies()[-1].startswith("501 5.5.4")


async def test_dsn_off_makes_its_parameters_unknown() -> None:
    h, _ = started(dsn=False)
    h.send(b"MAIL FROM:<a@example.org> RET=FULL\r\n")
    assert h.replies() == ["555 5.5.4 Error: parameter not recognized or not implemented"]


# --- AUTH (RFC 4954) ---------------------------------------------------------------------


def auth_harness(**options: Any) -> tuple[Harness, list[Any]]:
    attempts: list[Any] = []

    def on_session(s: Any) -> None:
        def check(sender: Any, e: Any) -> bool:
            attempts.append((e.mechanism, e.username))
            return e.username == "alice" and e.check_password("s3cret")

        s.auth += check

    options.setdefault("auth_over_plaintext", True)
    h = Harness(on_session, **options)
    h.send(HELLO)
    assert "250-AUTH PLAIN LOGIN CRAM-MD5" in h.replies()
    return h, attempts


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


async def test_auth_plain_with_initial_response() -> None:
    h, attempts = auth_harness()
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert h.replies() == ["235 2.7.0 Authentication successful"]
    assert h.session.authenticated_as == "alice"
    assert attempts == [("PLAIN", "alice")]
    h.send(b"AUTH PLAIN =\r\n")
    assert h.replies() == ["503 5.5.1 Error: already authenticated"]
    messages = received(h)
    h.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
    assert messages[0].envelope.auth_identity == "alice"


async def test_auth_plain_with_a_challenge_and_a_wrong_password() -> None:
    h, _ = auth_harness()
    h.send(b"AUTH PLAIN\r\n")
    assert h.replies() == ["334 "]
    h.send(f"{b64(chr(0) + 'alice' + chr(0) + 'wrong')}\r\n".encode())
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    assert h.session.authenticated_as is None


async def test_auth_login() -> None:
    h, _ = auth_harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.replies() == [f"334 {b64('Username:')}"]
    h.send(f"{b64('alice')}\r\n".encode())
    assert h.replies() == [f"334 {b64('Password:')}"]
    h.send(f"{b64('s3cret')}\r\n".encode())
    assert h.replies() == ["235 2.7.0 Authentication successful"]


async def test_auth_cram_md5() -> None:
    h, _ = auth_harness()
    h.send(b"AUTH CRAM-MD5\r\n")
    (line,) = h.replies()
    challenge = base64.b64decode(line[4:])
    assert challenge.startswith(b"<")
    assert challenge.endswith(b"@mx.test>")
    digest = hmac.new(b"s3cret", challenge, "md5").hexdigest()
    h.send(f"{b64('alice ' + digest)}\r\n".encode())
    assert h.replies() == ["235 2.7.0 Authentication successful"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"AUTH LOGIN\r\n", b"*\r\n"], "501 5.0.0 Authentication cancelled"),
        ([b"AUTH PLAIN\r\n", b"not base64!\r\n"], "501 5.5.2 Cannot decode response"),
        ([b"AUTH PLAIN bm90IGJhc2U2NA\r\n"], "501 5.5.2 Cannot decode initial response as base64"),
        (
            [b"AUTH PLAIN " + b64("no-nuls").encode() + b"\r\n"],
            "501 5.5.2 Malformed PLAIN response",
        ),
        ([b"AUTH GSSAPI\r\n"], "504 5.5.4 Unrecognized authentication type"),
        (
            [b"AUTH PLAIN\r\n", b"A" * 13000 + b"\r\n"],
            "500 5.5.6 Authentication exchange line is too long",
        ),
    ],
)
async def test_auth_errors(lines: list[bytes], expected: str) -> None:
    h, attempts = auth_harness()
    for line in lines:
        h.send(line)
    assert h.replies()[-1] == expected
    assert attempts == []
    h.send(b"NOOP\r\n")  # the exchange is over: lines are commands again
    assert h.replies() == ["250 2.0.0 OK"]


async def test_auth_failures_are_slowed_down_then_cut() -> None:
    """Each failed AUTH counts; from the second on the 535 comes after auth_failure_delay,
    and max_auth_failures ends the session (421 4.7.0): no password guessing at wire speed."""
    loop = MockLoop()
    h, attempts = auth_harness(loop=loop, max_auth_failures=3, auth_failure_delay=2.0)
    wrong = f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'guess')}\r\n".encode()
    h.send(wrong)
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    h.send(wrong)
    assert h.replies() == []  # held back
    h.send(wrong)  # what comes meanwhile waits too (held, not answered)
    assert h.replies() == []
    assert len(attempts) == 2
    loop.advance(2)
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    loop.advance(2)
    assert h.replies() == [
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.0 Error: too many authentication failures",
    ]
    assert h.transport.closed
    assert len(attempts) == 3


async def test_auth_failures_count_towards_max_bad_commands() -> None:
    h, _ = auth_harness(max_bad_commands=2, max_auth_failures=10, auth_failure_delay=0)
    h.send(b"FOO\r\n")
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'guess')}\r\n".encode())
    assert h.replies()[-1] == "421 4.7.0 Error: too many errors"


async def test_a_successful_auth_after_failures_is_accepted() -> None:
    h, _ = auth_harness(max_auth_failures=3, auth_failure_delay=0)
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'guess')}\r\n".encode())
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert h.replies() == [
        "535 5.7.8 Authentication credentials invalid",
        "235 2.7.0 Authentication successful",
    ]


async def test_auth_not_offered_over_plaintext_by_default() -> None:
    h = Harness(lambda s: s.auth.connect(lambda sender, e: True))
    h.send(HELLO)
    assert not any(line.startswith("250-AUTH") for line in h.replies())
    h.send(b"AUTH PLAIN =\r\n")
    assert h.replies() == ["503 5.5.1 Error: authentication not enabled"]


async def test_auth_required_before_mail() -> None:
    h, _ = auth_harness(auth_require=True)
    h.send(b"MAIL FROM:<a@example.org>\r\n")
    assert h.replies() == ["530 5.7.0 Authentication required"]
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    h.send(b"MAIL FROM:<a@example.org> AUTH=alice+40example.org\r\n")
    assert h.codes() == ["235", "250"]


async def test_async_auth_handler_and_reply_override() -> None:
    async def check(sender: Any, e: Any) -> Reply:
        await settle(1)
        return Reply(454, "4.7.0", "Temporary authentication failure")

    h = Harness(lambda s: s.auth.connect(check), auth_over_plaintext=True)
    h.send(HELLO)
    h.output()
    h.send(f"AUTH PLAIN {b64(chr(0) + 'u' + chr(0) + 'p')}\r\n".encode())
    await settle()
    assert h.replies() == ["454 4.7.0 Temporary authentication failure"]


def test_credentials_hide_secrets() -> None:
    credentials = SaslExchange("PLAIN", "mx").step(b64("\0bob\0hunter2"))
    assert isinstance(credentials, Credentials)
    assert "hunter2" not in repr(credentials)
    assert credentials.check_password("hunter2")
    assert not credentials.check_password("hunter3")


# --- LMTP (RFC 2033) ---------------------------------------------------------------------


async def test_lmtp_one_reply_per_recipient() -> None:
    def on_session(s: Any) -> None:
        def deliver(sender: Any, e: Any) -> list[str]:
            return [
                "250 2.1.5 delivered" if r.local_part != "full" else "452 4.2.2 Mailbox full"
                for r in e.envelope.recipients
            ]

        s.message_received += deliver

    h = Harness(on_session, lmtp=True)
    h.output()
    h.send(b"EHLO x\r\n")
    assert h.replies() == ["500 5.5.1 Error: this is an LMTP server; use LHLO"]
    h.send(b"LHLO x\r\n")
    assert h.replies()[0] == "250-mx.test"
    h.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<one@example.net>\r\nRCPT TO:<full@example.net>\r\n"
        b"RCPT TO:<two@example.net>\r\nDATA\r\nhi\r\n.\r\n"
    )
    assert h.replies()[-3:] == [
        "250 2.1.5 delivered",
        "452 4.2.2 Mailbox full",
        "250 2.1.5 delivered",
    ]


async def test_lmtp_single_reply_applies_to_every_recipient() -> None:
    h = Harness(lmtp=True)
    h.send(b"LHLO x\r\n" + ENVELOPE + b"RCPT TO:<c@example.net>\r\nDATA\r\nhi\r\n.\r\n")
    assert h.replies()[-2:] == ["250 2.0.0 OK: queued", "250 2.0.0 OK: queued"]


# --- STARTTLS without a certificate; SMTPUTF8 --------------------------------------------


async def test_starttls_not_offered_without_a_context() -> None:
    h, _ = started()
    h.send(b"STARTTLS\r\n")
    assert h.replies() == ["502 5.5.1 Error: command not implemented"]


async def test_smtputf8_off_refuses_the_keyword() -> None:
    h, _ = started(smtputf8=False)
    h.send("MAIL FROM:<jörg@example.org> SMTPUTF8\r\n".encode())
    assert h.replies() == ["555 5.5.4 Error: parameter not recognized or not implemented"]
