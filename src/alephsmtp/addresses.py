"""Paths and mailboxes of the MAIL and RCPT commands (RFC 5321 4.1.2, RFC 6531 3.3).

[`parse_path()`][alephsmtp.addresses.parse_path] is the one parser of paths: it reads
``<[A-d-l:]Mailbox>`` (or ``<>``) at the start of a command argument and returns an
[`Address`][alephsmtp.addresses.Address], a ``str`` that also knows its ``local_part`` and
``domain``. [`parse_parameters()`][alephsmtp.addresses.parse_parameters] reads the ESMTP parameters
that follow. Both raise errors that carry their reply
([`AddressError`][alephsmtp.addresses.AddressError],
[`ParameterError`][alephsmtp.addresses.ParameterError]); the command layer
([`alephsmtp.commands`][alephsmtp.commands]) picks the wording per command.
"""

from __future__ import annotations

import ipaddress
import re
from typing import ClassVar

from .errors import CommandSyntaxError

__all__ = [
    "NULL_PATH",
    "Address",
    "AddressError",
    "NonAsciiAddressError",
    "ParameterError",
    "decode_xtext",
    "parse_parameters",
    "parse_path",
    "simple_address",
]

# RFC 5321 4.5.3.1.1-3: the size limits of a path's parts, in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets and the source route ("punctuation")
_MAX_LABEL = 63  # RFC 1035 2.3.4

# RFC 6531 3.3 / RFC 6532 3.1: UTF8-non-ascii, as code points (no lone surrogates, which have no
# UTF-8 form). Every class below accepts it; ASCII-only callers are told apart afterwards, so a
# non-ASCII path is reported as such (553 5.6.7), not as a syntax error.
_U = "\x80-\ud7ff\ue000-\U0010ffff"

# RFC 5321 4.1.2: Dot-string = Atom *("." Atom); Atom = 1*atext (RFC 5322 3.2.3).
_ATOM = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_U}]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
# Quoted-string = DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE; qtextSMTP = %d32-33 / %d35-91 /
# %d93-126 (+ UTF8-non-ascii, RFC 6531); quoted-pairSMTP = "\" %d32-126.
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
# sub-domain = Let-dig [Ldh-str]: a label neither starts nor ends with a hyphen; U-labels
# (RFC 6531 3.3) take the same shape with non-ASCII letters.
_LABEL = rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9\-{_U}]{{0,61}}[A-Za-z0-9{_U}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"

_LOCAL_PART_RE = re.compile(rf"{_DOT_STRING}|{_QUOTED_STRING}")
_DOT_STRING_RE = re.compile(rf"{_DOT_STRING}\Z")
_DOMAIN_RE = re.compile(_DOMAIN)
# address-literal = "[" ... "]", each kind made of dcontent (%d33-90 / %d94-126); the kind is
# told apart and checked by _valid_literal.
_LITERAL_RE = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
# Standardized-tag = Ldh-str (General-address-literal).
_TAG_RE = re.compile(r"[A-Za-z0-9\-]*[A-Za-z0-9]\Z")
# A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain. Followed by ":".
_ADL_RE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_NEEDS_ESCAPE_RE = re.compile(r'(["\\])')

# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
# esmtp-value = 1*(%d33-60 / %d62-126), + UTF8-non-ascii (RFC 6531 3.3).
_PARAMETER_RE = re.compile(rf"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e{_U}]*))?\Z")

_POSTMASTER = "postmaster"

# The common case, ``<dot.atom@host.example>`` in ASCII followed by the end or a space, in one
# match: most paths take this way and skip the general parser below (same result, cheaper).
_A = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_L = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_SIMPLE_PATH_RE = re.compile(rf"<({_A}(?:\.{_A})*)@({_L}(?:\.{_L})*)>(?: +|\Z)")


class AddressError(CommandSyntaxError):
    """A path that breaks RFC 5321 4.1.2 or the limits of 4.5.3.1; ``reason`` says how.

    The command layer re-raises it with its own wording (``501 5.1.7`` for MAIL, ``501 5.1.3``
    for RCPT); ``reason`` is for logs and is never sent to the client.
    """

    code = 501
    enhanced = "5.1.3"
    text = "Bad address syntax"

    def __init__(
        self,
        text: str | None = None,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(text, code=code, enhanced=enhanced)
        self.reason = reason

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.code}, {self.enhanced!r}, {self.text!r}, "
            f"reason={self.reason!r})"
        )


class NonAsciiAddressError(AddressError):
    """A well-formed path with non-ASCII characters where UTF-8 is not allowed (RFC 6531 3.5)."""

    code = 553
    enhanced = "5.6.7"
    text = "Non-ASCII address not permitted without SMTPUTF8"


class ParameterError(CommandSyntaxError):
    """ESMTP parameters that break RFC 5321 4.1.2 (``Mail-parameters``/``Rcpt-parameters``)."""

    code = 501
    enhanced = "5.5.4"
    text = "Bad parameter syntax"


def _quote_local_part(local_part: str) -> str:
    # RFC 5321 4.1.2: a local part is written as a Dot-string when it can be, else quoted
    # ("SHOULD NOT ... unless the local-part requires it").
    if _DOT_STRING_RE.match(local_part):
        return local_part
    return '"' + _NEEDS_ESCAPE_RE.sub(r"\\\1", local_part) + '"'


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class Address(str):
    """A mailbox, as the ``str`` ``"local@domain"``, with its parts as attributes.

    ``Address("John Doe", "example.org")`` is ``'"John Doe"@example.org'``: the local part is
    quoted only when it cannot be written as a Dot-string. ``local_part`` is kept unquoted and
    ``domain`` as given (an address literal keeps its brackets: ``[192.0.2.1]``). The
    constructor does not validate: [`parse_path()`][alephsmtp.addresses.parse_path] does.

    Two special forms have an empty domain: `NULL` (the null reverse-path ``<>``, equal to
    ``""`` and false) and ``Address("Postmaster", "")`` (RFC 5321 4.1.1.3: ``RCPT
    TO:<Postmaster>``, a string ``"Postmaster"``).
    """

    NULL: ClassVar[Address]

    _local_part: str
    _domain: str

    def __new__(cls, local_part: str, domain: str) -> Address:
        if domain:
            text = f"{_quote_local_part(local_part)}@{domain}"
        elif local_part:
            text = _quote_local_part(local_part)
        else:
            text = ""
        self = super().__new__(cls, text)
        self._local_part = local_part
        self._domain = domain
        return self

    @property
    def local_part(self) -> str:
        """The local part, unquoted (``John Doe`` for ``"John Doe"@example.org``)."""
        return self._local_part

    @property
    def domain(self) -> str:
        """The domain, or an address literal with its brackets; ``""`` for null and Postmaster."""
        return self._domain

    @property
    def is_null(self) -> bool:
        """The null reverse-path ``<>`` (RFC 5321 4.5.5)."""
        return not self

    @property
    def is_ascii(self) -> bool:
        """False when the local part or the domain holds non-ASCII (it needs SMTPUTF8)."""
        return self.isascii()

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]
        # pickle and copy rebuild through __new__, which takes the parts, not the whole string.
        return (self._local_part, self._domain)

    def __repr__(self) -> str:
        return f"Address(local_part={self._local_part!r}, domain={self._domain!r})"


Address.NULL = Address("", "")
NULL_PATH = Address.NULL


def _valid_literal(literal: str) -> bool:
    # RFC 5321 4.1.3: IPv4-address-literal / "IPv6:" IPv6-addr / Standardized-tag ":" content.
    content = literal[1:-1]
    tag, colon, value = content.partition(":")
    if not colon:
        try:
            ipaddress.IPv4Address(content)
        except ValueError:
            return False
        return True
    if tag.lower() == "ipv6":
        if "%" in value:  # ipaddress accepts a scope id, RFC 5321 does not
            return False
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return False
        return True
    return bool(value) and _TAG_RE.match(tag) is not None


def _valid_u_labels(domain: str) -> bool:
    # A U-label must fit a DNS label once converted to its A-label (RFC 5890 2.3.2.1).
    return all(
        label.isascii() or len(label.encode("punycode")) + 4 <= _MAX_LABEL
        for label in domain.split(".")
    )


def simple_address(local_part: str, domain: str) -> Address:
    """The address of a Dot-string local part and a domain already checked (no quoting needed:
    the ``str`` is the parts joined)."""
    mailbox = str.__new__(Address, f"{local_part}@{domain}")
    mailbox._local_part = local_part
    mailbox._domain = domain
    return mailbox


def parse_path(
    text: str,
    *,
    allow_null: bool = False,
    allow_utf8: bool = False,
    allow_postmaster: bool = False,
) -> tuple[Address, str]:
    """Read the reverse- or forward-path at the start of ``text`` (RFC 5321 4.1.2).

    ``text`` is what follows ``FROM:`` or ``TO:`` and the spaces after it. Returns the address
    and the rest of ``text`` after the path, leading spaces stripped (the ESMTP parameters).

    Accepted: ``<mailbox>``; ``<@a.example,@b.example:mailbox>`` (the source route is ignored, RFC
    5321 Appendix C); ``<>`` when ``allow_null``; ``<Postmaster>`` in any case when
    ``allow_postmaster`` (RFC 5321 4.1.1.3); and, like Postfix, a mailbox without angle brackets
    that ends at a space or at the end of ``text``. Non-ASCII in the mailbox only when
    ``allow_utf8`` (RFC 6531 3.3), else
    [`NonAsciiAddressError`][alephsmtp.addresses.NonAsciiAddressError]. Any other fault, including
    the size limits of RFC 5321 4.5.3.1, raises [`AddressError`][alephsmtp.addresses.AddressError].
    """
    simple = _SIMPLE_PATH_RE.match(text)
    if simple is not None:
        local_part, domain = simple.group(1, 2)
        # RFC 5321 4.5.3.1: the local part, and the whole path with "<", "@" and ">".
        if len(local_part) <= MAX_LOCAL_PART and len(local_part) + len(domain) + 3 <= MAX_PATH:
            return simple_address(local_part, domain), text[simple.end() :]
    return _parse_path_general(
        text, allow_null=allow_null, allow_utf8=allow_utf8, allow_postmaster=allow_postmaster
    )


def _parse_path_general(
    text: str, *, allow_null: bool, allow_utf8: bool, allow_postmaster: bool
) -> tuple[Address, str]:
    """Every form of path; [`parse_path()`][alephsmtp.addresses.parse_path] tries the common one
    first."""
    bracketed = text.startswith("<")
    pos = 1 if bracketed else 0
    if bracketed and text.startswith(">", 1):
        if not allow_null:
            raise AddressError(reason="null path not allowed")
        return _end_of_path(text, 2, NULL_PATH)
    if allow_postmaster:
        address = _postmaster(text, pos, bracketed)
        if address is not None:
            return address
    if bracketed and text.startswith("@", 1):
        match = _ADL_RE.match(text, 1)
        if match is None:
            raise AddressError(reason="bad source route")
        pos = match.end()

    match = _LOCAL_PART_RE.match(text, pos)
    if match is None:
        raise AddressError(reason="bad local part" if text else "empty path")
    raw_local_part = match.group()
    pos = match.end()
    if not text.startswith("@", pos):
        # Only Postmaster may come without a domain (RFC 5321 4.1.1.3), handled above.
        no_domain = pos == len(text) or text[pos] == ">" or (text[pos] == " " and not bracketed)
        raise AddressError(reason="no domain" if no_domain else "bad local part")
    pos += 1
    if text.startswith("[", pos):
        match = _LITERAL_RE.match(text, pos)
        if match is None or not _valid_literal(match.group()):
            raise AddressError(reason="bad address literal")
    else:
        match = _DOMAIN_RE.match(text, pos)
        if match is None:
            raise AddressError(reason="bad domain")
    domain = match.group()
    pos = match.end()
    if bracketed:
        if not text.startswith(">", pos):
            unclosed = ">" not in text[pos:]
            raise AddressError(reason="missing '>'" if unclosed else "bad domain")
        pos += 1
    elif pos < len(text) and text[pos] != " ":
        raise AddressError(reason="missing '<'" if text[pos] == ">" else "bad domain")

    # RFC 5321 4.5.3.1: limits in octets; a path without brackets counts as if it had them.
    if _octets(raw_local_part) > MAX_LOCAL_PART:
        raise AddressError(reason="local part too long")
    if _octets(domain) > MAX_DOMAIN:
        raise AddressError(reason="domain too long")
    if _octets(text[:pos]) + (0 if bracketed else 2) > MAX_PATH:
        raise AddressError(reason="path too long")
    if not text[:pos].isascii():
        if not _valid_u_labels(domain):
            raise AddressError(reason="bad domain")
        if not allow_utf8:
            raise NonAsciiAddressError(reason="non-ASCII address")

    if raw_local_part.startswith('"'):
        local_part = _QUOTED_PAIR_RE.sub(r"\1", raw_local_part[1:-1])
    else:
        local_part = raw_local_part
    return _end_of_path(text, pos, Address(local_part, domain))


def _postmaster(text: str, pos: int, bracketed: bool) -> tuple[Address, str] | None:
    # RFC 5321 4.1.1.3: "<Postmaster>" without a domain, case-insensitively.
    end = pos + len(_POSTMASTER)
    word = text[pos:end]
    if not (word.isascii() and word.lower() == _POSTMASTER):
        return None
    if bracketed:
        if not text.startswith(">", end):
            return None
        end += 1
    elif end < len(text) and text[end] != " ":
        return None
    return _end_of_path(text, end, Address(word, ""))


def _end_of_path(text: str, end: int, address: Address) -> tuple[Address, str]:
    # RFC 5321 4.1.2: parameters are separated from the path by SP; anything else is garbage.
    rest = text[end:]
    if rest and not rest.startswith(" "):
        raise AddressError(reason="text after the path")
    return address, rest.lstrip(" ")


def parse_parameters(text: str) -> dict[str, str | None]:
    """Read ESMTP parameters (RFC 5321 4.1.2): ``KEY[=value]`` separated by spaces.

    Keywords are uppercased and kept in order; a keyword without ``=`` maps to ``None``. A bad
    keyword or value, an empty value after ``=``, or a keyword given twice raises
    [`ParameterError`][alephsmtp.addresses.ParameterError] (``501 5.5.4``).
    """
    parameters: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue  # several spaces between parameters: tolerated
        match = _PARAMETER_RE.match(word)
        if match is None:
            raise ParameterError()
        keyword = match.group(1).upper()  # ASCII only: the pattern allows nothing else
        value = match.group(2)
        if value == "":
            raise ParameterError(f"Empty value for parameter {keyword}")
        if keyword in parameters:
            raise ParameterError(f"Duplicate parameter {keyword}")
        parameters[keyword] = value
    return parameters


_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


def decode_xtext(value: str) -> str:
    """Decode RFC 3461 4 xtext (``ENVID``, ``ORCPT``, ``AUTH=``): ``+XX`` is a hex octet.

    Raises [`ParameterError`][alephsmtp.addresses.ParameterError] (501 5.5.4) for text that is not
    xtext.
    """
    if not _XTEXT_RE.match(value):
        raise ParameterError("Bad xtext value")
    if "+" not in value:
        return value
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
