"""SASL for SMTP AUTH (RFC 4954), without I/O: PLAIN, LOGIN and CRAM-MD5.

An :class:`SaslExchange` turns the AUTH command and the client's responses into either the
next challenge (sent as ``334 <base64>``) or finished :class:`Credentials`, which the session
hands to the ``auth`` event. Credentials never appear in logs or reprs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
from dataclasses import dataclass, field

from .errors import SmtpError

__all__ = ["MECHANISMS", "AuthCancelled", "AuthSyntaxError", "Credentials", "SaslExchange"]

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")

# RFC 4954 4: a response line may be up to 12288 octets long.
MAX_RESPONSE_LENGTH = 12288


class AuthSyntaxError(SmtpError):
    """A response that is not base64, or not what the mechanism expects (RFC 4954 4)."""

    code = 501
    enhanced = "5.5.2"
    text = "Cannot decode response"


class AuthCancelled(SmtpError):
    """The client answered ``*`` (RFC 4954 4)."""

    code = 501
    enhanced = "5.0.0"
    text = "Authentication cancelled"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client proved it knows. ``repr`` hides the secret parts."""

    mechanism: str
    username: str
    password: str | None = field(default=None, repr=False)
    authorization_id: str = ""
    challenge: bytes = field(default=b"", repr=False)  # CRAM-MD5
    digest: str = field(default="", repr=False)  # CRAM-MD5: hex HMAC-MD5 of the challenge

    def check_password(self, secret: str) -> bool:
        """Whether the client knows ``secret``, in constant time, whatever the mechanism."""
        if self.mechanism == "CRAM-MD5":
            expected = hmac.new(secret.encode("utf-8"), self.challenge, "md5").hexdigest()
            return hmac.compare_digest(expected, self.digest.lower())
        if self.password is None:
            return False
        return hmac.compare_digest(secret.encode("utf-8"), self.password.encode("utf-8"))


def _decode(text: str) -> bytes:
    if text == "*":
        raise AuthCancelled()
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise AuthSyntaxError() from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthSyntaxError("Invalid UTF-8 in credentials") from None


class SaslExchange:
    """One AUTH exchange. ``step(response)`` returns a challenge (bytes) or :class:`Credentials`.

    The first call is ``step(initial_response)`` (``None`` when the AUTH command had none);
    every later call passes the client's response line, as text. Raises
    :class:`AuthSyntaxError` or :class:`AuthCancelled`, whose reply the client gets.
    """

    def __init__(self, mechanism: str, hostname: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._hostname = hostname
        self._username: str | None = None
        self._challenge = b""
        self._steps = 0

    def step(self, response: str | None) -> bytes | Credentials:
        self._steps += 1
        if self.mechanism == "PLAIN":
            return self._plain(response)
        if self.mechanism == "LOGIN":
            return self._login(response)
        return self._cram_md5(response)

    def _plain(self, response: str | None) -> bytes | Credentials:
        if response is None:
            return b""  # RFC 4616: an empty challenge asks for the message
        # RFC 4616 2: message = [authzid] NUL authcid NUL passwd
        parts = _decode(response).split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise AuthSyntaxError("Malformed PLAIN response")
        authzid, username, password = (_utf8(part) for part in parts)
        return Credentials("PLAIN", username, password, authzid)

    def _login(self, response: str | None) -> bytes | Credentials:
        # draft-murchison-sasl-login: "Username:", then "Password:".
        if self._username is None:
            if response is None:
                return b"Username:"
            self._username = _utf8(_decode(response))
            return b"Password:"
        if response is None:  # pragma: no cover - the session always passes a line here
            raise AuthSyntaxError()
        return Credentials("LOGIN", self._username, _utf8(_decode(response)))

    def _cram_md5(self, response: str | None) -> bytes | Credentials:
        if not self._challenge:
            if response is not None:
                raise AuthSyntaxError("CRAM-MD5 takes no initial response")
            # RFC 2195 2: a unique msg-id-like challenge.
            token = secrets.token_hex(8)
            self._challenge = f"<{token}.{int(time.time())}@{self._hostname}>".encode("ascii")
            return self._challenge
        if response is None:  # pragma: no cover
            raise AuthSyntaxError()
        username, _, digest = _utf8(_decode(response)).rpartition(" ")
        if not username or len(digest) != 32:
            raise AuthSyntaxError("Malformed CRAM-MD5 response")
        return Credentials("CRAM-MD5", username, None, "", self._challenge, digest)
