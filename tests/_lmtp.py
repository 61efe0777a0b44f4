"""An LMTP client for the tests: smtplib's ``LMTP`` over a Unix socket, reading the one reply
per recipient that RFC 2033 4.2 gives after the message (``LMTP.sendmail`` reads only one)."""

from __future__ import annotations

import smtplib
from pathlib import Path

__all__ = ["lmtp_send"]


def lmtp_send(
    path: str | Path, sender: str, recipients: list[str], message: bytes
) -> dict[str, tuple[int, bytes]]:
    """Every recipient's final reply: its RCPT refusal, or its reply after the message."""
    replies: dict[str, tuple[int, bytes]] = {}
    with smtplib.LMTP(str(path), timeout=30) as client:
        client.ehlo_or_helo_if_needed()
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        accepted = []
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code // 100 == 2:
                accepted.append(recipient)
            else:
                replies[recipient] = (code, text)
        if accepted:
            replies[accepted[0]] = client.data(message)
            for recipient in accepted[1:]:
                replies[recipient] = client.getreply()
    return replies
