"""Postfix delivering by LMTP to alephsmtp on a Unix-domain socket, as a deployment would have it.

A private Postfix (Debian's package, installed by scripts/install-peers) runs for the module
from a configuration in a tmp dir (``postfix -c DIR start-fg``, chroot off): an smtpd on a
loopback port takes the test's mail, and ``default_transport = lmtp:unix:<socket>`` hands
every message to an :class:`alephsmtp.Controller` serving LMTP on that socket. The socket is
made as the deployment docs say: in a setgid directory of Postfix's group, mode 0660, so
Postfix's delivery agent (the ``postfix`` user) may connect and nobody else.

What is checked is what Postfix does with alephsmtp's replies, from its queue
(``postqueue -j``) and its log: a message arrives whole (large, spooled, dot lines intact);
per-recipient LMTP replies (RFC 2033 4.2) are taken per recipient: a 2xx is delivered, a 5xx
is bounced (the bounce comes back through LMTP, from the null sender, naming our reply), a
4xx stays in Postfix's queue, deferred with our reply as its reason.
"""

from __future__ import annotations

import grp
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _postfix import Postfix, needs_postfix, postfix_home
from alephsmtp import Controller

pytestmark = needs_postfix


def message(subject: str, body: bytes) -> bytes:
    return (
        b"From: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <" + subject.encode() + b"@example.org>\r\n"
        b"\r\n" + body
    )


class Mailbox:
    """The LMTP server's side: per-recipient replies by local part, and what was delivered."""

    REPLIES = {
        "unknown": "550 5.1.1 No such user here",
        "full": "452 4.2.2 Mailbox full, try again later",
    }

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, bytes]] = []  # (return path, recipient, message)
        self.sessions: list[Any] = []
        self._arrived = threading.Condition()

    def on_session(self, session: Any) -> None:
        session.rcpt += self.rcpt
        session.message_received += self.received

    def rcpt(self, session: Any, e: Any) -> str | None:
        if e.command.recipient_address.local_part == "gone":
            return "550 5.1.1 Gone, refused at RCPT"
        return None

    def received(self, session: Any, e: Any) -> list[str | None]:
        replies: list[str | None] = []
        with self._arrived:
            self.sessions.append((session.peer, session.helo_name))
            for recipient in e.envelope.recipients:
                if str(recipient).startswith("crash@"):
                    raise RuntimeError("a bug in the handler")  # the session answers 451
                reply = self.REPLIES.get(str(recipient).split("@", 1)[0])
                if reply is None:
                    self.delivered.append(
                        (str(e.envelope.return_path or ""), str(recipient), bytes(e.message))
                    )
                replies.append(reply)
            self._arrived.notify_all()
        return replies

    def wait(self, count: int, timeout: float = 60) -> list[tuple[str, str, bytes]]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.delivered) >= count, timeout):
                raise AssertionError(f"{len(self.delivered)} delivered, {count} expected")
            return list(self.delivered)


class Setup:
    def __init__(self, postfix: Postfix, mailbox: Mailbox, socket_path: Path) -> None:
        self.postfix = postfix
        self.mailbox = mailbox
        self.socket_path = socket_path


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    with postfix_home() as home:
        # The socket's directory, as docs/deployment.md has it: setgid and of Postfix's
        # group, so the socket file is Postfix's group's, and mode 0660 lets its delivery
        # agent in.
        run_dir = home / "run"
        run_dir.mkdir()
        shutil.chown(run_dir, group="postfix")
        run_dir.chmod(0o2750)
        socket_path = run_dir / "lmtp.sock"
        mailbox = Mailbox()
        with Controller(
            mailbox.on_session, path=socket_path, lmtp=True, hostname="lmtp.test"
        ) as controller:
            assert controller.address == str(socket_path)
            postfix = Postfix(
                home,
                f"default_transport = lmtp:unix:{socket_path}",
                {"smtpd": ""},
                main_cf="message_size_limit = 20000000\n",
                hostname="mta.test",
            )
            try:
                yield Setup(postfix, mailbox, socket_path)
            finally:
                postfix.stop()


def test_the_socket_is_postfixs_groups_and_nobody_elses(setup: Setup) -> None:
    info = setup.socket_path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("postfix").gr_gid


def test_a_large_message_arrives_whole(setup: Setup) -> None:
    # 3 MiB (past the 1 MiB spool threshold: read back from the spool file), with lines that
    # start with a dot (stuffed by Postfix's LMTP client, unstuffed by alephsmtp).
    line = b".dot line %06d " + b"x" * 60 + b"\r\n"
    body = b"".join(line % number for number in range(40000)) + b"..\r\n.\r\n"
    data = message("large", body)
    before = len(setup.mailbox.delivered)
    assert setup.postfix.send("alice@example.org", ["bob@example.net"], data) == {}
    delivered = setup.mailbox.wait(before + 1)[before:]
    ((return_path, recipient, received),) = delivered
    assert (return_path, recipient) == ("alice@example.org", "bob@example.net")
    # Postfix adds its Received: field on top; the rest is the message, byte for byte.
    assert received.endswith(data)
    added = received[: len(received) - len(data)].split(b"\r\n")
    assert added[0].startswith(b"Received: from ")
    assert added[-1] == b""
    assert all(line[:1] in (b" ", b"\t") for line in added[1:-1])  # its folded lines
    assert b"by mta.test (Postfix)" in received[: len(received) - len(data)]
    log = setup.postfix.wait_for_log("status=sent")
    assert f"[{setup.socket_path}], " in log  # Postfix's relay=, naming our socket
    assert "dsn=2.0.0, status=sent (250 2.0.0 OK: queued)" in log


def test_per_recipient_replies_deliver_bounce_and_defer(setup: Setup) -> None:
    mailbox, postfix = setup.mailbox, setup.postfix
    before = len(mailbox.delivered)
    recipients = [
        "carol@example.net",
        "unknown@example.net",
        "full@example.net",
        "gone@example.net",
    ]
    data = message("per-recipient", b"one message, three fates\r\n")
    # Postfix accepts all three from the client: what happens next is LMTP's.
    assert postfix.send("alice@example.org", recipients, data) == {}
    # carol: delivered. unknown: 550, so Postfix bounces: the bounce comes back to the sender
    # through the same LMTP socket, from the null sender (RFC 5321 4.5.5).
    delivered = mailbox.wait(before + 2)[before:]
    by_recipient = {recipient: (path, text) for path, recipient, text in delivered}
    assert by_recipient["carol@example.net"][0] == "alice@example.org"
    assert by_recipient["carol@example.net"][1].endswith(data)
    bounce_path, bounce = by_recipient["alice@example.org"]
    assert bounce_path == ""
    assert b"unknown@example.net" in bounce
    assert b"550 5.1.1 No such user here" in bounce
    assert b"550 5.1.1 Gone, refused at RCPT" in bounce  # one report for both
    # Postfix's log: each recipient's fate, from our reply to it after the message.
    log = postfix.wait_for_log("sender non-delivery notification")
    said = f"host mta.test[{setup.socket_path}] said:"
    expected = {
        "carol@example.net": "dsn=2.0.0, status=sent (250 2.0.0 OK: queued)",
        "unknown@example.net": f"dsn=5.1.1, status=bounced ({said} 550 5.1.1 No such user here "
        "(in reply to end of DATA command))",
        "full@example.net": f"dsn=4.2.2, status=deferred ({said} 452 4.2.2 Mailbox full, try "
        "again later (in reply to end of DATA command))",
        "gone@example.net": f"dsn=5.1.1, status=bounced ({said} 550 5.1.1 Gone, refused at RCPT "
        "(in reply to RCPT TO command))",
    }
    for recipient, fate in expected.items():
        lines = [line for line in log.splitlines() if f"to=<{recipient}>" in line]
        assert any(fate in line for line in lines), (recipient, lines)
    # full: 452, so Postfix keeps it in its queue for a later try, with our reply as reason.
    deadline = time.monotonic() + 60
    while True:  # bounded: the deferred entry shows once the delivery attempt is recorded
        waiting = [
            (entry["queue_name"], rcpt["address"], rcpt.get("delay_reason", ""))
            for entry in postfix.queue()
            for rcpt in entry["recipients"]
        ]
        if any(address == "full@example.net" for _, address, _ in waiting):
            break
        assert time.monotonic() < deadline, f"not in the queue: {waiting}"
        time.sleep(0.05)
    full = [(queue, reason) for queue, address, reason in waiting if address == "full@example.net"]
    assert [queue for queue, _ in full] == ["deferred"]
    assert "452 4.2.2 Mailbox full, try again later" in full[0][1]
    # Nothing for unknown or full reached the mailbox.
    assert {r for _, r, _ in mailbox.delivered} <= {
        "bob@example.net",
        "carol@example.net",
        "alice@example.org",
    }


def test_postfix_speaks_lmtp_over_the_socket(setup: Setup) -> None:
    """Every session came over the socket (the peer is its path) and began with LHLO."""
    assert setup.mailbox.sessions
    assert all(peer == str(setup.socket_path) for peer, _ in setup.mailbox.sessions)
    assert {helo for _, helo in setup.mailbox.sessions if helo} == {"mta.test"}


def test_a_failing_handler_is_deferred_never_bounced(setup: Setup) -> None:
    """A fault on our side answers 451 4.3.0 (never a 5xx): Postfix keeps the message."""
    postfix = setup.postfix
    data = message("crash", b"the handler raises for this one\r\n")
    assert postfix.send("alice@example.org", ["crash@example.net"], data) == {}
    log = postfix.wait_for_log("to=<crash@example.net>")
    (line,) = [line for line in log.splitlines() if "to=<crash@example.net>" in line]
    assert "dsn=4.3.0, status=deferred" in line
    assert "451 4.3.0" in line
    assert "status=bounced" not in line
    deadline = time.monotonic() + 60
    while not any(  # bounded: the queue shows it once the attempt is recorded
        rcpt["address"] == "crash@example.net"
        for entry in postfix.queue()
        if entry["queue_name"] == "deferred"
        for rcpt in entry["recipients"]
    ):
        assert time.monotonic() < deadline, postfix.queue()
        time.sleep(0.05)
