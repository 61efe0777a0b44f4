"""RFC 5321 4.1.2 paths and ESMTP parameters (RFC 6531 for UTF-8): alephsmtp.addresses."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alephsmtp import addresses
from alephsmtp.addresses import (
    NULL_PATH,
    Address,
    AddressError,
    NonAsciiAddressError,
    ParameterError,
    parse_parameters,
    parse_path,
)
from alephsmtp.errors import CommandSyntaxError

# --- Address ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_part", "domain", "text"),
    [
        ("user", "example.org", "user@example.org"),
        ("first.last+tag", "example.org", "first.last+tag@example.org"),
        ("!#$%&'*+-/=?^_`{|}~", "example.org", "!#$%&'*+-/=?^_`{|}~@example.org"),
        ("John Doe", "example.org", '"John Doe"@example.org'),
        ('say "hi"', "example.org", '"say \\"hi\\""@example.org'),
        ("back\\slash", "example.org", '"back\\\\slash"@example.org'),
        (".lead", "example.org", '".lead"@example.org'),
        ("trail.", "example.org", '"trail."@example.org'),
        ("double..dot", "example.org", '"double..dot"@example.org'),
        ("a@b", "example.org", '"a@b"@example.org'),
        ("", "example.org", '""@example.org'),
        ("user", "[192.0.2.1]", "user@[192.0.2.1]"),
        ("用户", "例子.广告", "用户@例子.广告"),
        ("Postmaster", "", "Postmaster"),
        ("", "", ""),
    ],
)
def test_address_str_quotes_only_when_needed(local_part: str, domain: str, text: str) -> None:
    address = Address(local_part, domain)
    assert address == text
    assert str.__str__(address) == text
    assert address.local_part == local_part
    assert address.domain == domain
    assert isinstance(address, str)


def test_null_path() -> None:
    assert Address.NULL is NULL_PATH
    assert NULL_PATH == ""
    assert not NULL_PATH
    assert NULL_PATH.is_null
    assert NULL_PATH.local_part == NULL_PATH.domain == ""
    assert not Address("Postmaster", "").is_null
    assert not Address("", "example.org").is_null


def test_is_ascii() -> None:
    assert Address("user", "example.org").is_ascii
    assert not Address("usér", "example.org").is_ascii
    assert not Address("user", "exämple.org").is_ascii
    assert NULL_PATH.is_ascii


def test_address_parts_are_read_only() -> None:
    address = Address("user", "example.org")
    with pytest.raises(AttributeError):
        address.local_part = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        address.domain = "other.example"  # type: ignore[misc]


def test_address_is_a_str_for_equality_and_hashing() -> None:
    address = Address("user", "example.org")
    assert address == "user@example.org"
    assert hash(address) == hash("user@example.org")
    assert "user@example.org" in {address}
    assert address != Address("User", "example.org")  # the local part is case-sensitive


@pytest.mark.parametrize(
    "address",
    [Address("John Doe", "example.org"), Address("Postmaster", ""), NULL_PATH],
)
def test_address_survives_pickle_and_copy(address: Address) -> None:
    for clone in (pickle.loads(pickle.dumps(address)), copy.copy(address), copy.deepcopy(address)):
        assert type(clone) is Address
        assert clone == address
        assert clone.local_part == address.local_part
        assert clone.domain == address.domain


def test_address_repr_names_the_parts() -> None:
    assert repr(Address("a b", "example.org")) == "Address(local_part='a b', domain='example.org')"


# --- parse_path: accepted ------------------------------------------------------------------

NULL = {"allow_null": True}
UTF8 = {"allow_utf8": True}
PM = {"allow_postmaster": True}

VALID: list[tuple[str, dict[str, bool], str, str, str]] = [
    # text, options, expected local_part, expected domain, expected rest
    ("<user@example.org>", {}, "user", "example.org", ""),
    ("<user@example.org> SIZE=100", {}, "user", "example.org", "SIZE=100"),
    (
        "<user@example.org>   SIZE=100 BODY=8BITMIME",
        {},
        "user",
        "example.org",
        "SIZE=100 BODY=8BITMIME",
    ),
    ("<first.last@sub.example.org>", {}, "first.last", "sub.example.org", ""),
    ("<User@Example.ORG>", {}, "User", "Example.ORG", ""),
    ("<a-b@x-y.example>", {}, "a-b", "x-y.example", ""),
    ("<user@localhost>", {}, "user", "localhost", ""),
    ("<user@1.example>", {}, "user", "1.example", ""),
    ("<user@xn--bcher-kva.example>", {}, "user", "xn--bcher-kva.example", ""),
    ("<!#$%&'*+-/=?^_`{|}~@example.org>", {}, "!#$%&'*+-/=?^_`{|}~", "example.org", ""),
    # Quoted-string local parts (qtextSMTP, quoted-pairSMTP)
    ('<"John Doe"@example.org>', {}, "John Doe", "example.org", ""),
    ('<"say \\"hi\\""@example.org>', {}, 'say "hi"', "example.org", ""),
    ('<"back\\\\slash"@example.org>', {}, "back\\slash", "example.org", ""),
    ('<"\\a"@example.org>', {}, "a", "example.org", ""),
    ('<"a>b"@example.org>', {}, "a>b", "example.org", ""),
    ('<"a@b"@example.org>', {}, "a@b", "example.org", ""),
    ('<"a..b"@example.org>', {}, "a..b", "example.org", ""),
    ('<""@example.org>', {}, "", "example.org", ""),
    ('<"plain"@example.org>', {}, "plain", "example.org", ""),
    # address literals (RFC 5321 4.1.3)
    ("<user@[192.0.2.1]>", {}, "user", "[192.0.2.1]", ""),
    ("<user@[IPv6:2001:db8::1]>", {}, "user", "[IPv6:2001:db8::1]", ""),
    ("<user@[ipv6:2001:DB8::1]>", {}, "user", "[ipv6:2001:DB8::1]", ""),
    ("<user@[IPv6:::ffff:192.0.2.1]>", {}, "user", "[IPv6:::ffff:192.0.2.1]", ""),
    ("<user@[IPv6:1:2:3:4:5:6:7:8]>", {}, "user", "[IPv6:1:2:3:4:5:6:7:8]", ""),
    ("<user@[x-tag:some.content]>", {}, "user", "[x-tag:some.content]", ""),
    # an IPv6 address without its tag reads as General-address-literal "2001" ":" "db8::1"
    ("<user@[2001:db8::1]>", {}, "user", "[2001:db8::1]", ""),
    # source routes are accepted and dropped (RFC 5321 4.1.2, Appendix C)
    ("<@a.example:user@example.org>", {}, "user", "example.org", ""),
    ("<@a.example,@b.example:user@example.org> X=1", {}, "user", "example.org", "X=1"),
    # null reverse-path
    ("<>", NULL, "", "", ""),
    ("<> SIZE=10", NULL, "", "", "SIZE=10"),
    # Postmaster without a domain (RFC 5321 4.1.1.3), any case
    ("<Postmaster>", PM, "Postmaster", "", ""),
    ("<postmaster>", PM, "postmaster", "", ""),
    ("<POSTMASTER> NOTIFY=NEVER", PM, "POSTMASTER", "", "NOTIFY=NEVER"),
    ("Postmaster", PM, "Postmaster", "", ""),
    ("<postmaster@example.org>", PM, "postmaster", "example.org", ""),
    ("<postmaster@example.org>", {}, "postmaster", "example.org", ""),
    # no angle brackets: accepted like Postfix when the mailbox ends at a space or the end
    ("user@example.org", {}, "user", "example.org", ""),
    ("user@example.org SIZE=5", {}, "user", "example.org", "SIZE=5"),
    ('"a b"@example.org', {}, "a b", "example.org", ""),
    ("user@[192.0.2.1] X", {}, "user", "[192.0.2.1]", "X"),
    # UTF-8 when allowed (RFC 6531 3.3)
    ("<用户@例子.广告>", UTF8, "用户", "例子.广告", ""),
    ("<jörg@exämple.org>", UTF8, "jörg", "exämple.org", ""),
    ('<"jö rg"@example.org>', UTF8, "jö rg", "example.org", ""),
    ("<user@bücher.example>", UTF8, "user", "bücher.example", ""),
    ("jörg@exämple.org SMTPUTF8", UTF8, "jörg", "exämple.org", "SMTPUTF8"),
]


@pytest.mark.parametrize(("text", "options", "local_part", "domain", "rest"), VALID)
def test_parse_path_accepts(
    text: str, options: dict[str, bool], local_part: str, domain: str, rest: str
) -> None:
    address, remainder = parse_path(text, **options)
    assert type(address) is Address
    assert address.local_part == local_part
    assert address.domain == domain
    assert remainder == rest
    assert address == Address(local_part, domain)


def test_null_path_is_the_shared_constant() -> None:
    address, _ = parse_path("<>", allow_null=True)
    assert address is NULL_PATH


def test_quoted_local_part_is_requoted_only_if_needed() -> None:
    assert parse_path('<"plain"@example.org>')[0] == "plain@example.org"
    assert parse_path('<"John Doe"@example.org>')[0] == '"John Doe"@example.org'
    assert parse_path('<"\\a"@example.org>')[0] == "a@example.org"


# --- parse_path: refused -------------------------------------------------------------------

INVALID: list[tuple[str, dict[str, bool], str]] = [
    # text, options, reason
    ("", {}, "empty path"),
    ("<>", {}, "null path not allowed"),
    ("<>", PM, "null path not allowed"),
    ("<>x", NULL, "text after the path"),
    ("<", {}, "bad local part"),
    ("<user@example.org", {}, "missing '>'"),
    ("<user@example.org SIZE=1", {}, "missing '>'"),
    ("user@example.org>", {}, "missing '<'"),
    ("<<user@example.org>>", {}, "bad local part"),
    ("<user@example.org>>", {}, "text after the path"),
    ("<user@example.org>SIZE=1", {}, "text after the path"),
    ("< user@example.org>", {}, "bad local part"),
    ("<user@example.org >", {}, "bad domain"),
    ("<user>", {}, "no domain"),
    ("user", {}, "no domain"),
    ("<user@>", {}, "bad domain"),
    ("<@example.org>", {}, "bad source route"),
    ("<Postmaster>", {}, "no domain"),
    ("<postmaster >", PM, "bad local part"),
    ("<Postmasterx>", PM, "no domain"),
    # local part
    ("<a..b@example.org>", {}, "bad local part"),
    ("<.user@example.org>", {}, "bad local part"),
    ("<user.@example.org>", {}, "bad local part"),
    ("<us er@example.org>", {}, "bad local part"),
    ("<us(er@example.org>", {}, "bad local part"),
    ("<us\\er@example.org>", {}, "bad local part"),
    ('<"unterminated@example.org>', {}, "bad local part"),
    ('<"a"b@example.org>', {}, "bad local part"),
    ('<"a\tb"@example.org>', {}, "bad local part"),
    ('<"a\\\tb"@example.org>', {}, "bad local part"),
    ("<a\x00b@example.org>", {}, "bad local part"),
    ("<user@@example.org>", {}, "bad domain"),
    # domain
    ("<user@example..org>", {}, "bad domain"),
    ("<user@.example.org>", {}, "bad domain"),
    ("<user@example.org.>", {}, "bad domain"),
    ("<user@-example.org>", {}, "bad domain"),
    ("<user@example-.org>", {}, "bad domain"),
    ("<user@exa_mple.org>", {}, "bad domain"),
    ("<user@exa mple.org>", {}, "bad domain"),
    ("<user@example.org@example.net>", {}, "bad domain"),
    ("<user@" + "a" * 64 + ".example>", {}, "bad domain"),
    ("user@example.org,x", {}, "bad domain"),
    # address literals
    ("<user@[192.0.2.256]>", {}, "bad address literal"),
    ("<user@[192.0.2]>", {}, "bad address literal"),
    ("<user@[192.0.2.1.5]>", {}, "bad address literal"),
    ("<user@[IPv6:2001:db8::g]>", {}, "bad address literal"),
    ("<user@[IPv6:1:2:3:4:5:6:7:8:9]>", {}, "bad address literal"),
    ("<user@[IPv6:fe80::1%eth0]>", {}, "bad address literal"),
    ("<user@[IPv6:]>", {}, "bad address literal"),
    ("<user@[x-tag:]>", {}, "bad address literal"),
    ("<user@[-tag-:content]>", {}, "bad address literal"),
    ("<user@[tag_x:content]>", {}, "bad address literal"),
    ("<user@[]>", {}, "bad address literal"),
    ("<user@[192.0.2.1>", {}, "bad address literal"),
    ("<user@[a[b]>", {}, "bad address literal"),
    ("<user@[192.0.2.1]x>", {}, "bad domain"),
    # source routes
    ("<@a.example user@example.org>", {}, "bad source route"),
    ("<@a.example,user@example.org>", {}, "bad source route"),
    ("<@a..example:user@example.org>", {}, "bad source route"),
    ("<@:user@example.org>", {}, "bad source route"),
    ("<@[192.0.2.1]:user@example.org>", {}, "bad source route"),
    ("@a.example:user@example.org", {}, "bad local part"),
    # UTF-8 that is malformed whatever the options
    ("<user@exämple-.org>", UTF8, "bad domain"),
    ("<user@[IPv6:2001:db8::ä]>", UTF8, "bad address literal"),
    ("<user@" + "ä" * 60 + ".example>", UTF8, "bad domain"),
]


@pytest.mark.parametrize(("text", "options", "reason"), INVALID)
def test_parse_path_refuses(text: str, options: dict[str, bool], reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(text, **options)
    assert type(info.value) is AddressError  # never the non-ASCII subclass for these
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "text",
    [
        "<jörg@example.org>",
        "<user@exämple.org>",
        '<"jö rg"@example.org>',
        "<用户@例子.广告>",
        "<@exämple.org:user@example.org>",
        "jörg@example.org",
    ],
)
def test_non_ascii_needs_allow_utf8(text: str) -> None:
    with pytest.raises(NonAsciiAddressError) as info:
        parse_path(text)
    assert (info.value.code, info.value.enhanced) == (553, "5.6.7")
    address, _ = parse_path(text, allow_utf8=True)
    assert not address.is_ascii or address.local_part == "user"


def test_non_ascii_error_is_an_address_error() -> None:
    # A caller that only knows AddressError still catches it.
    assert issubclass(NonAsciiAddressError, AddressError)
    assert issubclass(AddressError, CommandSyntaxError)


def test_lone_surrogates_are_not_utf8() -> None:
    # surrogateescape'd bytes have no UTF-8 form: a syntax error, not a non-ASCII address.
    with pytest.raises(AddressError) as info:
        parse_path("<us\udce9r@example.org>", allow_utf8=True)
    assert type(info.value) is AddressError


# --- limits (RFC 5321 4.5.3.1.1-3) -------------------------------------------------------------


def _domain_of(length: int) -> str:
    # Labels of 50 octets ("a"*49 + "."), then the remainder, no trailing dot.
    labels = []
    while length > 63:
        labels.append("a" * 49)
        length -= 50
    labels.append("b" * length)
    return ".".join(labels)


def test_domain_helper() -> None:
    for length in (1, 63, 64, 188, 255, 256):
        assert len(_domain_of(length)) == length


def test_local_part_of_64_octets_is_accepted() -> None:
    address, _ = parse_path("<" + "a" * 64 + "@example.org>")
    assert address.local_part == "a" * 64


@pytest.mark.parametrize(
    "text",
    [
        "<" + "a" * 65 + "@example.org>",
        '<"' + "a" * 63 + '"@example.org>',  # 65 octets as written, quotes included
        "<" + "é" * 33 + "@example.org>",  # 66 octets, 33 characters
    ],
)
def test_local_part_over_64_octets_is_refused(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(text, allow_utf8=True)
    assert info.value.reason == "local part too long"


def test_local_part_counts_utf8_octets() -> None:
    address, _ = parse_path("<" + "é" * 32 + "@example.org>", allow_utf8=True)
    assert address.local_part == "é" * 32


def test_path_of_256_octets_is_accepted() -> None:
    text = "<" + "a" * 64 + "@" + _domain_of(189) + ">"
    assert len(text) == 256
    address, rest = parse_path(text)
    assert address.domain == _domain_of(189)
    assert rest == ""


@pytest.mark.parametrize(
    "text",
    [
        "<" + "a" * 64 + "@" + _domain_of(190) + ">",
        "<@r.example:" + "a" * 54 + "@" + _domain_of(189) + ">",  # the source route counts
        "a" * 64 + "@" + _domain_of(190),  # counted as if it had its brackets
        "<" + "a" * 2 + "@" + _domain_of(255) + ">",  # a domain of 255 cannot fit in a path
    ],
)
def test_path_over_256_octets_is_refused(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(text)
    assert info.value.reason == "path too long"


def test_path_without_brackets_of_254_octets_is_accepted() -> None:
    text = "a" * 64 + "@" + _domain_of(189)
    assert parse_path(text)[0].local_part == "a" * 64


def test_domain_over_255_octets_is_refused() -> None:
    with pytest.raises(AddressError) as info:
        parse_path("<a@" + _domain_of(256) + ">")
    assert info.value.reason == "domain too long"


def test_label_of_63_octets_is_accepted_64_refused() -> None:
    assert parse_path("<a@" + "b" * 63 + ".example>")[0].domain == "b" * 63 + ".example"
    with pytest.raises(AddressError):
        parse_path("<a@" + "b" * 64 + ".example>")


def test_length_errors_win_over_non_ascii() -> None:
    # "The only problem is non-ASCII" is the condition for NonAsciiAddressError.
    with pytest.raises(AddressError) as info:
        parse_path("<" + "é" * 40 + "@example.org>")
    assert type(info.value) is AddressError
    assert info.value.reason == "local part too long"


# --- errors ----------------------------------------------------------------------------------


def test_address_error_defaults_and_reason() -> None:
    error = AddressError(reason="bad domain")
    assert (error.code, error.enhanced) == (501, "5.1.3")
    assert error.reason == "bad domain"
    assert "bad domain" in repr(error)
    worded = AddressError("Bad sender address syntax", enhanced="5.1.7", reason="x")
    assert (worded.code, worded.enhanced, worded.text) == (
        501,
        "5.1.7",
        "Bad sender address syntax",
    )


# --- parse_parameters ------------------------------------------------------------------------

PARAMETERS: list[tuple[str, dict[str, Any]]] = [
    ("", {}),
    ("   ", {}),
    ("SIZE=1000", {"SIZE": "1000"}),
    ("size=1000 body=8BITMIME", {"SIZE": "1000", "BODY": "8BITMIME"}),
    ("SMTPUTF8", {"SMTPUTF8": None}),
    ("SIZE=1  SMTPUTF8   BODY=7BIT", {"SIZE": "1", "SMTPUTF8": None, "BODY": "7BIT"}),
    (" SIZE=1 ", {"SIZE": "1"}),
    ("X-Custom-1=a+b/c", {"X-CUSTOM-1": "a+b/c"}),
    ("9X=!~", {"9X": "!~"}),
    ("ORCPT=rfc822;user+40example.org", {"ORCPT": "rfc822;user+40example.org"}),
    ("ENVID=<abc>", {"ENVID": "<abc>"}),
    ("ORCPT=utf-8;jörg@exämple.org", {"ORCPT": "utf-8;jörg@exämple.org"}),
    ("A-=x", {"A-": "x"}),
]


@pytest.mark.parametrize(("text", "expected"), PARAMETERS)
def test_parse_parameters(text: str, expected: dict[str, Any]) -> None:
    parameters = parse_parameters(text)
    assert parameters == expected
    assert list(parameters) == list(expected)  # order kept


def test_parse_parameters_keeps_value_case() -> None:
    assert parse_parameters("envid=AbC") == {"ENVID": "AbC"}


BAD_PARAMETERS: list[tuple[str, str]] = [
    ("SIZE=", "Empty value for parameter SIZE"),
    ("SIZE=1 size=2", "Duplicate parameter SIZE"),
    ("SMTPUTF8 SMTPUTF8", "Duplicate parameter SMTPUTF8"),
    ("-SIZE=1", "Bad parameter syntax"),
    ("=1", "Bad parameter syntax"),
    ("SI_ZE=1", "Bad parameter syntax"),
    ("SIZE=1=2", "Bad parameter syntax"),
    ("KEY=a\x7fb", "Bad parameter syntax"),
    ("KEY=a\x00b", "Bad parameter syntax"),
    ("KEY=a\tb", "Bad parameter syntax"),
    ("KÉY=1", "Bad parameter syntax"),
    ("KEY=\udce9", "Bad parameter syntax"),
]


@pytest.mark.parametrize(("text", "message"), BAD_PARAMETERS)
def test_parse_parameters_refuses(text: str, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        parse_parameters(text)
    assert (info.value.code, info.value.enhanced, info.value.text) == (501, "5.5.4", message)
    assert isinstance(info.value, CommandSyntaxError)


# The fast path for the common <dot.atom@host> form must agree with the general parser.
_atext = st.sampled_from(list("abcXYZ019!#$%&'*+-/=?^_`{|}~.@<> \"[]:,é"))


_pathlike = st.one_of(
    st.text(_atext, max_size=40),
    st.from_regex(r"<[a-zA-Z.!#-]{0,70}@[a-z0-9.\-]{0,70}>( {0,2}[A-Z=0-9]{0,5})?", fullmatch=True),
    st.from_regex(r"<[a-z]{60,70}@[a-z]{1,63}(\.[a-z]{1,63}){2,3}>", fullmatch=True),
)


@settings(max_examples=600, deadline=None)
@given(_pathlike, st.booleans(), st.booleans(), st.booleans())
def test_fast_path_agrees_with_the_general_parser(
    body: str, allow_null: bool, allow_utf8: bool, allow_postmaster: bool
) -> None:
    text = "<" + body if not body.startswith("<") else body
    options = {
        "allow_null": allow_null,
        "allow_utf8": allow_utf8,
        "allow_postmaster": allow_postmaster,
    }

    def outcome(parse: Any) -> Any:
        try:
            address, rest = parse(text, **options)
        except AddressError as error:
            return type(error), error.code
        return str(address), address.local_part, address.domain, rest

    assert outcome(parse_path) == outcome(addresses._parse_path_general)
