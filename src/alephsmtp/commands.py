"""One typed class per SMTP verb, built from a command line by
[`parse_command()`][alephsmtp.commands.parse_command].

Every command is a frozen dataclass with ``verb`` (uppercased) and ``parameter`` (the raw argument
text); each verb's class adds what its argument means (``MailCommand.return_path``,
``RcptCommand.recipient_address``, ...). A verb this module does not know comes back as a plain
[`SmtpCommand`][alephsmtp.commands.SmtpCommand]. An argument that breaks its command's syntax raises
[`CommandSyntaxError`][alephsmtp.errors.CommandSyntaxError] (or a subclass) carrying the reply,
before any handler sees the command.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .addresses import (
    Address,
    AddressError,
    NonAsciiAddressError,
    ParameterError,
    decode_xtext,
    parse_parameters,
    parse_path,
)
from .errors import CommandSyntaxError
from .parser import scan_path, split_command

__all__ = [
    "AuthCommand",
    "BdatCommand",
    "DataCommand",
    "EhloCommand",
    "ExpnCommand",
    "HeloCommand",
    "HelpCommand",
    "LhloCommand",
    "MailCommand",
    "NoopCommand",
    "QuitCommand",
    "RcptCommand",
    "RsetCommand",
    "SmtpCommand",
    "StarttlsCommand",
    "VrfyCommand",
    "XclientCommand",
    "XforwardCommand",
    "parse_argument",
    "parse_command",
    "parse_mail",
    "parse_rcpt",
    "xclient_address",
]

Parameters = Mapping[str, str | None]

_NO_PARAMETERS: Parameters = MappingProxyType({})
_NO_EXTENSIONS: Mapping[str, Any] = MappingProxyType({})

# RFC 1870 section 3: size-value = 1*20DIGIT. RFC 3030 sets no bound on chunk-size; the same
# one keeps int() far from its digit limit.
_MAX_SIZE_DIGITS = 20
# RFC 4422 3.1: sasl-mech = 1*20(UPPER-ALPHA / DIGIT / "-" / "_"), matched case-insensitively.
_MECHANISM_RE = re.compile(r"[A-Za-z0-9_\-]{1,20}\Z")
# RFC 4954 4: the initial response is base64 (RFC 4648 4, padded), or "=" for an empty one.
_BASE64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


def _no_parameters() -> Parameters:
    return _NO_PARAMETERS


def _no_attributes() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SmtpCommand:
    """A command line: ``verb``, ASCII-uppercased, and ``parameter``, the argument text.

    Parsed commands of unknown verbs are plain ``SmtpCommand`` instances (invalid UTF-8 kept
    as surrogate escapes); each known verb has its own subclass, whose ``verb`` is fixed.
    ``parameter`` is the raw argument (spaces around it removed), also in the subclasses.
    """

    verb: str
    parameter: str = field(default="", kw_only=True)


@dataclass(frozen=True, slots=True)
class HeloCommand(SmtpCommand):
    """``HELO domain`` (RFC 5321 4.1.1.1)."""

    verb: str = field(default="HELO", init=False)
    client_hostname: str


@dataclass(frozen=True, slots=True)
class EhloCommand(SmtpCommand):
    """``EHLO domain`` (RFC 5321 4.1.1.1)."""

    verb: str = field(default="EHLO", init=False)
    client_hostname: str


@dataclass(frozen=True, slots=True)
class LhloCommand(SmtpCommand):
    """``LHLO domain``: LMTP's EHLO (RFC 2033 4.1)."""

    verb: str = field(default="LHLO", init=False)
    client_hostname: str


@dataclass(frozen=True, slots=True)
class MailCommand(SmtpCommand):
    """``MAIL FROM:<reverse-path> [parameters]`` (RFC 5321 4.1.1.2).

    ``return_path`` is `Address.NULL <alephsmtp.addresses.Address.NULL>` for ``<>``;
    ``parameters`` maps each uppercased ESMTP keyword to its value (``None`` without ``=``).
    The parameters the library serves are decoded once, when the command is made, into the
    typed fields below; a value that does not decode leaves its field ``None`` and its
    keyword in ``malformed`` (the session answers 501 when that extension is on).
    """

    verb: str = field(default="MAIL", init=False)
    return_path: Address
    parameters: Parameters = field(default_factory=_no_parameters, hash=False)
    #: ``SIZE=`` (RFC 1870), the declared message size.
    size: int | None = field(default=None, init=False, compare=False)
    #: ``BODY=`` uppercased (RFC 6152: ``7BIT`` or ``8BITMIME``; RFC 3030: ``BINARYMIME``).
    body: str | None = field(default=None, init=False, compare=False)
    #: The ``SMTPUTF8`` keyword was given (RFC 6531 3.4).
    smtputf8: bool = field(default=False, init=False, compare=False)
    #: DSN ``RET=`` uppercased (RFC 3461 4.3: ``FULL`` or ``HDRS``).
    ret: str | None = field(default=None, init=False, compare=False)
    #: DSN ``ENVID=`` decoded from xtext (RFC 3461 4.4).
    envid: str | None = field(default=None, init=False, compare=False)
    #: ``AUTH=`` decoded from xtext (RFC 4954 5): the submitter; ``"<>"`` for unknown.
    auth: str | None = field(default=None, init=False, compare=False)
    #: Keywords given with a value that does not decode (ENVID, AUTH: not xtext).
    malformed: frozenset[str] = field(default=frozenset(), init=False, compare=False)
    #: The typed values of parameters of registered extensions (``Extension``).
    extensions: Mapping[str, Any] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", _NO_EXTENSIONS)
        parameters = self.parameters
        if not parameters:
            return
        bad: set[str] = set()
        size = parameters.get("SIZE")
        if size is not None:
            object.__setattr__(self, "size", int(size))  # checked to be digits by the parser
        for keyword, name, decode in _MAIL_DECODED:
            if keyword in parameters:
                value = parameters[keyword]
                try:
                    object.__setattr__(self, name, None if value is None else decode(value))
                except ParameterError:
                    bad.add(keyword)
        object.__setattr__(self, "smtputf8", "SMTPUTF8" in parameters)
        if bad:
            object.__setattr__(self, "malformed", frozenset(bad))


@dataclass(frozen=True, slots=True)
class RcptCommand(SmtpCommand):
    """``RCPT TO:<forward-path> [parameters]`` (RFC 5321 4.1.1.3).

    ``recipient_address`` may be ``Postmaster`` with no domain (its ``domain`` is ``""``).
    The DSN parameters are decoded once, into the typed fields below (a value that does not
    decode: its field ``None``, its keyword in ``malformed``).
    """

    verb: str = field(default="RCPT", init=False)
    recipient_address: Address
    parameters: Parameters = field(default_factory=_no_parameters, hash=False)
    #: DSN ``NOTIFY=`` as uppercased keywords (RFC 3461 4.1).
    notify: tuple[str, ...] | None = field(default=None, init=False, compare=False)
    #: DSN ``ORCPT=`` as (address type, decoded address) (RFC 3461 4.2).
    orcpt: tuple[str, str] | None = field(default=None, init=False, compare=False)
    malformed: frozenset[str] = field(default=frozenset(), init=False, compare=False)
    #: The typed values of parameters of registered extensions (``Extension``).
    extensions: Mapping[str, Any] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", _NO_EXTENSIONS)
        parameters = self.parameters
        if not parameters:
            return
        notify = parameters.get("NOTIFY")
        if notify is not None:
            object.__setattr__(self, "notify", tuple(_ascii_upper(notify).split(",")))
        if "ORCPT" in parameters:
            value = parameters["ORCPT"]
            address_type, _, address = (value or "").partition(";")
            try:
                decoded = decode_xtext(address)
            except ParameterError:
                object.__setattr__(self, "malformed", frozenset({"ORCPT"}))
            else:
                object.__setattr__(self, "orcpt", (address_type, decoded))


@dataclass(frozen=True, slots=True)
class DataCommand(SmtpCommand):
    """``DATA`` (RFC 5321 4.1.1.4): no argument."""

    verb: str = field(default="DATA", init=False)


@dataclass(frozen=True, slots=True)
class RsetCommand(SmtpCommand):
    """``RSET`` (RFC 5321 4.1.1.5): no argument."""

    verb: str = field(default="RSET", init=False)


@dataclass(frozen=True, slots=True)
class VrfyCommand(SmtpCommand):
    """``VRFY string`` (RFC 5321 4.1.1.6)."""

    verb: str = field(default="VRFY", init=False)
    string: str


@dataclass(frozen=True, slots=True)
class ExpnCommand(SmtpCommand):
    """``EXPN string`` (RFC 5321 4.1.1.7)."""

    verb: str = field(default="EXPN", init=False)
    string: str


@dataclass(frozen=True, slots=True)
class HelpCommand(SmtpCommand):
    """``HELP [topic]`` (RFC 5321 4.1.1.8); ``topic`` is ``""`` when none was given."""

    verb: str = field(default="HELP", init=False)
    topic: str = ""


@dataclass(frozen=True, slots=True)
class NoopCommand(SmtpCommand):
    """``NOOP [string]`` (RFC 5321 4.1.1.9: a string argument is allowed and ignored)."""

    verb: str = field(default="NOOP", init=False)
    text: str = ""


@dataclass(frozen=True, slots=True)
class QuitCommand(SmtpCommand):
    """``QUIT`` (RFC 5321 4.1.1.10): no argument."""

    verb: str = field(default="QUIT", init=False)


@dataclass(frozen=True, slots=True)
class StarttlsCommand(SmtpCommand):
    """``STARTTLS`` (RFC 3207 4): no argument."""

    verb: str = field(default="STARTTLS", init=False)


@dataclass(frozen=True, slots=True)
class XclientCommand(SmtpCommand):
    """``XCLIENT attribute=value ...`` (Postfix's XCLIENT_README): a trusted proxy names the
    client it speaks for. ``attributes`` maps each uppercased name (NAME, ADDR, PORT, PROTO,
    HELO, LOGIN, DESTADDR, DESTPORT, REVERSE_NAME) to its value, xtext-decoded;
    ``[UNAVAILABLE]`` and ``[TEMPUNAVAIL]`` come as given."""

    verb: str = field(default="XCLIENT", init=False)
    attributes: Mapping[str, str] = field(default_factory=_no_attributes, hash=False)


@dataclass(frozen=True, slots=True)
class XforwardCommand(SmtpCommand):
    """``XFORWARD attribute=value ...`` (Postfix's XFORWARD_README): a trusted MTA forwards
    what it knew of the original client for the next transaction. ``attributes``: NAME, ADDR,
    PORT, PROTO, HELO, IDENT, SOURCE, xtext-decoded."""

    verb: str = field(default="XFORWARD", init=False)
    attributes: Mapping[str, str] = field(default_factory=_no_attributes, hash=False)


@dataclass(frozen=True, slots=True)
class AuthCommand(SmtpCommand):
    """``AUTH mechanism [initial-response]`` (RFC 4954 4).

    ``mechanism`` is uppercased; ``initial_response`` is the base64 text as sent, ``""`` for
    ``=`` (an empty response) and ``None`` when there was none.
    """

    verb: str = field(default="AUTH", init=False)
    mechanism: str
    initial_response: str | None = None


@dataclass(frozen=True, slots=True)
class BdatCommand(SmtpCommand):
    """``BDAT chunk-size [LAST]`` (RFC 3030 2)."""

    verb: str = field(default="BDAT", init=False)
    size: int
    last: bool = False


# --- parsing -------------------------------------------------------------------------------

_Parser = Callable[[str, bool], SmtpCommand]

# MAIL parameters decoded into fields: (keyword, field, decoder).
_MAIL_DECODED: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("BODY", "body", lambda value: _ascii_upper(value)),
    ("RET", "ret", lambda value: _ascii_upper(value)),
    ("ENVID", "envid", lambda value: decode_xtext(value)),
    ("AUTH", "auth", lambda value: decode_xtext(value)),
)


def _ascii_upper(text: str) -> str:
    # Only ASCII letters change case in SMTP keywords; str.upper() would also turn "ß" into
    # "SS" and change lengths.
    return text.upper() if text.isascii() else text.encode("utf-8").upper().decode("utf-8")


def _words(argument: str) -> list[str]:
    # Words separated by one or more spaces (RFC 5321 4.1.1 wants one; more are tolerated).
    return [word for word in argument.split(" ") if word]


def _after_keyword(argument: str, keyword: str) -> str | None:
    # "FROM:" / "TO:" in any case (RFC 5321 2.4), then the path. Spaces after the colon break
    # RFC 5321 4.1.2 but are common enough to accept.
    head = argument[: len(keyword)]
    if head.isascii() and head.upper() == keyword:
        return argument[len(keyword) :].lstrip(" ")
    return None


def _syntax(text: str) -> CommandSyntaxError:
    return CommandSyntaxError(f"Syntax: {text}", code=501, enhanced="5.5.4")


def _hello(command: type[HeloCommand | EhloCommand | LhloCommand], verb: str) -> _Parser:
    def parse(argument: str, smtputf8: bool) -> SmtpCommand:
        if not argument:
            raise _syntax(f"{verb} hostname")
        # Like Postfix, only the first word counts; some clients send more.
        hostname = argument.partition(" ")[0]
        if not hostname.isprintable():
            # A control character (NUL, ESC, a bare CR taken as content...) has no place in a
            # name that is written into trace headers and handed to milters.
            raise _syntax(f"{verb} hostname")
        return command(hostname, parameter=argument)

    return parse


def _without_argument(command: SmtpCommand) -> _Parser:
    # The command has no fields besides its verb: one frozen instance serves every time.
    def parse(argument: str, smtputf8: bool) -> SmtpCommand:
        if argument:
            raise _syntax(command.verb)
        return command

    return parse


def _with_argument(
    command: type[VrfyCommand | ExpnCommand | HelpCommand | NoopCommand], syntax: str | None
) -> _Parser:
    # syntax is None when the argument is optional.
    def parse(argument: str, smtputf8: bool) -> SmtpCommand:
        if not argument and syntax is not None:
            raise _syntax(syntax)
        return command(argument, parameter=argument)

    return parse


def _parse_mail(argument: str, smtputf8: bool) -> SmtpCommand:
    path = _after_keyword(argument, "FROM:")
    if path is None:
        raise _syntax("MAIL FROM:<address>")
    try:
        # UTF-8 is accepted here and refused below unless this very command says SMTPUTF8.
        return_path, rest = parse_path(path, allow_null=True, allow_utf8=True)
    except AddressError as error:
        raise AddressError(
            "Bad sender address syntax", code=501, enhanced="5.1.7", reason=error.reason
        ) from None
    if not rest:
        if not return_path.isascii():
            raise NonAsciiAddressError(
                "Non-ASCII sender address requires SMTPUTF8", reason="non-ASCII address"
            )
        return MailCommand(return_path, parameter=argument)
    return _mail_with_parameters(return_path, rest, argument)


def _mail_with_parameters(return_path: Address, rest: str, argument: str) -> MailCommand:
    parameters = parse_parameters(rest)
    if "SIZE" in parameters:
        size = parameters["SIZE"]
        # RFC 1870 3: size-value = 1*20DIGIT.
        if not (size and size.isascii() and size.isdigit() and len(size) <= _MAX_SIZE_DIGITS):
            raise ParameterError("Bad SIZE parameter value")
    if not return_path.isascii() and "SMTPUTF8" not in parameters:
        # RFC 6531 3.5: a non-ASCII path without SMTPUTF8 gets 553 5.6.7.
        raise NonAsciiAddressError(
            "Non-ASCII sender address requires SMTPUTF8", reason="non-ASCII address"
        )
    return MailCommand(return_path, _frozen(parameters), parameter=argument)


def _parse_rcpt(argument: str, smtputf8: bool) -> SmtpCommand:
    path = _after_keyword(argument, "TO:")
    if path is None:
        raise _syntax("RCPT TO:<address>")
    try:
        recipient, rest = parse_path(path, allow_utf8=smtputf8, allow_postmaster=True)
    except NonAsciiAddressError as error:
        # RFC 6531 3.5: only a transaction begun with MAIL ... SMTPUTF8 may name one.
        raise NonAsciiAddressError(
            "Non-ASCII recipient address requires SMTPUTF8", reason=error.reason
        ) from None
    except AddressError as error:
        raise AddressError(
            "Bad recipient address syntax", code=501, enhanced="5.1.3", reason=error.reason
        ) from None
    if not rest:
        return RcptCommand(recipient, parameter=argument)
    return RcptCommand(recipient, _frozen(parse_parameters(rest)), parameter=argument)


# The session's way in for MAIL and RCPT: the common ``FROM:<local@domain>`` form is read by
# the parsing core in one call (scan_path: a tuple exactly when parse_path's simple form takes
# it, with the same parts); everything else, and every error, by parse_argument.


def parse_mail(argument: bytes) -> MailCommand:
    """MAIL's argument, as `split_command()` gives it; the errors of
    [`parse_command()`][alephsmtp.commands.parse_command]."""
    fast = _scanned(argument, b"FROM:")
    if fast is not None:
        return_path, rest, text = fast
        if not rest:
            return MailCommand(return_path, _NO_PARAMETERS, parameter=text)
        return _mail_with_parameters(return_path, rest, text)
    return parse_argument(b"MAIL", argument)  # type: ignore[return-value]


def parse_rcpt(argument: bytes, smtputf8: bool) -> RcptCommand:
    """RCPT's argument, as `split_command()` gives it, in a transaction begun with SMTPUTF8 or
    not; the errors of [`parse_command()`][alephsmtp.commands.parse_command]."""
    fast = _scanned(argument, b"TO:")
    if fast is not None:
        recipient, rest, text = fast
        parameters = _frozen(parse_parameters(rest)) if rest else _NO_PARAMETERS
        return RcptCommand(recipient, parameters, parameter=text)
    return parse_argument(b"RCPT", argument, smtputf8=smtputf8)  # type: ignore[return-value]


def _scanned(argument: bytes, keyword: bytes) -> tuple[Address, str, str] | None:
    """The path, the parameters' text and the whole argument's, when the core's scan_path
    takes the argument and it is UTF-8; else None (parse_argument reads it, and says why)."""
    scanned = scan_path(argument, keyword)
    if scanned is None:
        return None
    local_part, domain, rest = scanned
    # simple_address(), inline: this is every MAIL's and RCPT's way in.
    address = str.__new__(Address, f"{local_part}@{domain}")
    address._local_part = local_part
    address._domain = domain
    if not rest:
        return address, "", argument.decode("ascii")  # all ASCII: the core checked
    try:
        return address, rest.decode("utf-8"), argument.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _frozen(parameters: dict[str, str | None]) -> Parameters:
    return MappingProxyType(parameters) if parameters else _NO_PARAMETERS


def _parse_auth(argument: str, smtputf8: bool) -> SmtpCommand:
    words = _words(argument)
    if not 1 <= len(words) <= 2 or not _MECHANISM_RE.match(words[0]):
        raise _syntax("AUTH mechanism [initial-response]")
    initial_response: str | None = None
    if len(words) == 2:
        initial_response = words[1]
        if initial_response == "=":
            initial_response = ""
        elif not _BASE64_RE.match(initial_response):
            # RFC 4954 4: "501 5.5.2" for a response that is not base64.
            raise CommandSyntaxError(
                "Cannot decode initial response as base64", code=501, enhanced="5.5.2"
            )
    return AuthCommand(words[0].upper(), initial_response, parameter=argument)


# In the order Postfix lists them in EHLO.
XCLIENT_ATTRIBUTES = (
    "NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT", "REVERSE_NAME"
)  # fmt: skip
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


def _attributes(argument: str, verb: str, names: tuple[str, ...]) -> dict[str, str]:
    """``name=value`` words, values in xtext (Postfix's XCLIENT/XFORWARD); 501 otherwise."""
    attributes: dict[str, str] = {}
    words = _words(argument)
    if not words:
        raise _syntax(f"{verb} attribute=value ...")
    for word in words:
        name, equals, value = word.partition("=")
        name = name.upper() if name.isascii() else name
        if not equals or name not in names:
            raise CommandSyntaxError(
                f"Bad {verb} attribute name: {name[:40]}", code=501, enhanced="5.5.4"
            )
        try:
            value = decode_xtext(value)
        except ParameterError:
            value = ""
        if not _attribute_valid(name, value):
            raise CommandSyntaxError(
                f"Bad {verb} attribute value for {name}", code=501, enhanced="5.5.4"
            )
        attributes[name] = value
    return attributes


UNAVAILABLE_VALUES = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})


def _attribute_valid(name: str, value: str) -> bool:
    """Postfix's checks: addresses are IP addresses (IPv6 with its ``IPV6:`` prefix allowed),
    ports numbers, PROTO SMTP or ESMTP, SOURCE LOCAL or REMOTE; any may be unavailable."""
    if value in UNAVAILABLE_VALUES:
        return True
    if not value.isprintable() or not value:
        return False
    if name in ("ADDR", "DESTADDR"):
        return xclient_address(value) is not None
    if name in ("PORT", "DESTPORT"):
        return value.isascii() and value.isdigit() and int(value) <= 65535
    if name == "PROTO":
        return value.upper() in ("SMTP", "ESMTP")
    if name == "SOURCE":
        return value.upper() in ("LOCAL", "REMOTE")
    return True


def xclient_address(value: str) -> str | None:
    """An XCLIENT/XFORWARD ADDR value as an IP address (``IPV6:`` prefix dropped), or None."""
    if value[:5].upper() == "IPV6:":
        value = value[5:]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _parse_xclient(argument: str, smtputf8: bool) -> SmtpCommand:
    attributes = _attributes(argument, "XCLIENT", XCLIENT_ATTRIBUTES)
    return XclientCommand(attributes=MappingProxyType(attributes), parameter=argument)


def _parse_xforward(argument: str, smtputf8: bool) -> SmtpCommand:
    attributes = _attributes(argument, "XFORWARD", XFORWARD_ATTRIBUTES)
    return XforwardCommand(attributes=MappingProxyType(attributes), parameter=argument)


def _parse_bdat(argument: str, smtputf8: bool) -> SmtpCommand:
    words = _words(argument)
    if (
        not 1 <= len(words) <= 2
        or not (words[0].isascii() and words[0].isdigit())
        or len(words[0]) > _MAX_SIZE_DIGITS
    ):
        raise _syntax("BDAT chunk-size [LAST]")
    last = len(words) == 2
    if last and _ascii_upper(words[1]) != "LAST":
        raise _syntax("BDAT chunk-size [LAST]")
    return BdatCommand(int(words[0]), last, parameter=argument)


# The verbs this module knows, by their uppercased bytes: a dict, not reflection.
_PARSERS: dict[bytes, _Parser] = {
    b"HELO": _hello(HeloCommand, "HELO"),
    b"EHLO": _hello(EhloCommand, "EHLO"),
    b"LHLO": _hello(LhloCommand, "LHLO"),
    b"MAIL": _parse_mail,
    b"RCPT": _parse_rcpt,
    b"DATA": _without_argument(DataCommand()),
    b"RSET": _without_argument(RsetCommand()),
    b"QUIT": _without_argument(QuitCommand()),
    b"STARTTLS": _without_argument(StarttlsCommand()),
    b"NOOP": _with_argument(NoopCommand, None),
    b"HELP": _with_argument(HelpCommand, None),
    b"VRFY": _with_argument(VrfyCommand, "VRFY address"),
    b"EXPN": _with_argument(ExpnCommand, "EXPN mailing-list"),
    b"AUTH": _parse_auth,
    b"BDAT": _parse_bdat,
    b"XCLIENT": _parse_xclient,
    b"XFORWARD": _parse_xforward,
}


def parse_command(line: bytes, *, smtputf8: bool = False) -> SmtpCommand:
    """The command in ``line``, one command line without its CRLF (RFC 5321 4.1.1).

    The verb is what comes before the first space, ASCII-uppercased; the argument is the
    rest without surrounding spaces (the parsing core's ``split_command``). ``smtputf8`` says
    the transaction was begun with ``MAIL FROM:... SMTPUTF8`` (RFC 6531), which lets RCPT name
    non-ASCII addresses.

    Raises [`CommandSyntaxError`][alephsmtp.errors.CommandSyntaxError] (or a subclass) with the
    reply: ``500 5.5.2`` for an empty line, a line that starts with a space, or a known verb whose
    line is not UTF-8; ``501`` for a bad argument; ``553 5.6.7`` for a non-ASCII address outside
    SMTPUTF8.
    """
    # RFC 5321 4.1.1: a command line starts with its verb. One that starts with a space is a
    # syntax error: taken as a verb, it would get past the line reader's stop rule for DATA
    # and BDAT, and what follows would be read differently by how it was split.
    if line[:1] in (b"", b" "):
        raise CommandSyntaxError("Error: bad syntax", code=500, enhanced="5.5.2")
    verb, argument = split_command(line)
    return parse_argument(verb, argument, smtputf8=smtputf8)


def parse_argument(verb: bytes, argument: bytes, *, smtputf8: bool = False) -> SmtpCommand:
    """The command of ``verb`` (uppercased, as ``split_command`` gives it) with ``argument``
    (spaces around it removed); the errors of
    [`parse_command()`][alephsmtp.commands.parse_command]."""
    parse = _PARSERS.get(verb)
    if parse is None:
        return SmtpCommand(
            verb.decode("utf-8", "surrogateescape"),
            parameter=argument.decode("utf-8", "surrogateescape"),
        )
    try:
        text = argument.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError(
            "Error: command is not valid UTF-8", code=500, enhanced="5.5.2"
        ) from None
    return parse(text, smtputf8)
