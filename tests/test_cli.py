"""The command line's own logic (the CLI run as a process is tested in test_server.py)."""

from __future__ import annotations

import hmac
from typing import ClassVar

from alephsmtp.auth import Credentials
from alephsmtp.cli import check_credentials
from alephsmtp.commands import AuthCommand
from alephsmtp.events import AuthEventArgs

CHALLENGE = b"<1234.5678@mx.test>"


class CountedCredentials(Credentials):
    """Credentials that record every secret they are checked against."""

    checked: ClassVar[list[str]] = []

    def check_password(self, secret: str) -> bool:
        CountedCredentials.checked.append(secret)
        return super().check_password(secret)


def cram(username: str, password: str) -> AuthEventArgs:
    digest = hmac.new(password.encode(), CHALLENGE, "md5").hexdigest()
    credentials = CountedCredentials("CRAM-MD5", username, None, "", CHALLENGE, digest)
    return AuthEventArgs(AuthCommand("CRAM-MD5"), credentials)


def test_an_unknown_user_costs_the_same_check_as_a_wrong_password() -> None:
    users = {"alice": "s3cret"}
    CountedCredentials.checked.clear()
    assert check_credentials(users, cram("alice", "s3cret"))
    assert not check_credentials(users, cram("alice", "wrong"))
    assert not check_credentials(users, cram("mallory", "s3cret"))
    # One HMAC each: the unknown user's against a secret nobody knows.
    assert len(CountedCredentials.checked) == 3
    assert CountedCredentials.checked[:2] == ["s3cret", "s3cret"]
    assert CountedCredentials.checked[2] not in users.values()
