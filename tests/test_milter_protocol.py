"""The milter protocol without I/O, byte for byte: libmilter's constants (mfdef.h), every
packet the MTA sends, every response a filter sends, framing, negotiation; and the message
rules (header fields as a milter sees them, Postfix's edit semantics)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alephsmtp.milter import protocol as p
from alephsmtp.milter.message import (
    HeaderScanner,
    apply,
    body_of,
    milter_value,
    split_message,
)

# --- constants, as libmilter's mfdef.h and Postfix's milter8.c define them --------------------


def test_command_bytes() -> None:
    assert {name: getattr(p, name) for name in dir(p) if name.startswith("SMFIC_")} == {
        "SMFIC_ABORT": b"A",
        "SMFIC_BODY": b"B",
        "SMFIC_CONNECT": b"C",
        "SMFIC_MACRO": b"D",
        "SMFIC_BODYEOB": b"E",
        "SMFIC_HELO": b"H",
        "SMFIC_QUIT_NC": b"K",
        "SMFIC_HEADER": b"L",
        "SMFIC_MAIL": b"M",
        "SMFIC_EOH": b"N",
        "SMFIC_OPTNEG": b"O",
        "SMFIC_QUIT": b"Q",
        "SMFIC_RCPT": b"R",
        "SMFIC_DATA": b"T",
        "SMFIC_UNKNOWN": b"U",
    }


def test_response_bytes() -> None:
    assert {name: getattr(p, name) for name in dir(p) if name.startswith("SMFIR_")} == {
        "SMFIR_ADDRCPT": b"+",
        "SMFIR_DELRCPT": b"-",
        "SMFIR_ADDRCPT_PAR": b"2",
        "SMFIR_SHUTDOWN": b"4",
        "SMFIR_ACCEPT": b"a",
        "SMFIR_REPLBODY": b"b",
        "SMFIR_CONTINUE": b"c",
        "SMFIR_DISCARD": b"d",
        "SMFIR_CHGFROM": b"e",
        "SMFIR_CONN_FAIL": b"f",
        "SMFIR_ADDHEADER": b"h",
        "SMFIR_INSHEADER": b"i",
        "SMFIR_SETSYMLIST": b"l",
        "SMFIR_CHGHEADER": b"m",
        "SMFIR_PROGRESS": b"p",
        "SMFIR_QUARANTINE": b"q",
        "SMFIR_REJECT": b"r",
        "SMFIR_SKIP": b"s",
        "SMFIR_TEMPFAIL": b"t",
        "SMFIR_REPLYCODE": b"y",
    }
    assert (p.SMFIA_UNKNOWN, p.SMFIA_UNIX, p.SMFIA_INET, p.SMFIA_INET6) == (b"U", b"L", b"4", b"6")


def test_flag_values() -> None:
    assert {flag.name: flag.value for flag in p.Action} == {
        "ADDHDRS": 0x01,
        "CHGBODY": 0x02,
        "ADDRCPT": 0x04,
        "DELRCPT": 0x08,
        "CHGHDRS": 0x10,
        "QUARANTINE": 0x20,
        "CHGFROM": 0x40,
        "ADDRCPT_PAR": 0x80,
        "SETSYMLIST": 0x100,
    }
    assert {flag.name: flag.value for flag in p.Step} == {
        "NOCONNECT": 0x1,
        "NOHELO": 0x2,
        "NOMAIL": 0x4,
        "NORCPT": 0x8,
        "NOBODY": 0x10,
        "NOHDRS": 0x20,
        "NOEOH": 0x40,
        "NR_HDR": 0x80,
        "NOUNKNOWN": 0x100,
        "NODATA": 0x200,
        "SKIP": 0x400,
        "RCPT_REJ": 0x800,
        "NR_CONN": 0x1000,
        "NR_HELO": 0x2000,
        "NR_MAIL": 0x4000,
        "NR_RCPT": 0x8000,
        "NR_DATA": 0x10000,
        "NR_UNKN": 0x20000,
        "NR_EOH": 0x40000,
        "NR_BODY": 0x80000,
        "HDR_LEADSPC": 0x100000,
    }
    assert [stage.value for stage in p.MacroStage] == [0, 1, 2, 3, 4, 5, 6]
    # Postfix's SMFIP_NOSEND_MASK / SMFIP_NOREPLY_MASK.
    assert int(p.NO_SEND) == 0x37F
    assert int(p.NO_REPLY) == 0xFF080
    assert int(p.ALL_ACTIONS) == 0x1FF
    assert int(p.ALL_PROTOCOL) == 0x1FF7FF  # everything but SMFIP_RCPT_REJ


# --- the MTA's packets ------------------------------------------------------------------------


def test_negotiation_packet() -> None:
    assert p.encode_negotiate() == (
        b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xf7\xff"
    )
    assert p.encode_negotiate(2, 0x1, 0x7F) == (
        b"\x00\x00\x00\x0dO\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x7f"
    )


def test_connect_packets() -> None:
    assert p.encode_connect("[192.0.2.7]", p.SMFIA_INET, 40123, "192.0.2.7") == (
        struct.pack("!I", 1 + 12 + 1 + 2 + 10)
        + b"C[192.0.2.7]\x004"
        + struct.pack("!H", 40123)
        + b"192.0.2.7\x00"
    )
    assert p.encode_connect("[2001:db8::1]", p.SMFIA_INET6, 25, "2001:db8::1") == (
        b"\x00\x00\x00\x1eC[2001:db8::1]\x006\x00\x192001:db8::1\x00"
    )
    assert p.encode_connect("unknown", p.SMFIA_UNKNOWN) == b"\x00\x00\x00\x0aCunknown\x00U"
    assert p.encode_connect("localhost", p.SMFIA_UNIX, 0, "/run/s") == (
        b"\x00\x00\x00\x15Clocalhost\x00L\x00\x00/run/s\x00"
    )


def test_envelope_packets() -> None:
    assert p.encode_macros(p.SMFIC_CONNECT, {"j": "mx", "{daemon_name}": "alephsmtp"}) == (
        b"\x00\x00\x00\x1fDCj\x00mx\x00{daemon_name}\x00alephsmtp\x00"
    )
    assert p.encode_macros(p.SMFIC_MAIL, [("i", "ABC")]) == b"\x00\x00\x00\x08DMi\x00ABC\x00"
    assert p.encode_helo("client.test") == b"\x00\x00\x00\x0dHclient.test\x00"
    assert p.encode_mail(["<a@b.c>", "SIZE=10"]) == b"\x00\x00\x00\x11M<a@b.c>\x00SIZE=10\x00"
    assert p.encode_rcpt(["<x@y.z>"]) == b"\x00\x00\x00\x09R<x@y.z>\x00"
    assert p.encode_data() == b"\x00\x00\x00\x01T"
    assert p.encode_unknown("XYZZY a") == b"\x00\x00\x00\x09UXYZZY a\x00"
    assert p.encode_abort() == b"\x00\x00\x00\x01A"
    assert p.encode_quit() == b"\x00\x00\x00\x01Q"
    assert p.encode_quit_new_connection() == b"\x00\x00\x00\x01K"


def test_content_packets() -> None:
    assert p.encode_header("Subject", "hi\n there") == b"\x00\x00\x00\x13LSubject\x00hi\n there\x00"
    assert p.encode_header(b"X", "\u00e9") == b"\x00\x00\x00\x06LX\x00\xc3\xa9\x00"
    assert p.encode_end_of_headers() == b"\x00\x00\x00\x01N"
    assert p.encode_body(b"line\r\n") == b"\x00\x00\x00\x07Bline\r\n"
    assert p.encode_body(b"x" * p.MAX_BODY_CHUNK)[:5] == b"\x00\x01\x00\x00B"
    with pytest.raises(ValueError, match="at most 65535"):
        p.encode_body(b"x" * (p.MAX_BODY_CHUNK + 1))
    assert p.encode_end_of_body() == b"\x00\x00\x00\x01E"


def test_strings_cannot_hold_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        p.encode_helo("a\0b")


# --- the filter's responses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "response"),
    [
        (b"c", p.Continue()),
        (b"a", p.Accept()),
        (b"r", p.Reject()),
        (b"t", p.Tempfail()),
        (b"d", p.Discard()),
        (b"p", p.Progress()),
        (b"s", p.Skip()),
        (b"4", p.Shutdown()),
        (b"f", p.ConnectionFailure()),
        (b"y550 5.7.1 no\x00", p.ReplyCode("550 5.7.1 no")),
        (b"qspam\x00", p.Quarantine("spam")),
        (b"hX-Spam\x00yes\x00", p.AddHeader("X-Spam", "yes")),
        (
            b"i\x00\x00\x00\x00DKIM-Signature\x00 v=1\x00",
            p.InsertHeader(0, "DKIM-Signature", " v=1"),
        ),
        (b"m\x00\x00\x00\x02Subject\x00\x00", p.ChangeHeader(2, "Subject", "")),
        (b"+<a@b.c>\x00", p.AddRecipient("<a@b.c>")),
        (b"2<a@b.c>\x00NOTIFY=NEVER\x00", p.AddRecipient("<a@b.c>", "NOTIFY=NEVER")),
        (b"-<a@b.c>\x00", p.DeleteRecipient("<a@b.c>")),
        (b"e<s@b.c>\x00", p.ChangeSender("<s@b.c>")),
        (b"e<s@b.c>\x00RET=HDRS\x00", p.ChangeSender("<s@b.c>", "RET=HDRS")),
        (b"bnew body\r\n", p.ReplaceBody(b"new body\r\n")),
        (
            b"O\x00\x00\x00\x06\x00\x00\x00\x11\x00\x00\x00\x80",
            p.Negotiate(6, 0x11, 0x80),
        ),
        (
            b"O\x00\x00\x00\x06\x00\x00\x01\x00\x00\x00\x00\x00"
            b"\x00\x00\x00\x00j {client_addr}\x00\x00\x00\x00\x05i\x00",
            p.Negotiate(
                6,
                0x100,
                0,
                {p.MacroStage.CONNECT: ("j", "{client_addr}"), p.MacroStage.EOM: ("i",)},
            ),
        ),
    ],
)
def test_responses_both_ways(raw: bytes, response: p.Response) -> None:
    assert p.decode_response(raw[:1], raw[1:]) == response
    encoded = p.encode_response(response)
    assert encoded == struct.pack("!I", len(raw)) + raw
    ((command, data),) = p.PacketDecoder().feed(encoded)
    assert p.decode_response(command, data) == response


def test_response_required_actions() -> None:
    assert p.AddHeader("a", "b").action == p.Action.ADDHDRS
    assert p.InsertHeader(0, "a", "b").action == p.Action.ADDHDRS
    assert p.ChangeHeader(1, "a", "").action == p.Action.CHGHDRS
    assert p.AddRecipient("<a@b>").action == p.Action.ADDRCPT
    assert p.AddRecipient("<a@b>", "").action == p.Action.ADDRCPT_PAR
    assert p.DeleteRecipient("<a@b>").action == p.Action.DELRCPT
    assert p.ChangeSender("<a@b>").action == p.Action.CHGFROM
    assert p.ReplaceBody(b"").action == p.Action.CHGBODY


@pytest.mark.parametrize(
    "raw",
    [
        b"cx",  # data after a response that takes none
        b"hX-Spam\x00yes",  # not NUL-terminated
        b"hX-Spam\x00",  # one string where two are expected
        b"i\x00\x00",  # no index
        b"e<a>\x00b\x00c\x00",  # three strings
        b"Z",  # unknown
        b"O\x00\x00\x00\x06",  # short negotiation
        b"y550 a\x00b\x00",  # NUL inside the reply
    ],
)
def test_malformed_responses(raw: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_response(raw[:1], raw[1:])


def test_commands_decode_as_sent() -> None:
    stream = b"".join(
        [
            p.encode_negotiate(),
            p.encode_macros(p.SMFIC_CONNECT, {"j": "mx"}),
            p.encode_connect("[192.0.2.1]", p.SMFIA_INET, 25, "192.0.2.1"),
            p.encode_connect("x", p.SMFIA_UNKNOWN),
            p.encode_helo("h"),
            p.encode_mail(["<a@b>", "SIZE=1"]),
            p.encode_rcpt(["<c@d>"]),
            p.encode_data(),
            p.encode_header("Subject", "x"),
            p.encode_end_of_headers(),
            p.encode_body(b"\0binary\r\n"),
            p.encode_end_of_body(),
            p.encode_unknown("FOO"),
            p.encode_abort(),
            p.encode_quit(),
        ]
    )
    commands = [p.decode_command(code, data) for code, data in p.PacketDecoder().feed(stream)]
    assert commands == [
        p.Command(b"O", numbers=(6, 0x1FF, 0x1FF7FF)),
        p.Command(b"D", strings=("j", "mx"), stage=b"C"),
        p.Command(b"C", strings=("[192.0.2.1]", "192.0.2.1"), numbers=(25,), family=b"4"),
        p.Command(b"C", strings=("x",), family=b"U"),
        p.Command(b"H", strings=("h",)),
        p.Command(b"M", strings=("<a@b>", "SIZE=1")),
        p.Command(b"R", strings=("<c@d>",)),
        p.Command(b"T"),
        p.Command(b"L", strings=("Subject", "x")),
        p.Command(b"N"),
        p.Command(b"B", data=b"\0binary\r\n"),
        p.Command(b"E"),
        p.Command(b"U", strings=("FOO",)),
        p.Command(b"A"),
        p.Command(b"Q"),
    ]


# --- framing ----------------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_decoder_splits_anywhere(cuts: list[int]) -> None:
    stream = (
        p.encode_response(p.AddHeader("X-A", "1"))
        + p.encode_response(p.ReplaceBody(b"b" * 300))
        + p.encode_response(p.Continue())
    )
    decoder = p.PacketDecoder()
    packets = []
    start = 0
    for cut in [*sorted(min(c, len(stream)) for c in cuts), len(stream)]:
        packets += decoder.feed(stream[start:cut])
        start = cut
    assert [p.decode_response(*packet) for packet in packets] == [
        p.AddHeader("X-A", "1"),
        p.ReplaceBody(b"b" * 300),
        p.Continue(),
    ]
    assert decoder.pending == 0


def test_decoder_refuses_bad_lengths() -> None:
    with pytest.raises(p.ProtocolError, match="length 0"):
        p.PacketDecoder().feed(b"\x00\x00\x00\x00c")
    with pytest.raises(p.ProtocolError, match="length"):
        p.PacketDecoder().feed(struct.pack("!I", p.MAX_PACKET + 1))
    assert p.PacketDecoder(max_packet=10).feed(b"\x00\x00\x00\x0a") == []
    with pytest.raises(p.ProtocolError):
        p.PacketDecoder(max_packet=10).feed(b"\x00\x00\x00\x0b")


# --- negotiation ------------------------------------------------------------------------------


def test_negotiation_outcome() -> None:
    agreed = p.negotiate(p.Negotiate(6, 0x11, int(p.Step.NR_HDR | p.Step.NOHELO | 0x10000000)))
    assert agreed.version == 6
    assert agreed.actions == p.Action.ADDHDRS | p.Action.CHGHDRS
    assert agreed.protocol == p.Step.NR_HDR | p.Step.NOHELO  # libmilter's internal bits dropped
    assert not agreed.sends(p.Step.NOHELO)
    assert agreed.sends(p.Step.NOMAIL)
    assert not agreed.replies(p.Step.NR_HDR)
    assert agreed.replies(p.Step.NR_RCPT)


def test_older_versions_get_only_their_events() -> None:
    v2 = p.negotiate(p.Negotiate(2, 0, 0))
    assert not v2.sends(p.Step.NODATA)
    assert not v2.sends(p.Step.NOUNKNOWN)
    v3 = p.negotiate(p.Negotiate(3, 0, 0))
    assert v3.sends(p.Step.NOUNKNOWN)
    assert not v3.sends(p.Step.NODATA)
    v4 = p.negotiate(p.Negotiate(4, 0, 0))
    assert v4.sends(p.Step.NODATA)
    v5 = p.negotiate(p.Negotiate(5, 0, 0))  # no such version: treated as the next lower, 4
    assert v5.skipped == v4.skipped


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (p.Negotiate(7, 0, 0), "version 7"),
        (p.Negotiate(1, 0, 0), "version 1"),
        (p.Negotiate(6, 0x200, 0), "actions"),
    ],
)
def test_negotiation_failures(answer: p.Negotiate, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.negotiate(answer)
    with pytest.raises(p.ProtocolError, match="actions"):
        p.negotiate(p.Negotiate(6, int(p.Action.CHGBODY), 0), offered_actions=int(p.Action.ADDHDRS))


# --- the message as milters see it ------------------------------------------------------------

MESSAGE = (
    b"From: a@example.org\r\n"
    b"Subject:  two spaces\r\n"
    b"\tfolded\r\n"
    b"X-Empty:\r\n"
    b"Name : spaced\r\n"
    b"\r\n"
    b"Body: not a header\r\n"
    b"\r\n"
    b"end\r\n"
)


def test_split_message() -> None:
    fields, blank, body = split_message(MESSAGE)
    assert [(f.name, f.value) for f in fields] == [
        (b"From", b" a@example.org"),
        (b"Subject", b"  two spaces\n\tfolded"),
        (b"X-Empty", b""),
        (b"Name", b" spaced"),
    ]
    assert blank
    assert body == b"Body: not a header\r\n\r\nend\r\n"
    assert b"".join(f.raw for f in fields) + b"\r\n" + body == MESSAGE


def test_milter_value_drops_one_space_only() -> None:
    assert milter_value(b"Subject:  two\r\n", leading_space=False) == b" two"
    assert milter_value(b"Subject:\ttab\r\n", leading_space=False) == b"\ttab"
    assert milter_value(b"Subject:  two\r\n", leading_space=True) == b"  two"


@pytest.mark.parametrize(
    ("message", "names", "blank", "body"),
    [
        (
            b"Subject: x\r\nnot a header\r\nmore\r\n",
            [b"Subject"],
            False,
            b"not a header\r\nmore\r\n",
        ),
        (b"no headers at all\r\n", [], False, b"no headers at all\r\n"),
        (b"Subject: x\r\n", [b"Subject"], False, b""),
        (b"Subject: x", [b"Subject"], False, b""),  # unterminated: still a field
        (b"Subject: x\n\nbody\n", [b"Subject"], True, b"body\n"),  # LF alone ends lines too
        (b"\r\nbody\r\n", [], True, b"body\r\n"),
        (b" starts with a blank\r\n", [], False, b" starts with a blank\r\n"),
        (b"", [], False, b""),
    ],
)
def test_header_section_ends(message: bytes, names: list[bytes], blank: bool, body: bytes) -> None:
    fields, got_blank, got_body = split_message(message)
    assert [f.name for f in fields] == names
    assert (got_blank, got_body) == (blank, body)


@given(st.lists(st.integers(min_value=0, max_value=len(MESSAGE)), max_size=10))
def test_scanner_pieces_equal_whole(cuts: list[int]) -> None:
    scanner = HeaderScanner()
    fields = []
    body = b""
    start = 0
    for cut in [*sorted(cuts), len(MESSAGE)]:
        more, rest = scanner.feed(MESSAGE[start:cut])
        fields += more
        body += rest
        start = cut
    more, rest = scanner.finish()
    fields += more
    body += rest
    whole, _, whole_body = split_message(MESSAGE)
    assert fields == whole
    assert body == whole_body


def test_scanner_cuts_an_endless_header_section() -> None:
    scanner = HeaderScanner(max_header=100)
    fields, body = scanner.feed(b"A: 1\r\nB: " + b"x" * 200)
    assert [f.name for f in fields] == [b"A"]
    assert body == b"B: " + b"x" * 200
    assert not scanner.in_header
    assert scanner.feed(b"more") == ([], b"more")


def test_body_for_the_milter_ends_with_crlf() -> None:
    assert body_of(b"") == b""
    assert body_of(b"a\r\n") == b"a\r\n"
    assert body_of(b"a") == b"a\r\n"


# --- edits: Postfix's cleanup_milter.c rules --------------------------------------------------

SIMPLE = b"A: 1\r\nB: 2\r\nA: 3\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    ("edit", "head"),
    [
        (p.AddHeader("C", "x"), b"A: 1\r\nB: 2\r\nA: 3\r\nC: x\r\n"),
        # Index 0 and 1: above and below the MTA's own Received: field, so both on top.
        (p.InsertHeader(0, "C", "x"), b"C: x\r\nA: 1\r\nB: 2\r\nA: 3\r\n"),
        (p.InsertHeader(1, "C", "x"), b"C: x\r\nA: 1\r\nB: 2\r\nA: 3\r\n"),
        (p.InsertHeader(2, "C", "x"), b"A: 1\r\nC: x\r\nB: 2\r\nA: 3\r\n"),
        (p.InsertHeader(99, "C", "x"), b"A: 1\r\nB: 2\r\nA: 3\r\nC: x\r\n"),
        (p.ChangeHeader(0, "A", "new"), b"A: new\r\nB: 2\r\nA: 3\r\n"),  # 0 counts as 1
        (p.ChangeHeader(2, "a", "new"), b"A: 1\r\nB: 2\r\na: new\r\n"),
        (p.ChangeHeader(2, "A", ""), b"A: 1\r\nB: 2\r\n"),
        (p.ChangeHeader(3, "A", "new"), b"A: 1\r\nB: 2\r\nA: 3\r\nA: new\r\n"),
        (p.ChangeHeader(3, "A", ""), b"A: 1\r\nB: 2\r\nA: 3\r\n"),
        (p.AddHeader("C", "a\nb\r\nc"), b"A: 1\r\nB: 2\r\nA: 3\r\nC: a\r\n\tb\r\n\tc\r\n"),
        (p.AddHeader("C", "a\n b\n\n"), b"A: 1\r\nB: 2\r\nA: 3\r\nC: a\r\n b\r\n\t\r\n\t\r\n"),
        (p.AddHeader("C", "bare\rcr"), b"A: 1\r\nB: 2\r\nA: 3\r\nC: bare cr\r\n"),
    ],
)
def test_header_edit_rules(edit: p.Modification, head: bytes) -> None:
    assert apply(SIMPLE, [edit]) == head + b"\r\nbody\r\n"


def test_leading_space_edits_add_no_blank() -> None:
    assert apply(SIMPLE, [p.AddHeader("C", " x")], leading_space=True).startswith(
        b"A: 1\r\nB: 2\r\nA: 3\r\nC: x\r\n"
    )
    assert apply(SIMPLE, [p.AddHeader("C", "x")], leading_space=True).startswith(
        b"A: 1\r\nB: 2\r\nA: 3\r\nC:x\r\n"
    )


@pytest.mark.parametrize("name", ["", "Bad Name", "Colon:", "Line\r\nBreak", "\u00e9"])
def test_bad_field_names(name: str) -> None:
    with pytest.raises(p.ProtocolError):
        apply(SIMPLE, [p.AddHeader(name, "x")])
    with pytest.raises(p.ProtocolError):
        apply(SIMPLE, [p.ChangeHeader(1, name, "x")])


@pytest.mark.parametrize(
    ("chunks", "body"),
    [
        ([b"a\r\nb\r\n"], b"a\r\nb\r\n"),
        ([b"a\nb\n"], b"a\r\nb\r\n"),
        ([b"a\r", b"\nb"], b"a\r\nb\r\n"),  # CRLF split across chunks; last line terminated
        ([b"lone\rcr\n"], b"lone\rcr\r\n"),  # Postfix keeps a CR not followed by LF
        ([b""], b""),
    ],
)
def test_body_replacement(chunks: list[bytes], body: bytes) -> None:
    edits: list[p.Modification] = [p.ReplaceBody(chunk) for chunk in chunks]
    assert apply(SIMPLE, edits) == b"A: 1\r\nB: 2\r\nA: 3\r\n\r\n" + body


def test_edits_without_blank_line_get_one() -> None:
    assert apply(b"A: 1\r\nbody\r\n", [p.AddHeader("B", "2")]) == b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
    assert apply(b"A: 1", [p.AddHeader("B", "2")]) == b"A: 1\r\nB: 2\r\n"
    assert apply(b"A: 1\r\n", []) == b"A: 1\r\n"  # nothing to do: the same bytes


_LINES = st.sampled_from(
    [
        b"Subject: hi\r\n",
        b"X-A:\r\n",
        b"Name : v\r\n",
        b" folded\r\n",
        b"\tfolded\r\n",
        b"\r\n",
        b"\n",
        b"not a field\r\n",
        b"From: lf only\n",
        b"body line\r\n",
        b"X-Bad name: v\r\n",
    ]
)


@given(st.lists(_LINES, max_size=12), st.sampled_from([b"", b"X-End: open", b" open", b"tail"]))
def test_split_message_agrees_with_the_scanner(lines: list[bytes], tail: bytes) -> None:
    message = b"".join(lines) + tail
    scanner = HeaderScanner(max_header=len(message) + 1)
    fields, body = scanner.feed(message)
    if scanner.in_header:
        more, rest = scanner.finish()
        fields += more
        body += rest
    assert split_message(message) == (fields, scanner.blank_line, body)
