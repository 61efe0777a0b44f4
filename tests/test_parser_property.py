"""Property tests for the parsing core.

* Both implementations match small, obviously-correct reference models of the contract (a
  byte-at-a-time DataReader, a whole-stream LineReader), whatever the split points.
* The compiled core and the pure twin agree call by call (skipped only when the compiled core
  is not available).
* DataReader round trip: a dot-stuffed body plus ``.<CRLF>`` comes out as the body.
* ``scan_path`` is the Python fast path of :mod:`alephsmtp.commands` and
  :mod:`alephsmtp.addresses` in bytes: on (mostly near-valid) MAIL/RCPT arguments both cores
  return exactly what that path finds, and ``parse_path`` and ``parse_command`` read the same
  address from the text.
"""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alephsmtp.addresses import AddressError, parse_path
from alephsmtp.commands import MailCommand, RcptCommand, parse_command
from alephsmtp.errors import (
    BareCarriageReturn,
    BareLineFeed,
    CommandSyntaxError,
    LineTooLong,
    MessageTooLarge,
    SmtpError,
)
from fuzz import fuzz_parser

PY = importlib.import_module("alephsmtp._parser_py")
C: ModuleType | None = None
WHY_NO_C = "ALEPHSMTP_NO_EXTENSIONS is set"
if not os.environ.get("ALEPHSMTP_NO_EXTENSIONS"):
    try:
        C = importlib.import_module("alephsmtp._parser")
    except ImportError as exc:
        WHY_NO_C = f"alephsmtp._parser is not built ({exc})"
needs_compiled = pytest.mark.skipif(C is None, reason=f"compiled parser unavailable: {WHY_NO_C}")

SETTINGS = settings(
    # ALEPHSMTP_HYPOTHESIS_EXAMPLES=20000 for a long fuzzing run.
    max_examples=int(os.environ.get("ALEPHSMTP_HYPOTHESIS_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

CR, LF, DOT = 13, 10, 46

# --- strategies ------------------------------------------------------------------------------

TOKENS = [
    b"\r", b"\n", b".", b"\x00", b"A", b"\xff", b" ", b"\r\n", b"\r\n.", b".\r\n",
    b"\r\n.\r\n", b"..", b"\n.", b"DATA", b"data", b"BDAT 1", b"StartTLS", b"xyz",
]  # fmt: skip
token_streams = st.lists(
    st.one_of(st.sampled_from(TOKENS), st.binary(max_size=3)), max_size=40
).map(b"".join)
# Mostly well-formed CRLF lines (the bulk path), sometimes long, sometimes broken.
clean_lines = st.lists(
    st.lists(st.sampled_from([b"A", b".", b"\x00", b"\xff", b"..", b"AAAAAAAA"]), max_size=8).map(
        b"".join
    ),
    max_size=25,
)
line_streams = st.tuples(
    clean_lines, st.sampled_from([b"", b".\r\n", b"\r\n.\r\nMAIL", b"\n", b"\r", b"x\r"])
).map(lambda t: b"".join(line + b"\r\n" for line in t[0]) + t[1])
streams = st.one_of(token_streams, line_streams)
limits = st.one_of(st.just(0), st.integers(1, 24))
sizes = st.one_of(st.just(0), st.integers(1, 80))
policies = st.sampled_from(["reject", "normalize"])


@st.composite
def splits(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """``stream`` cut at random points (sometimes one byte at a time)."""
    if draw(st.integers(0, 9)) == 0:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def reused(pieces: list[bytes]) -> Iterator[memoryview]:
    """Each piece as a memoryview of one bytearray, scribbled over after each use."""
    size = max((len(piece) for piece in pieces), default=0)
    buf = bytearray(size)
    for piece in pieces:
        buf[: len(piece)] = piece
        yield memoryview(buf)[: len(piece)]
        buf[:] = b"\xee" * size


# --- reference models ------------------------------------------------------------------------

ORDER = (BareCarriageReturn, LineTooLong, BareLineFeed, MessageTooLarge)


def ref_data(
    stream: bytes, max_size: int, limit: int, normalize: bool
) -> tuple[bytes, int, SmtpError | None, int | None]:
    """The DataReader contract, byte by byte: (output, size, error, end of the end mark)."""
    out = bytearray()
    size = line_len = 0
    error: SmtpError | None = None
    state = "start"
    eligible = True
    cr = False
    for i, c in enumerate(stream):
        broken: set[type[SmtpError]] = set()
        emit = b""
        count = 0  # bytes this one adds to the line
        ends: bool | None = None  # the line ends here; is the next one end-mark eligible?
        if state == "start":
            if c == DOT:
                state = "dot"
                continue
            state = "mid"
        elif state == "dot":
            if c == CR:
                state = "dotcr"
                continue
            state = "mid"
            if c == LF:  # ".<LF>": the dot is content
                emit += b"."
                count += 1
        elif state == "dotcr":
            if c == LF:
                if eligible:
                    return bytes(out), size, error, i + 1
                emit += b".\r\n"
                count += 3
                ends = True
            else:  # a stuffed dot and a bare CR
                emit += b"\r"
                count += 1
                if not normalize:
                    broken.add(BareCarriageReturn)
                state = "mid"
        if ends is None:
            if cr:
                cr = False
                if c == LF:
                    emit += b"\n"
                    count += 1
                    ends = True
                elif not normalize:
                    broken.add(BareCarriageReturn)
            if ends is None:
                if c == CR:
                    cr = True
                    emit += b"\r"
                elif c == LF:
                    emit += b"\r\n" if normalize else b"\n"
                    ends = False
                    if not normalize:
                        broken.add(BareLineFeed)
                else:
                    emit += bytes([c])
                count += 1
        line_len += count
        if limit and line_len > limit:
            broken.add(LineTooLong)
        size += len(emit)
        if max_size and size > max_size:
            broken.add(MessageTooLarge)
        if error is None and broken:
            error = next(kind for kind in ORDER if kind in broken)()
        if error is None:
            out += emit
        if ends is not None:
            state = "start"
            eligible = ends
            line_len = 0
    return bytes(out), size, error, None


def ref_lines(stream: bytes, limit: int, normalize: bool) -> tuple[list[Any], bytes]:
    """The LineReader contract on a whole stream, fully resumed: (lines, pending)."""
    lines: list[Any] = []
    pos = 0
    while (lf := stream.find(b"\n", pos)) >= 0:
        line = stream[pos : lf + 1]
        pos = lf + 1
        if limit and len(line) > limit:
            lines.append(LineTooLong())
        elif not line.endswith(b"\r\n") and not normalize:
            lines.append(BareLineFeed())
        elif not normalize and b"\r" in line[:-2]:
            lines.append(BareCarriageReturn())
        else:
            lines.append(line[:-2] if line.endswith(b"\r\n") else line[:-1])
    tail = stream[pos:]
    return lines, b"" if limit and len(tail) >= limit else tail


# --- drivers ---------------------------------------------------------------------------------


def run_data(module: ModuleType, pieces: list[bytes], options: dict[str, Any]) -> dict[str, Any]:
    """Feed pieces until done; record everything observable."""
    reader = module.DataReader(**options)
    outputs = []
    fed = 0
    for view in reused(pieces):
        outputs.append(reader.feed(view))
        fed += 1
        if reader.done:
            break
    if reader.done:
        with pytest.raises(RuntimeError):
            reader.feed(b"")
    return {
        "outputs": outputs,
        "size": reader.size,
        "error": reader.error,
        "done": reader.done,
        "trailing": reader.trailing,
        "rest": b"".join(pieces[fed:]),
    }


def run_lines(module: ModuleType, pieces: list[bytes], options: dict[str, Any]) -> dict[str, Any]:
    """Feed pieces, resuming after every stop; record each call's result."""
    reader = module.LineReader(**options)
    calls = []
    for view in reused(pieces):
        calls.append((reader.feed(view), reader.pending))
        while reader.pending:
            more = reader.feed(b"")
            calls.append((more, reader.pending))
            if not more:
                break
    lines = [line for result, _ in calls for line in result]
    return {"calls": calls, "lines": lines, "pending": reader.take_pending()}


def run_bdat(module: ModuleType, pieces: list[bytes], args: tuple[int, int, int]) -> list[Any]:
    reader = module.BdatReader(*args)
    seen: list[Any] = []
    for view in reused(pieces):
        if reader.done:
            break
        out = reader.feed(view)
        seen.append((out, reader.size, reader.remaining, reader.error, reader.done))
    seen.append(reader.trailing)
    return seen


# --- DataReader ------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), stream=streams, max_size=sizes, limit=limits, policy=policies)
def test_data_matches_reference(
    parser: ModuleType, data: st.DataObject, stream: bytes, max_size: int, limit: int, policy: str
) -> None:
    pieces = data.draw(splits(stream))
    options = {"max_size": max_size, "max_line_length": limit, "bare_newline": policy}
    got = run_data(parser, pieces, options)
    out, size, error, end = ref_data(stream, max_size, limit, policy == "normalize")
    assert got["error"] == error
    assert got["size"] == size
    assert got["done"] is (end is not None)
    joined = b"".join(got["outputs"])
    if error is None:
        assert joined == out  # so independent of the split points
    else:
        assert out.startswith(joined)  # what came out before the error is message
    if end is not None:
        assert got["trailing"] + got["rest"] == stream[end:]
    else:
        assert got["trailing"] == b""


@SETTINGS
@given(data=st.data(), stream=streams, max_size=sizes, limit=limits, policy=policies)
def test_data_split_independent(
    parser: ModuleType, data: st.DataObject, stream: bytes, max_size: int, limit: int, policy: str
) -> None:
    options = {"max_size": max_size, "max_line_length": limit, "bare_newline": policy}
    first = run_data(parser, data.draw(splits(stream)), options)
    second = run_data(parser, data.draw(splits(stream)), options)
    for key in ("size", "error", "done"):
        assert first[key] == second[key]
    assert first["trailing"] + first["rest"] == second["trailing"] + second["rest"]
    if first["error"] is None:
        assert b"".join(first["outputs"]) == b"".join(second["outputs"])


body_lines = st.lists(
    st.lists(
        st.one_of(
            st.sampled_from([b".", b"..", b"A", b"\x00", b"\xff", b" "]), st.binary(max_size=3)
        ),
        max_size=10,
    ).map(lambda parts: b"".join(parts).replace(b"\r", b"").replace(b"\n", b"")),
    max_size=30,
)


@SETTINGS
@given(data=st.data(), lines=body_lines, policy=policies)
def test_data_round_trip(
    parser: ModuleType, data: st.DataObject, lines: list[bytes], policy: str
) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." if line[:1] == b"." else b"") + line + b"\r\n" for line in lines)
    stream = stuffed + b".\r\nRSET\r\n"
    got = run_data(parser, data.draw(splits(stream)), {"bare_newline": policy})
    assert got["done"]
    assert got["error"] is None
    assert b"".join(got["outputs"]) == body
    assert got["size"] == len(body)
    assert got["trailing"] + got["rest"] == b"RSET\r\n"


@needs_compiled
@SETTINGS
@given(data=st.data(), stream=streams, max_size=sizes, limit=limits, policy=policies)
def test_data_implementations_agree(
    data: st.DataObject, stream: bytes, max_size: int, limit: int, policy: str
) -> None:
    assert C is not None
    pieces = data.draw(splits(stream))
    options = {"max_size": max_size, "max_line_length": limit, "bare_newline": policy}
    assert run_data(C, pieces, options) == run_data(PY, pieces, options)


# --- LineReader ------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), stream=streams, limit=limits, policy=policies)
def test_lines_match_reference(
    parser: ModuleType, data: st.DataObject, stream: bytes, limit: int, policy: str
) -> None:
    options = {"max_line_length": limit, "bare_newline": policy}
    got = run_lines(parser, data.draw(splits(stream)), options)
    lines, pending = ref_lines(stream, limit, policy == "normalize")
    assert got["lines"] == lines
    assert got["pending"] == pending


@needs_compiled
@SETTINGS
@given(data=st.data(), stream=streams, limit=limits, policy=policies)
def test_lines_implementations_agree(
    data: st.DataObject, stream: bytes, limit: int, policy: str
) -> None:
    assert C is not None
    pieces = data.draw(splits(stream))
    options = {"max_line_length": limit, "bare_newline": policy}
    assert run_lines(C, pieces, options) == run_lines(PY, pieces, options)


# --- BdatReader and split_command ------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(),
    stream=st.binary(max_size=40),
    size=st.integers(0, 50),
    max_size=sizes,
    received=st.integers(0, 60),
)
def test_bdat_matches_model(
    parser: ModuleType,
    data: st.DataObject,
    stream: bytes,
    size: int,
    max_size: int,
    received: int,
) -> None:
    pieces = data.draw(splits(stream))
    reader = parser.BdatReader(size, max_size, received)
    out = []
    fed = 0
    for view in reused(pieces):
        if reader.done:
            break
        out.append(reader.feed(view))
        fed += 1
    got = min(size, len(stream))
    too_large = bool(max_size) and received + got > max_size
    assert reader.error == (MessageTooLarge() if too_large else None)
    assert reader.done is (len(stream) >= size)
    assert reader.size == received + got
    assert reader.remaining == size - got
    if not too_large:
        assert b"".join(out) == stream[:size]
    if reader.done:
        assert reader.trailing + b"".join(pieces[fed:]) == stream[size:]


@needs_compiled
@SETTINGS
@given(
    data=st.data(),
    stream=st.binary(max_size=40),
    size=st.integers(0, 50),
    max_size=sizes,
    received=st.integers(0, 60),
)
def test_bdat_implementations_agree(
    data: st.DataObject, stream: bytes, size: int, max_size: int, received: int
) -> None:
    assert C is not None
    pieces = data.draw(splits(stream))
    args = (size, max_size, received)
    assert run_bdat(C, pieces, args) == run_bdat(PY, pieces, args)


@needs_compiled
@SETTINGS
@given(line=st.one_of(token_streams, st.binary(max_size=20)))
def test_split_command_implementations_agree(line: bytes) -> None:
    assert C is not None
    assert C.split_command(line) == PY.split_command(line)
    assert C.split_command(memoryview(line)) == PY.split_command(bytearray(line))


# --- scan_path -------------------------------------------------------------------------------

CORES = [PY] if C is None else [PY, C]
ATEXT = b"abxyzABZ0189!#$%&'*+-/=?^_`{|}~"
LDH = b"abzAZ09-"
ALNUM = b"abzAZ09"
# One of each fallback form's marks, and bytes that are never part of a simple path.
PATH_NOISE = [
    b" ", b"  ", b"\t", b'"', b"\\", b"(", b",", b":", b";", b"[", b"]", b"<", b">", b"@",
    b".", b"..", b"-", b"_", b"\x00", b"\x7f", b"\x80", b"\xc3\xa9", b"\xff", b"\r\n", b"\x1a",
]  # fmt: skip
PATH_FORMS = [
    b"<>", b"<Postmaster>", b"<postmaster>", b"<@a.example,@b.example:x@y.example>",
    b'<"x y"@d.example>', b"<a@[192.0.2.1]>", b"<a@[IPv6:::1]>", b"a@b.example",
    b"<a@b.example", b"<j\xc3\xb6rg@b.example>", b"<a@b\xc3\xbccher.example>",
]  # fmt: skip
TAILS = [
    b"", b" SIZE=1", b"  BODY=8BITMIME SMTPUTF8", b"   ", b"x", b"\t", b">", b" \xff",
    b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b", b" \xc3\xa9=1",
]  # fmt: skip


def runs_of(alphabet: bytes) -> st.SearchStrategy[bytes]:
    """Bytes of ``alphabet``: a few mixed ones, or one repeated, often to near the limits."""
    mixed = st.lists(st.sampled_from(alphabet), min_size=1, max_size=6).map(bytes)
    repeated = st.tuples(
        st.sampled_from(alphabet), st.one_of(st.integers(1, 4), st.integers(58, 70))
    ).map(lambda t: bytes([t[0]]) * t[1])
    return st.one_of(mixed, repeated)


# A label that is valid but for its length (mostly), or any run of LDH bytes (a hyphen at an end).
let_dig = st.sampled_from([bytes([c]) for c in ALNUM])
labels = st.one_of(
    st.tuples(let_dig, st.just(b"") | runs_of(LDH), let_dig).map(b"".join),
    let_dig,
    runs_of(LDH),
)
random_paths = st.tuples(
    st.lists(runs_of(ATEXT), min_size=1, max_size=3).map(b".".join),
    st.lists(labels, min_size=1, max_size=4).map(b".".join),
).map(lambda t: b"<" + t[0] + b"@" + t[1] + b">")


@st.composite
def boundary_paths(draw: st.DrawFn) -> bytes:
    """``<local@domain>`` at the RFC 5321 4.5.3.1 limits: a local part of 63-65 octets, a path
    of 255-257, labels of 62-64."""
    local_size = draw(st.sampled_from([64, 65, 63, 1, 30]))
    path_size = draw(st.sampled_from([256, 257, 255, 100]))
    local = bytearray(b"l" * local_size)
    if local_size > 2 and draw(st.booleans()):
        local[draw(st.integers(1, local_size - 2))] = ord(".")
    label_size = draw(st.sampled_from([63, 64, 62, 7]))
    domain_size = path_size - local_size - 3
    unit = b"d" * label_size + b"."
    domain = (unit * (domain_size // len(unit) + 1))[:domain_size]
    if domain.endswith(b"."):
        domain = domain[:-2] + b".e"
    return b"<" + bytes(local) + b"@" + domain + b">"


simple_paths = st.one_of(random_paths, boundary_paths())


@st.composite
def path_arguments(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(argument, keyword)``: a MAIL/RCPT argument, most often a simple path or nearly one.

    (Hypothesis favours the first of the choices and small integers: the common case first.)
    """
    keyword = draw(st.sampled_from([b"FROM:", b"TO:"]))
    kind = draw(st.sampled_from(["path", "near", "path", "near", "other form", "any bytes"]))
    if kind == "any bytes":
        return draw(st.binary(max_size=30)), keyword
    good = [keyword, keyword.lower(), keyword.capitalize()]
    # Keywords that must not match: the other one, cut short, spaced, empty, 8-bit, no colon.
    bad = [b"TO:" if keyword == b"FROM:" else b"FROM:", keyword[:-1], keyword[:-1] + b" :"]
    bad += [b"", b"\xc6ROM:", b"FROM\x1a"]
    written = draw(st.sampled_from(good) | st.sampled_from(bad)) if kind == "near" else keyword
    spaces = draw(st.sampled_from([b"", b" ", b"   "]))
    path = draw(st.sampled_from(PATH_FORMS) if kind == "other form" else simple_paths)
    argument = bytearray(written + spaces + path + draw(st.sampled_from(TAILS)))
    if kind == "near":  # one or two bytes changed, added or removed, now and then
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
            at = draw(st.integers(0, len(argument)))
            op = draw(st.sampled_from(["insert", "replace", "delete"]))
            noise = draw(st.sampled_from(PATH_NOISE))
            if op == "insert":
                argument[at:at] = noise
            elif op == "replace":
                argument[at : at + len(noise)] = noise
            else:
                del argument[at : at + 1]
    return bytes(argument), keyword


# The references the long fuzzer checks scan_path against, shared with it.
after_keyword = fuzz_parser.after_keyword
python_fast_path = fuzz_parser.ref_scan_path


@SETTINGS
@given(case=path_arguments())
def test_scan_path_is_the_python_fast_path(case: tuple[bytes, bytes]) -> None:
    argument, keyword = case
    expected = python_fast_path(argument, keyword)
    event("simple path" if expected is not None else "not simple")  # --hypothesis-show-statistics
    for core in CORES:
        got = core.scan_path(argument, keyword)
        if expected is None:
            assert got is None, core.__name__
        else:
            assert got is not None, core.__name__
            local_part, domain, rest = got
            assert (local_part, domain, rest.decode("utf-8", "surrogateescape")) == expected
    if expected is None:
        return
    # The general parser reads the same address and the same parameters text...
    text = after_keyword(argument, keyword)
    assert text is not None
    address, rest_text = parse_path(
        text, allow_null=True, allow_utf8=True, allow_postmaster=keyword == b"TO:"
    )
    assert (address.local_part, address.domain, rest_text) == expected
    assert address == f"{expected[0]}@{expected[1]}"
    # ...and so does the whole command line, unless it refuses the parameters (or a rest that
    # is not UTF-8): never the path.
    verb = b"MAIL " if keyword == b"FROM:" else b"RCPT "
    try:
        command = parse_command(verb + argument, smtputf8=True)
    except AddressError as error:
        pytest.fail(f"the general parser refused the path: {error!r}")
    except CommandSyntaxError:
        return
    if isinstance(command, MailCommand):
        address = command.return_path
    else:
        assert isinstance(command, RcptCommand)
        address = command.recipient_address
    assert (address.local_part, address.domain) == expected[:2]


@needs_compiled
@SETTINGS
@given(
    case=st.one_of(
        path_arguments(),
        st.tuples(
            st.one_of(token_streams, st.binary(max_size=40)),
            st.sampled_from([b"FROM:", b"TO:", b"", b"<", b"from:", b"\xff:"]),
        ),
    )
)
def test_scan_path_implementations_agree(case: tuple[bytes, bytes]) -> None:
    assert C is not None
    argument, keyword = case
    expected = PY.scan_path(argument, keyword)
    assert C.scan_path(argument, keyword) == expected
    assert C.scan_path(memoryview(argument), keyword) == PY.scan_path(bytearray(argument), keyword)
