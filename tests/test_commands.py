"""Command lines to typed commands, and the replies bad ones earn: alephsmtp.commands."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest

from alephsmtp.addresses import (
    NULL_PATH,
    Address,
    AddressError,
    NonAsciiAddressError,
    ParameterError,
)
from alephsmtp.commands import (
    AuthCommand,
    BdatCommand,
    DataCommand,
    EhloCommand,
    ExpnCommand,
    HeloCommand,
    HelpCommand,
    LhloCommand,
    MailCommand,
    NoopCommand,
    QuitCommand,
    RcptCommand,
    RsetCommand,
    SmtpCommand,
    StarttlsCommand,
    VrfyCommand,
    parse_argument,
    parse_command,
    parse_mail,
    parse_rcpt,
)
from alephsmtp.errors import CommandSyntaxError

A = Address("user", "example.org")

# --- accepted commands -------------------------------------------------------------------------

PARSED: list[tuple[bytes, SmtpCommand]] = [
    # HELO / EHLO / LHLO: the first word is the hostname (Postfix tolerates more)
    (b"HELO mx.example.org", HeloCommand("mx.example.org", parameter="mx.example.org")),
    (b"helo mx.example.org", HeloCommand("mx.example.org", parameter="mx.example.org")),
    (b"EHLO mx.example.org", EhloCommand("mx.example.org", parameter="mx.example.org")),
    (b"ehlo [192.0.2.1]", EhloCommand("[192.0.2.1]", parameter="[192.0.2.1]")),
    (b"EhLo  mx  extra words ", EhloCommand("mx", parameter="mx  extra words")),
    (b"LHLO client.example", LhloCommand("client.example", parameter="client.example")),
    (b"EHLO h\xc3\xa9llo", EhloCommand("héllo", parameter="héllo")),
    # MAIL
    (b"MAIL FROM:<user@example.org>", MailCommand(A, parameter="FROM:<user@example.org>")),
    (b"mail from:<user@example.org>", MailCommand(A, parameter="from:<user@example.org>")),
    (b"MAIL From:<user@example.org>", MailCommand(A, parameter="From:<user@example.org>")),
    (b"MAIL FROM: <user@example.org>", MailCommand(A, parameter="FROM: <user@example.org>")),
    (b"MAIL FROM:   <user@example.org>  ", MailCommand(A, parameter="FROM:   <user@example.org>")),
    (b"MAIL FROM:user@example.org", MailCommand(A, parameter="FROM:user@example.org")),
    (b"MAIL FROM:<>", MailCommand(NULL_PATH, parameter="FROM:<>")),
    (
        b"MAIL FROM:<> SIZE=1000 BODY=8bitmime",
        MailCommand(
            NULL_PATH,
            {"SIZE": "1000", "BODY": "8bitmime"},
            parameter="FROM:<> SIZE=1000 BODY=8bitmime",
        ),
    ),
    (
        b"MAIL FROM:<@relay.example:user@example.org>",
        MailCommand(A, parameter="FROM:<@relay.example:user@example.org>"),
    ),
    (
        "MAIL FROM:<jörg@exämple.org> SMTPUTF8".encode(),
        MailCommand(
            Address("jörg", "exämple.org"),
            {"SMTPUTF8": None},
            parameter="FROM:<jörg@exämple.org> SMTPUTF8",
        ),
    ),
    (
        "MAIL FROM:<jörg@exämple.org> smtputf8".encode(),
        MailCommand(
            Address("jörg", "exämple.org"),
            {"SMTPUTF8": None},
            parameter="FROM:<jörg@exämple.org> smtputf8",
        ),
    ),
    # RCPT
    (b"RCPT TO:<user@example.org>", RcptCommand(A, parameter="TO:<user@example.org>")),
    (b"rcpt to:<user@example.org>", RcptCommand(A, parameter="to:<user@example.org>")),
    (b"RCPT TO: <user@example.org>", RcptCommand(A, parameter="TO: <user@example.org>")),
    (b"RCPT TO:user@example.org", RcptCommand(A, parameter="TO:user@example.org")),
    (
        b"RCPT TO:<Postmaster>",
        RcptCommand(Address("Postmaster", ""), parameter="TO:<Postmaster>"),
    ),
    (
        b"RCPT TO:<postMASTER> NOTIFY=NEVER",
        RcptCommand(
            Address("postMASTER", ""), {"NOTIFY": "NEVER"}, parameter="TO:<postMASTER> NOTIFY=NEVER"
        ),
    ),
    (
        b'RCPT TO:<"John Doe"@example.org>',
        RcptCommand(Address("John Doe", "example.org"), parameter='TO:<"John Doe"@example.org>'),
    ),
    # commands without an argument
    (b"DATA", DataCommand()),
    (b"data", DataCommand()),
    (b"DATA   ", DataCommand()),
    (b"RSET", RsetCommand()),
    (b"QUIT", QuitCommand()),
    (b"quit", QuitCommand()),
    (b"STARTTLS", StarttlsCommand()),
    (b"StartTLS", StarttlsCommand()),
    # optional argument
    (b"NOOP", NoopCommand()),
    (b"NOOP hello  there", NoopCommand("hello  there", parameter="hello  there")),
    (b"HELP", HelpCommand()),
    (b"help MAIL", HelpCommand("MAIL", parameter="MAIL")),
    # required argument
    (b"VRFY user", VrfyCommand("user", parameter="user")),
    (b"vrfy <user@example.org>", VrfyCommand("<user@example.org>", parameter="<user@example.org>")),
    (b"EXPN staff list", ExpnCommand("staff list", parameter="staff list")),
    # AUTH (RFC 4954)
    (b"AUTH PLAIN", AuthCommand("PLAIN", parameter="PLAIN")),
    (b"auth plain", AuthCommand("PLAIN", parameter="plain")),
    (b"AUTH PLAIN =", AuthCommand("PLAIN", "", parameter="PLAIN =")),
    (
        b"AUTH PLAIN AHVzZXIAcGFzcw==",
        AuthCommand("PLAIN", "AHVzZXIAcGFzcw==", parameter="PLAIN AHVzZXIAcGFzcw=="),
    ),
    (b"AUTH LOGIN dXNlcg==", AuthCommand("LOGIN", "dXNlcg==", parameter="LOGIN dXNlcg==")),
    (b"AUTH X-OAUTH_2 abc=", AuthCommand("X-OAUTH_2", "abc=", parameter="X-OAUTH_2 abc=")),
    (b"AUTH CRAM-MD5", AuthCommand("CRAM-MD5", parameter="CRAM-MD5")),
    # BDAT (RFC 3030)
    (b"BDAT 1000", BdatCommand(1000, parameter="1000")),
    (b"BDAT 0 LAST", BdatCommand(0, True, parameter="0 LAST")),
    (b"bdat 512 last", BdatCommand(512, True, parameter="512 last")),
    (b"BDAT 512  Last", BdatCommand(512, True, parameter="512  Last")),
    # unknown verbs: a plain SmtpCommand, verb uppercased
    (b"XYZZY", SmtpCommand("XYZZY")),
    (b"frob ADDR=192.0.2.1", SmtpCommand("FROB", parameter="ADDR=192.0.2.1")),
    (b"MAIL:FROM:<a@b>", SmtpCommand("MAIL:FROM:<A@B>")),
    (b"MAILFROM:<a@b>", SmtpCommand("MAILFROM:<A@B>")),
    (b"HELO\tmx", SmtpCommand("HELO\tMX")),
    (b"\xff\xfe arg\xff", SmtpCommand("\udcff\udcfe", parameter="arg\udcff")),
    ("ñoop text".encode(), SmtpCommand("ñOOP", parameter="text")),
]


@pytest.mark.parametrize(("line", "expected"), PARSED)
def test_parse_command(line: bytes, expected: SmtpCommand) -> None:
    command = parse_command(line)
    assert type(command) is type(expected)
    assert command == expected


@pytest.mark.parametrize(
    ("command", "verb"),
    [
        (HeloCommand("x"), "HELO"),
        (EhloCommand("x"), "EHLO"),
        (LhloCommand("x"), "LHLO"),
        (MailCommand(A), "MAIL"),
        (RcptCommand(A), "RCPT"),
        (DataCommand(), "DATA"),
        (RsetCommand(), "RSET"),
        (QuitCommand(), "QUIT"),
        (NoopCommand(), "NOOP"),
        (VrfyCommand("x"), "VRFY"),
        (ExpnCommand("x"), "EXPN"),
        (HelpCommand(), "HELP"),
        (StarttlsCommand(), "STARTTLS"),
        (AuthCommand("PLAIN"), "AUTH"),
        (BdatCommand(1), "BDAT"),
    ],
)
def test_each_class_fixes_its_verb(command: SmtpCommand, verb: str) -> None:
    assert command.verb == verb
    # The verb is not an __init__ argument of a verb's class: it cannot disagree with it.
    init = {field.name: field.init for field in dataclasses.fields(command)}
    assert init["verb"] is False
    assert init["parameter"] is True


def test_parsed_verb_matches_class_verb() -> None:
    for line in (b"helo x", b"mail from:<>", b"rcpt to:<a@b>", b"data", b"bdat 1", b"auth x"):
        command = parse_command(line)
        assert command.verb == line.split(b" ")[0].upper().decode()


def test_commands_are_frozen_and_hashable() -> None:
    mail = parse_command(b"MAIL FROM:<user@example.org> SIZE=10")
    assert isinstance(mail, MailCommand)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mail.return_path = NULL_PATH  # type: ignore[misc]
    with pytest.raises(TypeError):
        mail.parameters["SIZE"] = "20"  # type: ignore[index]
    assert hash(mail) == hash(parse_command(b"MAIL FROM:<user@example.org> SIZE=10"))
    assert hash(parse_command(b"HELO x")) == hash(HeloCommand("x", parameter="x"))


def test_mail_address_and_parameters() -> None:
    mail = parse_command(b'MAIL FROM:<"a b"@[192.0.2.1]> size=1000 body=8bitmime smtputf8')
    assert isinstance(mail, MailCommand)
    assert mail.return_path == '"a b"@[192.0.2.1]'
    assert mail.return_path.local_part == "a b"
    assert mail.return_path.domain == "[192.0.2.1]"
    assert dict(mail.parameters) == {"SIZE": "1000", "BODY": "8bitmime", "SMTPUTF8": None}
    assert list(mail.parameters) == ["SIZE", "BODY", "SMTPUTF8"]
    assert mail.size == 1000
    assert mail.body == "8BITMIME"
    assert mail.smtputf8 is True
    assert mail.parameter == 'FROM:<"a b"@[192.0.2.1]> size=1000 body=8bitmime smtputf8'


def test_mail_without_parameters() -> None:
    mail = parse_command(b"MAIL FROM:<>")
    assert isinstance(mail, MailCommand)
    assert mail.return_path is NULL_PATH
    assert mail.return_path.is_null
    assert mail.size is None
    assert mail.body is None
    assert mail.smtputf8 is False
    assert dict(mail.parameters) == {}


def test_mail_body_uppercase_is_ascii_only() -> None:
    mail = MailCommand(A, {"BODY": "straße"})
    assert mail.body == "STRAßE"


def test_mail_size_of_20_digits() -> None:
    mail = parse_command(b"MAIL FROM:<> SIZE=" + b"9" * 20)
    assert isinstance(mail, MailCommand)
    assert mail.size == int("9" * 20)


def test_rcpt_postmaster_and_parameters() -> None:
    rcpt = parse_command(b"RCPT TO:<Postmaster> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b")
    assert isinstance(rcpt, RcptCommand)
    assert rcpt.recipient_address == "Postmaster"
    assert rcpt.recipient_address.domain == ""
    assert dict(rcpt.parameters) == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b"}


def test_rcpt_utf8_in_smtputf8_transaction() -> None:
    rcpt = parse_command("RCPT TO:<用户@例子.广告>".encode(), smtputf8=True)
    assert isinstance(rcpt, RcptCommand)
    assert rcpt.recipient_address == Address("用户", "例子.广告")
    assert not rcpt.recipient_address.is_ascii


def test_smtputf8_flag_does_not_matter_for_ascii_rcpt() -> None:
    assert parse_command(b"RCPT TO:<a@b>", smtputf8=True) == parse_command(b"RCPT TO:<a@b>")


def test_unknown_verb_keeps_invalid_bytes_reversibly() -> None:
    command = parse_command(b"X-FOO caf\xe9")
    assert type(command) is SmtpCommand
    assert command.parameter.encode("utf-8", "surrogateescape") == b"caf\xe9"


# --- refused commands --------------------------------------------------------------------------

S = "5.5.4"  # RFC 3463: syntax error in parameters

ERRORS: list[tuple[bytes, bool, type[CommandSyntaxError], int, str, str]] = [
    # line, smtputf8 transaction, error type, code, enhanced, text
    (b"", False, CommandSyntaxError, 500, "5.5.2", "Error: bad syntax"),
    (b"    ", False, CommandSyntaxError, 500, "5.5.2", "Error: bad syntax"),
    # A verb must start the line (the line reader's DATA/BDAT stop rule depends on it).
    (b"   EHLO mx", False, CommandSyntaxError, 500, "5.5.2", "Error: bad syntax"),
    (b" DATA", False, CommandSyntaxError, 500, "5.5.2", "Error: bad syntax"),
    (b"HELO", False, CommandSyntaxError, 501, S, "Syntax: HELO hostname"),
    (b"HELO   ", False, CommandSyntaxError, 501, S, "Syntax: HELO hostname"),
    (b"ehlo", False, CommandSyntaxError, 501, S, "Syntax: EHLO hostname"),
    (b"LHLO", False, CommandSyntaxError, 501, S, "Syntax: LHLO hostname"),
    (b"EHLO caf\xe9", False, CommandSyntaxError, 500, "5.5.2", "Error: command is not valid UTF-8"),
    (
        b"MAIL FROM:<\xff@b>",
        False,
        CommandSyntaxError,
        500,
        "5.5.2",
        "Error: command is not valid UTF-8",
    ),
    # MAIL
    (b"MAIL", False, CommandSyntaxError, 501, S, "Syntax: MAIL FROM:<address>"),
    (b"MAIL <a@b>", False, CommandSyntaxError, 501, S, "Syntax: MAIL FROM:<address>"),
    (b"MAIL TO:<a@b>", False, CommandSyntaxError, 501, S, "Syntax: MAIL FROM:<address>"),
    (b"MAIL FROM <a@b>", False, CommandSyntaxError, 501, S, "Syntax: MAIL FROM:<address>"),
    (b"MAIL FROM:", False, AddressError, 501, "5.1.7", "Bad sender address syntax"),
    (b"MAIL FROM:<a@b", False, AddressError, 501, "5.1.7", "Bad sender address syntax"),
    (
        b"MAIL FROM:<a..b@example.org>",
        False,
        AddressError,
        501,
        "5.1.7",
        "Bad sender address syntax",
    ),
    (b"MAIL FROM:<Postmaster>", False, AddressError, 501, "5.1.7", "Bad sender address syntax"),
    (b"MAIL FROM:<a@b>SIZE=1", False, AddressError, 501, "5.1.7", "Bad sender address syntax"),
    (b"MAIL FROM:<a@b> SIZE=", False, ParameterError, 501, S, "Empty value for parameter SIZE"),
    (b"MAIL FROM:<a@b> SIZE=1 SIZE=2", False, ParameterError, 501, S, "Duplicate parameter SIZE"),
    (b"MAIL FROM:<a@b> =x", False, ParameterError, 501, S, "Bad parameter syntax"),
    (b"MAIL FROM:<a@b> SIZE=ten", False, ParameterError, 501, S, "Bad SIZE parameter value"),
    (b"MAIL FROM:<a@b> SIZE=-1", False, ParameterError, 501, S, "Bad SIZE parameter value"),
    (b"MAIL FROM:<a@b> SIZE", False, ParameterError, 501, S, "Bad SIZE parameter value"),
    (
        "MAIL FROM:<a@b> SIZE=\u0661\u0662".encode(),
        False,
        ParameterError,
        501,
        S,
        "Bad SIZE parameter value",
    ),
    (
        b"MAIL FROM:<a@b> SIZE=" + b"1" * 21,
        False,
        ParameterError,
        501,
        S,
        "Bad SIZE parameter value",
    ),
    (
        "MAIL FROM:<jörg@example.org>".encode(),
        False,
        NonAsciiAddressError,
        553,
        "5.6.7",
        "Non-ASCII sender address requires SMTPUTF8",
    ),
    # the transaction flag is for RCPT; MAIL needs its own SMTPUTF8 keyword (RFC 6531 3.4)
    (
        "MAIL FROM:<jörg@example.org> BODY=8BITMIME".encode(),
        True,
        NonAsciiAddressError,
        553,
        "5.6.7",
        "Non-ASCII sender address requires SMTPUTF8",
    ),
    # RCPT
    (b"RCPT", False, CommandSyntaxError, 501, S, "Syntax: RCPT TO:<address>"),
    (b"RCPT <a@b>", False, CommandSyntaxError, 501, S, "Syntax: RCPT TO:<address>"),
    (b"RCPT FROM:<a@b>", False, CommandSyntaxError, 501, S, "Syntax: RCPT TO:<address>"),
    (b"RCPT TO:<>", False, AddressError, 501, "5.1.3", "Bad recipient address syntax"),
    (b"RCPT TO:", False, AddressError, 501, "5.1.3", "Bad recipient address syntax"),
    (b"RCPT TO:<user>", False, AddressError, 501, "5.1.3", "Bad recipient address syntax"),
    (b"RCPT TO:<a@-b.example>", False, AddressError, 501, "5.1.3", "Bad recipient address syntax"),
    (b"RCPT TO:<a@[300.0.0.1]>", False, AddressError, 501, "5.1.3", "Bad recipient address syntax"),
    (b"RCPT TO:<a@b> NOTIFY=", False, ParameterError, 501, S, "Empty value for parameter NOTIFY"),
    (
        "RCPT TO:<jörg@example.org>".encode(),
        False,
        NonAsciiAddressError,
        553,
        "5.6.7",
        "Non-ASCII recipient address requires SMTPUTF8",
    ),
    (
        "RCPT TO:<user@例子.广告> SMTPUTF8".encode(),
        False,
        NonAsciiAddressError,
        553,
        "5.6.7",
        "Non-ASCII recipient address requires SMTPUTF8",
    ),
    (
        "RCPT TO:<jörg@exämple-.org>".encode(),
        True,
        AddressError,
        501,
        "5.1.3",
        "Bad recipient address syntax",
    ),
    # no-argument commands
    (b"DATA x", False, CommandSyntaxError, 501, S, "Syntax: DATA"),
    (b"RSET now", False, CommandSyntaxError, 501, S, "Syntax: RSET"),
    (b"QUIT bye", False, CommandSyntaxError, 501, S, "Syntax: QUIT"),
    (b"STARTTLS x", False, CommandSyntaxError, 501, S, "Syntax: STARTTLS"),
    # required arguments
    (b"VRFY", False, CommandSyntaxError, 501, S, "Syntax: VRFY address"),
    (b"EXPN  ", False, CommandSyntaxError, 501, S, "Syntax: EXPN mailing-list"),
    # AUTH
    (b"AUTH", False, CommandSyntaxError, 501, S, "Syntax: AUTH mechanism [initial-response]"),
    (
        b"AUTH PLAIN abc= extra",
        False,
        CommandSyntaxError,
        501,
        S,
        "Syntax: AUTH mechanism [initial-response]",
    ),
    (b"AUTH PL@IN", False, CommandSyntaxError, 501, S, "Syntax: AUTH mechanism [initial-response]"),
    (
        b"AUTH " + b"A" * 21,
        False,
        CommandSyntaxError,
        501,
        S,
        "Syntax: AUTH mechanism [initial-response]",
    ),
    (
        b"AUTH PLAIN abc",
        False,
        CommandSyntaxError,
        501,
        "5.5.2",
        "Cannot decode initial response as base64",
    ),
    (
        b"AUTH PLAIN ab*=",
        False,
        CommandSyntaxError,
        501,
        "5.5.2",
        "Cannot decode initial response as base64",
    ),
    (
        b"AUTH PLAIN a===",
        False,
        CommandSyntaxError,
        501,
        "5.5.2",
        "Cannot decode initial response as base64",
    ),
    (
        b"AUTH PLAIN ==",
        False,
        CommandSyntaxError,
        501,
        "5.5.2",
        "Cannot decode initial response as base64",
    ),
    # BDAT
    (b"BDAT", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    (b"BDAT LAST", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    (b"BDAT -1", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    (b"BDAT +1", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    (b"BDAT 1.5", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    (b"BDAT 10 FIRST", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    (b"BDAT 10 LAST LAST", False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
    # Arabic-Indic digits are str.isdigit() but not RFC 3030 DIGIT
    (
        "BDAT \u0661\u0660".encode(),
        False,
        CommandSyntaxError,
        501,
        S,
        "Syntax: BDAT chunk-size [LAST]",
    ),
    (b"BDAT " + b"1" * 21, False, CommandSyntaxError, 501, S, "Syntax: BDAT chunk-size [LAST]"),
]


@pytest.mark.parametrize(("line", "smtputf8", "error", "code", "enhanced", "text"), ERRORS)
def test_parse_command_refuses(
    line: bytes,
    smtputf8: bool,
    error: type[CommandSyntaxError],
    code: int,
    enhanced: str,
    text: str,
) -> None:
    with pytest.raises(CommandSyntaxError) as info:
        parse_command(line, smtputf8=smtputf8)
    assert type(info.value) is error
    assert (info.value.code, info.value.enhanced, info.value.text) == (code, enhanced, text)


def test_address_errors_keep_their_reason() -> None:
    with pytest.raises(AddressError) as info:
        parse_command(b"MAIL FROM:<a@b")
    assert info.value.reason == "missing '>'"
    with pytest.raises(AddressError) as info:
        parse_command(b"RCPT TO:<>")
    assert info.value.reason == "null path not allowed"


def test_errors_are_not_chained_to_the_internal_one() -> None:
    # The command layer's error replaces the path parser's; tracebacks stay short.
    with pytest.raises(AddressError) as info:
        parse_command(b"RCPT TO:<a..b@example.org>")
    assert info.value.__suppress_context__


FAST_PATH_ARGUMENTS = [
    b"FROM:<alice@example.org>",
    b"from:<alice@example.org>",
    b"FROM: <alice@example.org>",
    b"FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME",
    b"FROM:<alice@example.org> SIZE=x",
    b"FROM:<alice@example.org> SIZE=1 \xff",
    b"FROM:<alice@example.org> BODY",
    b"FROM:<>",
    b"FROM:<Postmaster>",
    b'FROM:<"a b"@example.org>',
    b"FROM:<@relay.example:alice@example.org>",
    b"FROM:<al\xc3\xafce@example.org> SMTPUTF8",
    b"FROM:<alice@[192.0.2.1]>",
    b"FROM:alice@example.org",
    b"TO:<alice@example.org>",
]


@pytest.mark.parametrize("argument", FAST_PATH_ARGUMENTS)
@pytest.mark.parametrize("verb", [b"MAIL", b"RCPT"])
def test_the_session_way_in_gives_what_the_general_parser_gives(
    verb: bytes, argument: bytes
) -> None:
    """parse_mail / parse_rcpt read the common form through the core's scan_path and
    everything else through parse_argument: the same command, or the same error, either way."""
    if verb == b"RCPT":
        argument = argument.replace(b"FROM:", b"TO:", 1).replace(b"from:", b"to:", 1)

    def outcome(parse: Callable[[], SmtpCommand]) -> object:
        try:
            command = parse()
        except CommandSyntaxError as error:
            return (type(error), error.code, error.enhanced, error.text)
        path = getattr(command, "return_path", None) or getattr(command, "recipient_address", "")
        parts = (getattr(path, "local_part", None), getattr(path, "domain", None))
        return (
            type(command),
            command,
            command.parameter,
            dict(getattr(command, "parameters", {})),
            parts,
        )

    for utf8 in (False, True):
        fast = outcome(
            functools.partial(parse_mail, argument)
            if verb == b"MAIL"
            else functools.partial(parse_rcpt, argument, utf8)
        )
        general = outcome(functools.partial(parse_argument, verb, argument, smtputf8=utf8))
        assert fast == general
