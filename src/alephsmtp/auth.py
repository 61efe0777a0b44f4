"""SASL for SMTP AUTH (RFC 4954), without I/O.

A mechanism is a small step object: given the client's response (decoded from base64; ``None`` when
the AUTH command had no initial response) it returns either the next challenge (bytes, sent as
``334 <base64>``) or the finished [`Credentials`][alephsmtp.auth.Credentials], which the session
hands to the ``auth`` event. [`SaslExchange`][alephsmtp.auth.SaslExchange] drives one exchange: it
decodes the client's lines (``*`` cancels, RFC 4954 4) and calls the mechanism.

Built in: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login), CRAM-MD5 (RFC 2195), XOAUTH2
(Google's), OAUTHBEARER (RFC 7628) and EXTERNAL (RFC 4422 appendix A, the TLS client certificate). A
mechanism of your own: [`register_mechanism()`][alephsmtp.auth.register_mechanism] (aiosmtpd's
``auth_XXX``), then name it in ``auth_mechanisms``. Credentials never appear in logs or reprs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import SmtpError

__all__ = [
    "KNOWN_MECHANISMS",
    "MAX_RESPONSE_LENGTH",
    "MECHANISMS",
    "AuthCancelled",
    "AuthSyntaxError",
    "Credentials",
    "Mechanism",
    "SaslContext",
    "SaslExchange",
    "register_mechanism",
]

#: Offered by default: the password mechanisms every client has.
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
    """What the client proved it knows. ``repr`` hides the secret parts.

    ``username`` is the authentication identity; ``password`` (PLAIN, LOGIN), ``token``
    (XOAUTH2, OAUTHBEARER: the bearer token to check with its issuer), ``certificate``
    (EXTERNAL: the client's verified TLS certificate) say how it was proved.
    """

    mechanism: str
    username: str
    password: str | None = field(default=None, repr=False)
    authorization_id: str = ""
    challenge: bytes = field(default=b"", repr=False)  # CRAM-MD5
    digest: str = field(default="", repr=False)  # CRAM-MD5: hex HMAC-MD5 of the challenge
    token: str | None = field(default=None, repr=False)  # XOAUTH2, OAUTHBEARER
    certificate: dict[str, Any] | None = field(default=None, repr=False)  # EXTERNAL

    def check_password(self, secret: str) -> bool:
        """Whether the client knows ``secret``, in constant time, whatever the mechanism
        (always false for a mechanism that sends no password: token, certificate)."""
        if self.mechanism == "CRAM-MD5":
            expected = hmac.new(secret.encode("utf-8"), self.challenge, "md5").hexdigest()
            return hmac.compare_digest(expected, self.digest.lower())
        if self.password is None:
            return False
        return hmac.compare_digest(secret.encode("utf-8"), self.password.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class SaslContext:
    """What a mechanism may know of the session: the server's name, the TLS client
    certificate (if the client sent one and it was verified)."""

    hostname: str
    certificate: dict[str, Any] | None = None


class Mechanism(Protocol):
    """One SASL exchange of a mechanism (a new object per AUTH command)."""

    def step(self, response: bytes | None) -> bytes | Credentials:
        """The next challenge, or the credentials once the exchange is complete.

        ``response`` is the client's answer, base64-decoded (``None``: the AUTH command had no
        initial response). Raise [`AuthSyntaxError`][alephsmtp.auth.AuthSyntaxError] for a response
        that breaks the mechanism's rules.
        """

    def failure(self) -> bytes | None:
        """A last challenge to send when the credentials were refused, before the final
        ``535`` (RFC 7628 3.2.2: OAUTHBEARER's error JSON), or ``None``."""


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthSyntaxError("Invalid UTF-8 in credentials") from None


class _Plain:
    """RFC 4616 2: message = [authzid] NUL authcid NUL passwd."""

    def __init__(self, context: SaslContext) -> None:
        pass

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            return b""  # RFC 4616: an empty challenge asks for the message
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise AuthSyntaxError("Malformed PLAIN response")
        authzid, username, password = (_utf8(part) for part in parts)
        return Credentials("PLAIN", username, password, authzid)

    def failure(self) -> bytes | None:
        return None


class _Login:
    """draft-murchison-sasl-login: "Username:", then "Password:"."""

    def __init__(self, context: SaslContext) -> None:
        self._username: str | None = None

    def step(self, response: bytes | None) -> bytes | Credentials:
        if self._username is None:
            if response is None:
                return b"Username:"
            self._username = _utf8(response)
            return b"Password:"
        if response is None:  # pragma: no cover - the session always passes a line here
            raise AuthSyntaxError()
        return Credentials("LOGIN", self._username, _utf8(response))

    def failure(self) -> bytes | None:
        return None


class _CramMd5:
    """RFC 2195: a unique msg-id-like challenge; the answer is user SP hex(HMAC-MD5)."""

    def __init__(self, context: SaslContext) -> None:
        self._hostname = context.hostname
        self._challenge = b""

    def step(self, response: bytes | None) -> bytes | Credentials:
        if not self._challenge:
            if response is not None:
                raise AuthSyntaxError("CRAM-MD5 takes no initial response")
            token = secrets.token_hex(8)
            self._challenge = f"<{token}.{int(time.time())}@{self._hostname}>".encode("ascii")
            return self._challenge
        if response is None:  # pragma: no cover
            raise AuthSyntaxError()
        username, _, digest = _utf8(response).rpartition(" ")
        if not username or len(digest) != 32:
            raise AuthSyntaxError("Malformed CRAM-MD5 response")
        return Credentials("CRAM-MD5", username, None, "", self._challenge, digest)

    def failure(self) -> bytes | None:
        return None


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class _XOAuth2:
    """Google's XOAUTH2: ``user=<user>^Aauth=Bearer <token>^A^A`` in the initial response;
    a refusal is a 334 with an error JSON, answered empty, then 535."""

    def __init__(self, context: SaslContext) -> None:
        pass

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            return b""  # the client sends the request after an empty challenge
        fields = dict(item.partition("=")[::2] for item in _utf8(response).split("\x01") if item)
        username = fields.get("user", "")
        token = _bearer(fields.get("auth", ""))
        if not username or token is None:
            raise AuthSyntaxError("Malformed XOAUTH2 response")
        return Credentials("XOAUTH2", username, token=token)

    def failure(self) -> bytes | None:
        return json.dumps({"status": "401", "schemes": "Bearer", "scope": ""}).encode()


class _OAuthBearer:
    """RFC 7628: a GS2 header (``n,a=<authzid>,``), then key=value pairs separated by ^A
    (``auth=Bearer <token>``); a refusal is a 334 with an error JSON (3.2.2), answered with
    ^A, then 535."""

    def __init__(self, context: SaslContext) -> None:
        pass

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            return b""
        text = _utf8(response)
        header, separator, rest = text.partition("\x01")
        # RFC 5801 4: gs2-cb-flag "," [gs2-authzid] ","; channel binding is not offered.
        flag, comma, authzid_part = header.partition(",")
        if not separator or not comma or flag not in ("n", "y") or not authzid_part.endswith(","):
            raise AuthSyntaxError("Malformed OAUTHBEARER response")
        authzid_part = authzid_part[:-1]
        authzid = authzid_part[2:] if authzid_part.startswith("a=") else ""
        if authzid_part and not authzid_part.startswith("a="):
            raise AuthSyntaxError("Malformed OAUTHBEARER response")
        authzid = authzid.replace("=2C", ",").replace("=3D", "=")  # RFC 5801 4: saslname
        fields = dict(item.partition("=")[::2] for item in rest.split("\x01") if item)
        token = _bearer(fields.get("auth", ""))
        if token is None:
            raise AuthSyntaxError("Malformed OAUTHBEARER response")
        return Credentials("OAUTHBEARER", authzid, authorization_id=authzid, token=token)

    def failure(self) -> bytes | None:
        return json.dumps({"status": "invalid_token", "schemes": "bearer"}).encode()


class _External:
    """RFC 4422 appendix A: the client is who its TLS certificate says; the response is the
    identity it wants to act as (empty: the certificate's own)."""

    def __init__(self, context: SaslContext) -> None:
        self._certificate = context.certificate

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            return b""
        if self._certificate is None:
            raise AuthSyntaxError("EXTERNAL needs a TLS client certificate")
        authzid = _utf8(response)
        subject = _subject_name(self._certificate)
        return Credentials(
            "EXTERNAL", authzid or subject, authorization_id=authzid, certificate=self._certificate
        )

    def failure(self) -> bytes | None:
        return None


def _subject_name(certificate: dict[str, Any]) -> str:
    """Who the certificate names: its subject's common name, else its first e-mail address,
    else its first DNS name."""
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    names = certificate.get("subjectAltName", ())
    for wanted in ("email", "DNS"):
        for kind, value in names:
            if kind == wanted:
                return str(value)
    return ""


MechanismFactory = Callable[[SaslContext], Mechanism]

#: The mechanisms alephsmtp implements, by name.
KNOWN_MECHANISMS: dict[str, MechanismFactory] = {
    "PLAIN": _Plain,
    "LOGIN": _Login,
    "CRAM-MD5": _CramMd5,
    "XOAUTH2": _XOAuth2,
    "OAUTHBEARER": _OAuthBearer,
    "EXTERNAL": _External,
}
_REGISTRY: dict[str, MechanismFactory] = dict(KNOWN_MECHANISMS)


def register_mechanism(name: str, factory: MechanismFactory) -> None:
    """Make a SASL mechanism of your own available (then list it in ``auth_mechanisms``).

    ``factory(context)`` makes one exchange: an object with ``step(response)`` and ``failure()``
    (see [`Mechanism`][alephsmtp.auth.Mechanism]). ``name`` is a SASL mechanism name (RFC 4422 3.1:
    up to 20 of A-Z, 0-9, ``-``, ``_``).
    """
    upper = name.upper()
    if not (1 <= len(upper) <= 20 and all(c.isalnum() or c in "-_" for c in upper)):
        raise ValueError(f"not a SASL mechanism name: {name!r}")
    if not upper.isascii():
        raise ValueError(f"not a SASL mechanism name: {name!r}")
    _REGISTRY[upper] = factory


def mechanism_known(name: str) -> bool:
    """Whether ``name`` is built in or registered."""
    return name in _REGISTRY


def _decode(text: str) -> bytes:
    if text == "*":
        raise AuthCancelled()
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise AuthSyntaxError() from None


class SaslExchange:
    """One AUTH exchange. ``step(response)`` returns a challenge (bytes) or
    [`Credentials`][alephsmtp.auth.Credentials].

    The first call is ``step(initial_response)`` (``None`` when the AUTH command had none; the
    base64 text as sent, ``""`` for ``=``); every later call passes the client's response line as
    text. Raises [`AuthSyntaxError`][alephsmtp.auth.AuthSyntaxError] or
    [`AuthCancelled`][alephsmtp.auth.AuthCancelled], whose reply the client gets.
    """

    __slots__ = ("_mechanism", "mechanism")

    def __init__(self, mechanism: str, context: SaslContext | str) -> None:
        factory = _REGISTRY.get(mechanism)
        if factory is None:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        if isinstance(context, str):  # the server's hostname
            context = SaslContext(context)
        self.mechanism = mechanism
        self._mechanism = factory(context)

    def step(self, response: str | None) -> bytes | Credentials:
        return self._mechanism.step(None if response is None else _decode(response))

    def failure(self) -> bytes | None:
        """The mechanism's last challenge after a refusal (OAuth's error JSON), if any."""
        return self._mechanism.failure()
