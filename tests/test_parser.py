"""Bytes-in/bytes-out vectors for the parsing core, against both implementations.

Every vector goes through a ``*_tr`` helper (after h11's ``tr()``) that feeds it three ways:
whole, one byte at a time, and whole followed by more data, each piece through a reused
buffer that is scribbled over after every call (as the session does with its pooled buffers).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from alephsmtp.errors import (
    BareCarriageReturn,
    BareLineFeed,
    LineTooLong,
    MessageTooLarge,
    SmtpError,
)

NO_EXTENSIONS = bool(os.environ.get("ALEPHSMTP_NO_EXTENSIONS"))
EXTRA = b"QUIT\r\n"
LTL = LineTooLong()
BLF = BareLineFeed()
BCR = BareCarriageReturn()
MTL = MessageTooLarge()


# --- helpers ---------------------------------------------------------------------------------


def pieces_of(stream: bytes, mode: str) -> list[bytes]:
    """The pieces a stream is fed in: ``whole``, ``bytes`` (one at a time) or ``extra``."""
    if mode == "whole":
        return [stream]
    if mode == "bytes":
        return [stream[i : i + 1] for i in range(len(stream))]
    assert mode == "extra"
    return [stream + EXTRA]


def reused(pieces: list[bytes]) -> Iterator[memoryview]:
    """Each piece as a memoryview of one bytearray, scribbled over after each use."""
    size = max((len(piece) for piece in pieces), default=0)
    buf = bytearray(size)
    for piece in pieces:
        buf[: len(piece)] = piece
        yield memoryview(buf)[: len(piece)]
        buf[:] = b"\xee" * size


def drain(reader: Any, lines: list[Any]) -> list[Any]:
    """Resume a LineReader stopped by the STOP RULE until it makes no more progress."""
    while reader.pending:
        more = reader.feed(b"")
        if not more:
            break
        lines.extend(more)
    return lines


def lines_tr(
    parser: ModuleType,
    stream: bytes,
    expected: list[bytes | SmtpError],
    pending: bytes = b"",
    *,
    extra: bool = True,
    **options: Any,
) -> None:
    """Feed ``stream`` to LineReaders three ways; all must give ``expected`` and ``pending``."""
    for mode in ("whole", "bytes", "extra"):
        if mode == "extra" and not extra:
            continue
        reader = parser.LineReader(**options)
        lines: list[Any] = []
        for view in reused(pieces_of(stream, mode)):
            lines.extend(reader.feed(view))
            drain(reader, lines)
        want = list(expected)
        want_pending = pending
        if mode == "extra":
            if pending:
                want_pending = pending + EXTRA
            else:
                want.append(EXTRA[:-2])
        assert lines == want, mode
        assert all(type(line) is bytes or isinstance(line, SmtpError) for line in lines)
        assert reader.pending == len(want_pending), mode
        assert reader.take_pending() == want_pending, mode
        assert reader.pending == 0


def data_tr(
    parser: ModuleType,
    stream: bytes,
    expected: bytes | None,
    *,
    error: SmtpError | None = None,
    size: int | None = None,
    done: bool = True,
    trailing: bytes = b"",
    **options: Any,
) -> None:
    """Feed ``stream`` to DataReaders three ways; check output, error, size, done, trailing.

    ``expected`` is the whole message (checked only while no error is set).
    """
    for mode in ("whole", "bytes", "extra"):
        if mode == "extra" and not done:
            continue
        reader = parser.DataReader(**options)
        pieces = pieces_of(stream, mode)
        outputs: list[bytes] = []
        fed = 0
        error_seen = False
        for view in reused(pieces):
            out = reader.feed(view)
            fed += 1
            assert type(out) is bytes
            if error_seen or reader.error is not None:
                assert out == b"", mode
                error_seen = True
            outputs.append(out)
            if reader.done:
                break
        rest = b"".join(pieces[fed:])
        assert reader.error == error, mode
        assert reader.done is done, mode
        if error is None:
            assert b"".join(outputs) == expected, mode
            assert reader.size == len(expected), mode
        if size is not None:
            assert reader.size == size, mode
        if done:
            want_trailing = trailing + EXTRA if mode == "extra" else trailing
            assert type(reader.trailing) is bytes
            assert reader.trailing + rest == want_trailing, mode
            with pytest.raises(RuntimeError):
                reader.feed(b"x")
        else:
            assert reader.trailing == b""
            assert rest == b""


def bdat_tr(
    parser: ModuleType,
    size: int,
    stream: bytes,
    expected: bytes | None,
    *,
    trailing: bytes = b"",
    error: SmtpError | None = None,
    max_size: int = 0,
    received: int = 0,
) -> None:
    """Feed ``stream`` to BdatReaders three ways."""
    done = len(stream) >= size
    for mode in ("whole", "bytes", "extra"):
        if mode == "extra" and not done:
            continue
        reader = parser.BdatReader(size, max_size, received)
        pieces = pieces_of(stream, mode)
        outputs = []
        fed = 0
        for view in reused(pieces):
            if reader.done:
                break
            outputs.append(reader.feed(view))
            fed += 1
        rest = b"".join(pieces[fed:])
        assert reader.error == error, mode
        assert reader.done is done, mode
        if error is None:
            assert b"".join(outputs) == expected
        got = min(len(stream), size)
        assert reader.size == received + got
        assert reader.remaining == size - got
        if done:
            want_trailing = trailing + EXTRA if mode == "extra" else trailing
            assert reader.trailing + rest == want_trailing, mode


# --- the compiled core is there --------------------------------------------------------------


@pytest.mark.skipif(NO_EXTENSIONS, reason="ALEPHSMTP_NO_EXTENSIONS is set")
def test_compiled_core_loaded() -> None:
    # Fails (does not skip) when the extension was not built: run setup.py build_ext first.
    module = importlib.import_module("alephsmtp._parser")
    for name in ("BufferPool", "LineReader", "DataReader", "BdatReader", "split_command"):
        assert hasattr(module, name)
    assert module.scan_path(b"FROM:<a@b>", b"FROM:") == ("a", "b", b"")


def test_implementation_in_use() -> None:
    from alephsmtp import parser

    if NO_EXTENSIONS:
        assert parser.IMPLEMENTATION == "python"
        core = importlib.import_module("alephsmtp._parser_py")
    else:
        assert parser.IMPLEMENTATION == "cython"
        core = importlib.import_module("alephsmtp._parser")
    # parser.py re-exports every name of the core, and each one from the core it picked.
    assert sorted(parser.__all__) == sorted(["IMPLEMENTATION", *core.__all__])
    for name in core.__all__:
        assert getattr(parser, name) is getattr(core, name), name


def test_no_extensions_forces_python() -> None:
    env = dict(os.environ, ALEPHSMTP_NO_EXTENSIONS="1")
    code = "from alephsmtp.parser import IMPLEMENTATION; print(IMPLEMENTATION)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "python"


def test_same_api(parser: ModuleType) -> None:
    twin = importlib.import_module("alephsmtp._parser_py")
    assert sorted(parser.__all__) == sorted(twin.__all__)
    assert {"split_command", "scan_path"} <= set(parser.__all__)
    for name in ("BufferPool", "LineReader", "DataReader", "BdatReader"):
        public = {a for a in dir(getattr(twin, name)) if not a.startswith("_")}
        assert public <= set(dir(getattr(parser, name))), name


def test_non_contiguous_memoryview(parser: ModuleType) -> None:
    def strided(data: bytes) -> memoryview:
        return memoryview(bytes(b for c in data for b in (c, 0)))[::2]

    assert parser.LineReader().feed(strided(b"NOOP\r\nRS")) == [b"NOOP"]
    assert parser.DataReader().feed(strided(b"a\r\n..\r\n.\r\n")) == b"a\r\n.\r\n"
    assert parser.BdatReader(2).feed(strided(b"abc")) == b"ab"
    assert parser.split_command(strided(b"ehlo x")) == (b"EHLO", b"x")
    assert parser.scan_path(strided(b"to:<a@b> X"), b"TO:") == ("a", "b", b"X")


# --- BufferPool ------------------------------------------------------------------------------


def test_pool_counters_and_reuse(parser: ModuleType) -> None:
    pool = parser.BufferPool(8, 2)
    assert (pool.buffer_size, pool.max_free) == (8, 2)
    assert (pool.allocated, pool.in_use, pool.free) == (0, 0, 0)
    a = pool.acquire()
    b = pool.acquire()
    c = pool.acquire()
    assert type(a) is bytearray
    assert len(a) == 8
    assert a == bytearray(8)
    assert len({id(a), id(b), id(c)}) == 3
    assert (pool.allocated, pool.in_use, pool.free) == (3, 3, 0)
    a[:] = b"abcdefgh"
    pool.release(a)
    assert (pool.allocated, pool.in_use, pool.free) == (3, 2, 1)
    again = pool.acquire()
    assert again is a  # reused, as it was left
    assert again == b"abcdefgh"
    assert (pool.allocated, pool.in_use, pool.free) == (3, 3, 0)
    pool.release(a)
    pool.release(b)
    pool.release(c)  # max_free reached: dropped
    assert (pool.allocated, pool.in_use, pool.free) == (2, 0, 2)
    assert pool.acquire() is b  # last in, first out
    assert pool.allocated == pool.in_use + pool.free


def test_pool_max_free_zero(parser: ModuleType) -> None:
    pool = parser.BufferPool(4, 0)
    buf = pool.acquire()
    pool.release(buf)
    assert (pool.allocated, pool.in_use, pool.free) == (0, 0, 0)
    assert pool.acquire() is not buf


def test_pool_wrong_release(parser: ModuleType) -> None:
    pool = parser.BufferPool(4)
    buf = pool.acquire()
    with pytest.raises(ValueError, match="byte"):
        pool.release(bytearray(5))
    buf.append(0)
    with pytest.raises(ValueError, match="byte"):
        pool.release(buf)  # resized by its user
    del buf[4:]
    with pytest.raises(TypeError):
        pool.release(bytes(4))  # type: ignore[arg-type]
    pool.release(buf)
    with pytest.raises(ValueError, match="acquire"):
        pool.release(bytearray(4))  # more releases than acquires
    assert (pool.allocated, pool.in_use, pool.free) == (1, 0, 1)


def test_pool_defaults_and_arguments(parser: ModuleType) -> None:
    pool = parser.BufferPool()
    assert (pool.buffer_size, pool.max_free) == (16384, 64)
    for bad in ((0, 1), (-1, 1), (8, -1)):
        with pytest.raises(ValueError, match=r"buffer_size|max_free"):
            parser.BufferPool(*bad)
    with pytest.raises(TypeError):
        parser.BufferPool(8.0)
    with pytest.raises(AttributeError):
        pool.in_use = 3


# --- LineReader ------------------------------------------------------------------------------


def test_lines_single_and_pipelined(parser: ModuleType) -> None:
    lines_tr(parser, b"EHLO client.example\r\n", [b"EHLO client.example"])
    lines_tr(
        parser,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nNOOP\r\n",
        [b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"RCPT TO:<e@f>", b"NOOP"],
    )
    lines_tr(parser, b"\r\n\r\n", [b"", b""])
    lines_tr(parser, b"NOOP \xff\x00\x80\r\n", [b"NOOP \xff\x00\x80"])


def test_lines_incomplete_tail(parser: ModuleType) -> None:
    lines_tr(parser, b"NOOP\r\nHEL", [b"NOOP"], b"HEL", extra=False)
    lines_tr(parser, b"NOOP\r", [], b"NOOP\r", extra=False)
    lines_tr(parser, b"", [], b"")
    reader = parser.LineReader()
    assert reader.feed(b"HE") == []
    assert reader.feed(b"LO x") == []
    assert reader.pending == 6
    assert reader.feed(b"\r") == []
    assert reader.feed(b"\nNO") == [b"HELO x"]
    assert reader.take_pending() == b"NO"


def test_lines_limit(parser: ModuleType) -> None:
    ten = {"max_line_length": 10}
    lines_tr(parser, b"x" * 8 + b"\r\n", [b"x" * 8], **ten)  # exactly 10
    lines_tr(parser, b"x" * 9 + b"\r\n", [LTL], **ten)  # 11
    lines_tr(parser, b"x" * 9 + b"\n", [b"x" * 9], bare_newline="normalize", **ten)  # 10
    lines_tr(parser, b"x" * 10 + b"\n", [LTL], bare_newline="normalize", **ten)
    lines_tr(parser, b"x" * 9 + b"\r", [], b"", extra=False, **ten)  # 10 held: discarded
    lines_tr(parser, b"x" * 8 + b"\r\r\n", [LTL], **ten)  # LineTooLong wins over bare CR
    lines_tr(parser, b"x" * 10 + b"\n", [LTL], **ten)  # and over bare LF
    lines_tr(parser, b"x" * 2000 + b"\r\nNOOP\r\n", [LTL, b"NOOP"], **ten)
    lines_tr(
        parser,
        b"NOOP\r\n" + b"y" * 50 + b"\r\nRSET\r\n" + b"z" * 11 + b"\r\n",
        [b"NOOP", LTL, b"RSET", LTL],
        **ten,
    )
    lines_tr(parser, b"x" * 5000 + b"\r\n", [b"x" * 5000], max_line_length=0)


def test_lines_limit_discards_while_scanning(parser: ModuleType) -> None:
    reader = parser.LineReader(10)
    assert reader.feed(b"x" * 9) == []
    assert reader.pending == 9
    assert reader.feed(b"x") == []  # 10 held bytes without LF: can only be too long
    assert reader.pending == 0
    assert reader.feed(b"x" * 100) == []
    assert reader.pending == 0
    assert reader.feed(b"xx\r\nNOOP\r\nQU") == [LTL, b"NOOP"]
    assert reader.take_pending() == b"QU"
    # take_pending() ends a discard: the discarded line is never reported.
    assert reader.feed(b"y" * 20) == []
    assert reader.take_pending() == b""
    assert reader.feed(b"NOOP\r\n") == [b"NOOP"]


def test_lines_limit_is_read_only(parser: ModuleType) -> None:
    reader = parser.LineReader(1000)
    assert reader.max_line_length == 1000
    assert reader.feed(b"x" * 600 + b"\r\n") == [b"x" * 600]
    with pytest.raises(AttributeError):
        reader.max_line_length = 0
    assert parser.LineReader(0).feed(b"x" * 6000 + b"\r\n") == [b"x" * 6000]
    with pytest.raises(ValueError, match="negative"):
        parser.LineReader(-1)


def test_lines_bare_lf_and_cr_reject(parser: ModuleType) -> None:
    lines_tr(parser, b"NOOP\n", [BLF])
    lines_tr(parser, b"A\nB\r\n", [BLF, b"B"])
    lines_tr(parser, b"\n", [BLF])
    lines_tr(parser, b"NO\rOP\r\n", [BCR])
    lines_tr(parser, b"NOOP\r\r\n", [BCR])
    lines_tr(parser, b"\rNOOP\r\nRSET\r\n", [BCR, b"RSET"])
    lines_tr(parser, b"NO\rOP\n", [BLF])  # bare LF first
    lines_tr(parser, b"A\r\n\nB\r\n", [b"A", BLF, b"B"])


def test_lines_bare_lf_and_cr_normalize(parser: ModuleType) -> None:
    norm = {"bare_newline": "normalize"}
    lines_tr(parser, b"NOOP\n", [b"NOOP"], **norm)
    lines_tr(parser, b"A\nB\r\nC\n", [b"A", b"B", b"C"], **norm)
    lines_tr(parser, b"A\rB\r\n", [b"A\rB"], **norm)
    lines_tr(parser, b"A\r\r\n", [b"A\r"], **norm)
    lines_tr(parser, b"\n\n", [b"", b""], **norm)


@pytest.mark.parametrize(
    "command",
    [b"DATA", b"data", b"DaTa", b"DATAX", b"BDAT 10 LAST", b"bdat 0", b"STARTTLS", b"StartTLS"],
)
def test_lines_stop_rule(parser: ModuleType, command: bytes) -> None:
    rest = b"MAIL FROM:<x>\r\nRCPT TO:<y>\r\n"
    reader = parser.LineReader()
    assert reader.feed(b"NOOP\r\n" + command + b"\r\n" + rest) == [b"NOOP", command]
    assert reader.pending == len(rest)
    assert reader.feed(b"") == [b"MAIL FROM:<x>", b"RCPT TO:<y>"]
    assert reader.pending == 0
    # take_pending() instead of resuming
    reader = parser.LineReader()
    assert reader.feed(command + b"\r\n" + rest + b"PART") == [command]
    assert reader.take_pending() == rest + b"PART"
    assert reader.pending == 0
    assert reader.feed(b"") == []
    # feeding more data resumes too
    reader = parser.LineReader()
    assert reader.feed(command + b"\r\nNO") == [command]
    assert reader.feed(b"OP\r\n") == [b"NOOP"]
    # the tr() helper resumes with feed(b"") after every stop
    lines_tr(parser, command + b"\r\n" + rest, [command, b"MAIL FROM:<x>", b"RCPT TO:<y>"])


def test_lines_stop_rule_holds_unscanned_bytes_exactly(parser: ModuleType) -> None:
    body = b"Subject: x\r\n\r\nbare\nlf and a long line " + b"z" * 100 + b"\r\n.\r\n"
    reader = parser.LineReader(20)
    assert reader.feed(b"DATA\r\n" + body) == [b"DATA"]
    assert reader.pending == len(body)  # neither scanned nor limited
    assert reader.take_pending() == body


@pytest.mark.parametrize(
    "line", [b"DAT", b" DATA", b"STARTTL", b"XDATA", b"BDA", b"START TLS", b"MAIL DATA"]
)
def test_lines_not_stopping(parser: ModuleType, line: bytes) -> None:
    reader = parser.LineReader()
    assert reader.feed(line + b"\r\nNOOP\r\n") == [line, b"NOOP"]
    assert reader.pending == 0


def test_lines_errors_do_not_stop(parser: ModuleType) -> None:
    reader = parser.LineReader(10)
    assert reader.feed(b"DATA\nNOOP\r\nDATA" + b" " * 20 + b"\r\nRSET\r\n") == [
        BLF,
        b"NOOP",
        LTL,
        b"RSET",
    ]
    assert reader.pending == 0


def test_lines_arguments(parser: ModuleType) -> None:
    with pytest.raises(ValueError, match="bare_newline"):
        parser.LineReader(512, "strip")
    with pytest.raises(ValueError, match="negative"):
        parser.LineReader(-1)
    reader = parser.LineReader(bare_newline="normalize")
    assert reader.bare_newline == "normalize"
    assert reader.feed(bytearray(b"NOOP\r\n")) == [b"NOOP"]
    with pytest.raises(TypeError):
        reader.feed("NOOP\r\n")
    with pytest.raises(TypeError):
        reader.feed(7)


# --- DataReader ------------------------------------------------------------------------------


def test_data_basic(parser: ModuleType) -> None:
    data_tr(parser, b".\r\n", b"")
    data_tr(parser, b"a\r\n.\r\n", b"a\r\n")
    data_tr(parser, b"\r\n.\r\n", b"\r\n")
    data_tr(parser, b"Subject: hi\r\n\r\nbody\r\n.\r\n", b"Subject: hi\r\n\r\nbody\r\n")
    data_tr(parser, b"a\r\nb", b"a\r\nb", done=False)
    data_tr(parser, b"a\r\n.", b"a\r\n", done=False)  # the dot is held
    data_tr(parser, b"a\r\n.\r", b"a\r\n", done=False)  # the dot and CR are held
    data_tr(parser, b"a\r", b"a\r", done=False)  # a CR inside a line is not held


def test_data_eight_bit_and_nul(parser: ModuleType) -> None:
    body = bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n"
    data_tr(parser, body + b".\r\n", body)
    data_tr(parser, b"\x00\r\n\xff.\xff\r\n.\r\n", b"\x00\r\n\xff.\xff\r\n")


def test_data_dot_stuffing(parser: ModuleType) -> None:
    data_tr(parser, b"..\r\n.\r\n", b".\r\n")
    data_tr(parser, b"...\r\n.\r\n", b"..\r\n")
    data_tr(parser, b".x\r\n.\r\n", b"x\r\n")
    data_tr(parser, b"a\r\n..b\r\n.c\r\nd.\r\n.\r\n", b"a\r\n.b\r\nc\r\nd.\r\n")
    data_tr(parser, b"a.b\r\n. \r\n.\r\n", b"a.b\r\n \r\n")
    data_tr(parser, b"..\r\n..\r\n.\r\n", b".\r\n.\r\n")
    data_tr(parser, b".\x00\r\n.\r\n", b"\x00\r\n")


def test_data_trailing(parser: ModuleType) -> None:
    data_tr(parser, b"a\r\n.\r\nQUIT\r\n", b"a\r\n", trailing=b"QUIT\r\n")
    data_tr(parser, b".\r\n.\r\n", b"", trailing=b".\r\n")
    data_tr(parser, b"a\r\n.\r\n\n\r\x00", b"a\r\n", trailing=b"\n\r\x00")


def test_data_end_mark_split_everywhere(parser: ModuleType) -> None:
    stream = b"ab\r\n..c\r\n.\r\nNOOP\r\n"
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            reader = parser.DataReader()
            out = b""
            pieces = [stream[:i], stream[i:j], stream[j:]]
            for k, piece in enumerate(pieces):
                out += reader.feed(memoryview(bytearray(piece)))
                if reader.done:
                    assert reader.trailing + b"".join(pieces[k + 1 :]) == b"NOOP\r\n"
                    break
            assert reader.done
            assert out == b"ab\r\n.c\r\n"
            assert reader.size == 8


# Each of these must never end the message. (prefix, reject error, normalize output)
SMUGGLING = [
    (b"a\n.\n", BLF, b"a\r\n.\r\n"),
    (b"a\r.\r", BCR, b"a\r.\r"),
    (b"a\n.\r\n", BLF, b"a\r\n.\r\n"),
    (b"a\r\n.\n", BLF, b"a\r\n.\r\n"),
    (b"a\r\n.\r", BCR, b"a\r\n\r"),
    (b"a\r\n.\r\r\n", BCR, b"a\r\n\r\r\n"),
    (b"a\r\n.\rx\r\n", BCR, b"a\r\n\rx\r\n"),
    (b"a\r.\r\n", BCR, b"a\r.\r\n"),
    (b"a\n.\r\r\n", BLF, b"a\r\n\r\r\n"),
    (b"a\r\n\n.\r\n", BLF, b"a\r\n\r\n.\r\n"),
    (b"a\r\r.\r\n", BCR, b"a\r\r.\r\n"),
    (b"a\n\n.\n\n", BLF, b"a\r\n\r\n.\r\n\r\n"),
    (b"\n.\r\n", BLF, b"\r\n.\r\n"),
    (b".\n", BLF, b".\r\n"),
    (b".\r", BCR, b"\r"),
]


@pytest.mark.parametrize(("smuggle", "error", "normalized"), SMUGGLING)
def test_data_smuggling_never_ends(
    parser: ModuleType, smuggle: bytes, error: SmtpError, normalized: bytes
) -> None:
    for tail in (b"Z", b"MAIL FROM:<evil>"):
        data_tr(parser, smuggle + tail, None, error=error, done=False)
        data_tr(parser, smuggle + tail, normalized + tail, done=False, bare_newline="normalize")
    # The real end mark still ends it, later.
    end = b"X\r\n.\r\nNOOP\r\n"
    data_tr(parser, smuggle + end, None, error=error, trailing=b"NOOP\r\n")
    data_tr(
        parser,
        smuggle + end,
        normalized + b"X\r\n",
        trailing=b"NOOP\r\n",
        bare_newline="normalize",
    )


def test_data_end_after_real_crlf_only(parser: ModuleType) -> None:
    # "\r\n" after a bare LF is a real CRLF: the next ".\r\n" is the end mark.
    data_tr(parser, b"a\n\r\n.\r\n", None, error=BLF, size=4)
    data_tr(parser, b"a\n\r\n.\r\n", b"a\r\n\r\n", bare_newline="normalize")
    # A bare CR before a real CRLF does not stop the end mark either.
    data_tr(parser, b"a\r\r\n.\r\n", None, error=BCR, size=4)
    data_tr(parser, b"a\r\r\n.\r\n", b"a\r\r\n", bare_newline="normalize")


def test_data_normalize(parser: ModuleType) -> None:
    norm = {"bare_newline": "normalize"}
    data_tr(parser, b"a\nb\r\n.\r\n", b"a\r\nb\r\n", **norm)
    data_tr(parser, b"a\n.b\n..\r\n.\r\n", b"a\r\nb\r\n.\r\n", **norm)  # unstuffed after LF
    data_tr(parser, b"a\rb\r\n.\r\n", b"a\rb\r\n", **norm)
    data_tr(parser, b"\n\n\r\n.\r\n", b"\r\n\r\n\r\n", **norm)
    # the last ".\r\n" follows the bare LF of ".\n": content, not the end mark
    data_tr(parser, b"x\n.\n.\r\n", b"x\r\n.\r\n.\r\n", done=False, **norm)


def test_data_size_after_error_counts_on(parser: ModuleType) -> None:
    # "a" "\n" (1, not normalized) "bcd\r\n"
    data_tr(parser, b"a\nbcd\r\n.\r\n", None, error=BLF, size=7)
    data_tr(parser, b"a\n..\r\n.\r\n", None, error=BLF, size=5)  # unstuffed
    data_tr(parser, b"a\nbcd\r\n.\r\n", b"a\r\nbcd\r\n", size=8, bare_newline="normalize")


def test_data_size_limit(parser: ModuleType) -> None:
    stream = b"123456\r\n.\r\nMAIL FROM:<a>\r\n"
    data_tr(parser, stream, b"123456\r\n", max_size=8, trailing=b"MAIL FROM:<a>\r\n")
    data_tr(parser, stream, None, error=MTL, size=8, max_size=7, trailing=b"MAIL FROM:<a>\r\n")
    data_tr(parser, b"..\r\n.\r\n", b".\r\n", max_size=3)  # counted unstuffed
    data_tr(parser, b"a\nb\r\n.\r\n", None, error=MTL, max_size=4, bare_newline="normalize")
    data_tr(parser, b"x" * 100_000 + b"\r\n.\r\n", None, error=MTL, size=100_002, max_size=10)


def test_data_size_limit_discards_later_output(parser: ModuleType) -> None:
    for reader in (parser.DataReader(5), parser.DataReader(5, 1000)):
        assert reader.feed(b"1234") == b"1234"
        assert reader.feed(b"56") == b""
        assert reader.error == MTL
        assert reader.feed(b"78\r\n") == b""
        assert reader.feed(b".\r\n") == b""
        assert (reader.done, reader.size) == (True, 10)


def test_data_line_limit(parser: ModuleType) -> None:
    five = {"max_line_length": 5}
    data_tr(parser, b"abc\r\n.\r\n", b"abc\r\n", **five)
    data_tr(parser, b"abcd\r\n.\r\n", None, error=LTL, size=6, **five)
    data_tr(parser, b".abc\r\n.\r\n", b"abc\r\n", **five)  # counted unstuffed
    data_tr(parser, b"..abc\r\n.\r\n", None, error=LTL, **five)
    data_tr(parser, b"abcd\n.\r\n", b"abcd\r\n.\r\n", done=False, bare_newline="normalize", **five)
    data_tr(parser, b"abcde\n", None, error=LTL, done=False, bare_newline="normalize", **five)
    data_tr(parser, b"ab\r\n" * 1000 + b".\r\n", b"ab\r\n" * 1000, max_line_length=4)
    data_tr(parser, b"ab\r\n" * 10 + b"x" * 10_000, None, error=LTL, done=False, **five)
    # the end mark line is not a text line
    data_tr(parser, b"a\r\n.\r\n", b"a\r\n", max_line_length=3)


def test_data_first_error_wins(parser: ModuleType) -> None:
    # bare CR at byte 2 (revealed at 2) before a line too long (at 5)
    data_tr(parser, b"a\rbcdefgh\r\n.\r\n", None, error=BCR, max_line_length=5)
    # line too long (at 5) before the bare LF (at 8)
    data_tr(parser, b"abcdefgh\n.\r\n", None, error=LTL, done=False, max_line_length=5)
    # too large (at 2) before the bare CR (revealed at 4)
    data_tr(parser, b"abc\rd\r\n.\r\n", None, error=MTL, max_size=2)
    # at the same byte: LineTooLong before BareLineFeed before MessageTooLarge
    data_tr(parser, b"abcd\n.\r\n", None, error=LTL, done=False, max_line_length=4, max_size=4)
    data_tr(parser, b"abcd\n.\r\n", None, error=BLF, done=False, max_size=4)
    # at the same byte: BareCarriageReturn (for the CR before) before MessageTooLarge
    data_tr(parser, b"a\rb\r\n.\r\n", None, error=BCR, max_size=2)


def test_data_rare_error_places(parser: ModuleType) -> None:
    norm = {"bare_newline": "normalize"}
    # a ".<CRLF>" line that is content (after a bare LF) breaks a limit at its LF
    data_tr(parser, b"a\n.\r\n", None, error=LTL, done=False, max_line_length=2, **norm)
    data_tr(parser, b"a\n.\r\n", None, error=MTL, done=False, max_size=5, **norm)
    data_tr(parser, b"a\n.\r\n", b"a\r\n.\r\n", done=False, max_size=6, **norm)
    # a CRLF completed at the start of a call takes the size past the limit
    for policy, size in (("reject", 6), ("normalize", 7)):  # "c<LF>" counts 2 or 3
        reader = parser.DataReader(3, bare_newline=policy)
        assert reader.feed(b"ab\r") == b"ab\r"
        assert reader.feed(b"\nc\n") == b""
        assert (reader.error, reader.size) == (MTL, size)
    reader = parser.DataReader(max_line_length=3)
    assert reader.feed(b"ab\r") == b"ab\r"
    assert reader.feed(b"\n\n") == b""
    assert reader.error == LTL


def test_data_runtime_error_after_done(parser: ModuleType) -> None:
    reader = parser.DataReader()
    assert reader.feed(b"a\r\n.\r\n") == b"a\r\n"
    with pytest.raises(RuntimeError):
        reader.feed(b"")
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_data_shared_empty_and_arguments(parser: ModuleType) -> None:
    reader = parser.DataReader()
    assert reader.feed(b"") == b""
    assert reader.feed(b".") == b""
    assert (reader.size, reader.error, reader.done, reader.trailing) == (0, None, False, b"")
    assert (reader.max_size, reader.max_line_length, reader.bare_newline) == (0, 0, "reject")
    with pytest.raises(ValueError, match="max_size"):
        parser.DataReader(-1)
    with pytest.raises(ValueError, match="max_line_length"):
        parser.DataReader(0, -1)
    with pytest.raises(ValueError, match="bare_newline"):
        parser.DataReader(0, 0, "lenient")
    with pytest.raises(TypeError):
        parser.DataReader().feed("text")
    with pytest.raises(AttributeError):
        reader.done = True


def test_data_large_body(parser: ModuleType) -> None:
    line = b"0123456789" * 7 + b"abcdef\r\n"
    body = (line * 50 + b"." + line) * 40
    stream = body + b".\r\n"
    expected = body.replace(b"\r\n.", b"\r\n")
    for size in (1, 7, 4096, 65536, len(stream)):
        reader = parser.DataReader(0, 1000)
        out = []
        for i in range(0, len(stream), size):
            out.append(reader.feed(memoryview(stream)[i : i + size]))
        assert reader.done
        assert b"".join(out) == expected


# --- BdatReader ------------------------------------------------------------------------------


def test_bdat_exact(parser: ModuleType) -> None:
    bdat_tr(parser, 5, b"12345", b"12345")
    bdat_tr(parser, 5, b"12345MAIL", b"12345", trailing=b"MAIL")
    bdat_tr(parser, 5, b"1\r\n.\r\n", b"1\r\n.\r", trailing=b"\n")  # no line rules
    bdat_tr(parser, 8, b"123", b"123")  # not done yet


def test_bdat_split_feeds(parser: ModuleType) -> None:
    reader = parser.BdatReader(6)
    assert reader.feed(b"12") == b"12"
    assert reader.remaining == 4
    assert reader.feed(b"") == b""
    assert reader.feed(bytearray(b"3456")) == b"3456"
    assert reader.done
    assert reader.trailing == b""
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_bdat_zero(parser: ModuleType) -> None:
    reader = parser.BdatReader(0)
    assert reader.done
    assert (reader.size, reader.remaining, reader.trailing) == (0, 0, b"")
    with pytest.raises(RuntimeError):
        reader.feed(b"")


def test_bdat_size_limit(parser: ModuleType) -> None:
    bdat_tr(parser, 5, b"12345NOOP", None, trailing=b"NOOP", error=MTL, max_size=4)
    bdat_tr(parser, 5, b"12345", b"12345", max_size=10, received=5)
    bdat_tr(parser, 5, b"12345", None, error=MTL, max_size=10, received=6)
    reader = parser.BdatReader(3, 10, 11)
    assert reader.error == MTL  # already past the limit
    assert reader.feed(b"abc") == b""
    assert reader.size == 14
    reader = parser.BdatReader(4, 5, 3)
    assert reader.feed(b"ab") == b"ab"
    assert reader.feed(b"c") == b""
    assert reader.error == MTL
    assert reader.feed(b"d") == b""
    assert reader.done


def test_bdat_arguments(parser: ModuleType) -> None:
    for bad in ((-1,), (1, -1), (1, 0, -1)):
        with pytest.raises(ValueError, match="negative"):
            parser.BdatReader(*bad)
    assert parser.BdatReader(3).max_size == 0


# --- split_command ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"mail FROM:<a@b>  ", (b"MAIL", b"FROM:<a@b>")),
        (b"", (b"", b"")),
        (b"   ", (b"", b"")),
        (b"noop", (b"NOOP", b"")),
        (b"NOOP ", (b"NOOP", b"")),
        (b"  ehlo   host.example  ", (b"EHLO", b"host.example")),
        (b"RCPT TO:<a b>", (b"RCPT", b"TO:<a b>")),
        (b"x\tY z", (b"X\tY", b"z")),
        (b"\xe9hlo arg", (b"\xe9HLO", b"arg")),
        (b"Data", (b"DATA", b"")),
        (b"a  b  c ", (b"A", b"b  c")),
        (b"az[`{@", (b"AZ[`{@", b"")),
    ],
)
def test_split_command(parser: ModuleType, line: bytes, expected: tuple[bytes, bytes]) -> None:
    for arg in (line, bytearray(line), memoryview(line)):
        verb, argument = parser.split_command(arg)
        assert (verb, argument) == expected
        assert type(verb) is bytes
        assert type(argument) is bytes


def test_split_command_type(parser: ModuleType) -> None:
    with pytest.raises(TypeError):
        parser.split_command("NOOP")


# --- scan_path -------------------------------------------------------------------------------

# RFC 5322 3.2.3 atext: the 19 symbols plus letters and digits (62, too many for one local part).
ATEXT = b"!#$%&'*+-/=?^_`{|}~09AZaz"
ALNUM = bytes(range(48, 58)) + bytes(range(65, 91)) + bytes(range(97, 123))
LABEL_63 = b"d" + b"-" * 61 + b"9"  # a 63-octet label, hyphens inside
LOCAL_64 = b"l" * 32 + b"." + b"m" * 31  # a 64-octet Dot-string
# 189 octets of domain: with a 64-octet local part, the path "<local@domain>" is 256 octets.
DOMAIN_189 = b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 61


def scan(parser: ModuleType, argument: bytes, keyword: bytes = b"FROM:") -> Any:
    """``scan_path`` of ``argument`` as bytes, bytearray and a memoryview slice of a reused
    buffer scribbled over right after the call; all three must agree. Returns the result."""
    results = [parser.scan_path(argument, keyword), parser.scan_path(bytearray(argument), keyword)]
    buf = bytearray(b"\xee" + argument + b"\xee")
    results.append(parser.scan_path(memoryview(buf)[1:-1], keyword))
    buf[:] = b"\xee" * len(buf)  # what the core kept must not change with the buffer
    assert results[1] == results[0]
    assert results[2] == results[0]
    if results[0] is not None:
        local_part, domain, rest = results[0]
        assert (type(local_part), type(domain), type(rest)) == (str, str, bytes)
    return results[0]


@pytest.mark.parametrize(
    ("argument", "keyword", "expected"),
    [
        (b"FROM:<a@b>", b"FROM:", ("a", "b", b"")),
        (b"TO:<a@b>", b"TO:", ("a", "b", b"")),
        # RFC 5321 2.4: keywords in any case.
        (b"from:<a@b>", b"FROM:", ("a", "b", b"")),
        (b"FrOm:<a@b>", b"FROM:", ("a", "b", b"")),
        (b"tO:<a@b>", b"TO:", ("a", "b", b"")),
        (b"FROM:<a@b>", b"from:", ("a", "b", b"")),
        # Spaces after the colon (common, accepted by the general parser too).
        (b"FROM: <a@b>", b"FROM:", ("a", "b", b"")),
        (b"TO:    <a@b>", b"TO:", ("a", "b", b"")),
        # The rest: the bytes after the spaces that follow ">", unchecked.
        (b"FROM:<a@b> SIZE=100", b"FROM:", ("a", "b", b"SIZE=100")),
        (
            b"FROM:<a@b.example>   SIZE=100 BODY=8BITMIME",
            b"FROM:",
            ("a", "b.example", b"SIZE=100 BODY=8BITMIME"),
        ),
        (b"FROM:<a@b>   ", b"FROM:", ("a", "b", b"")),  # an unstripped argument
        (b"TO:<a@b> NOTIFY=NEVER  ", b"TO:", ("a", "b", b"NOTIFY=NEVER  ")),
        (b"TO:<a@b> \xc3\xa9\xff", b"TO:", ("a", "b", b"\xc3\xa9\xff")),
        (b"TO:<a@b> <x@y>", b"TO:", ("a", "b", b"<x@y>")),
        # Dot-string: every atext character; atoms joined by single dots.
        (b"FROM:<" + ATEXT + b"@b>", b"FROM:", (ATEXT.decode(), "b", b"")),
        (b"FROM:<" + ALNUM + b"@b>", b"FROM:", (ALNUM.decode(), "b", b"")),
        (b"TO:<a@" + ALNUM + b">", b"TO:", ("a", ALNUM.decode(), b"")),
        (b"FROM:<first.last.x@b>", b"FROM:", ("first.last.x", "b", b"")),
        (b"FROM:<postmaster@b>", b"FROM:", ("postmaster", "b", b"")),
        # Domains: LDH labels, digits anywhere, hyphens inside, A-labels.
        (b"TO:<a@mail.sub.example.co.uk>", b"TO:", ("a", "mail.sub.example.co.uk", b"")),
        (b"TO:<a@1-2.3com>", b"TO:", ("a", "1-2.3com", b"")),
        (b"TO:<a@xn--bcher-kva.example>", b"TO:", ("a", "xn--bcher-kva.example", b"")),
        (b"TO:<a@b--c.D>", b"TO:", ("a", "b--c.D", b"")),
        (b"TO:<a@192.0.2.1>", b"TO:", ("a", "192.0.2.1", b"")),  # digits: a name, not a literal
        # Any bytes keyword; an empty one reads the path at once.
        (b"<a@b>", b"", ("a", "b", b"")),
        (b" <a@b>", b"", ("a", "b", b"")),
    ],
)
def test_scan_path_accepts(
    parser: ModuleType, argument: bytes, keyword: bytes, expected: tuple[str, str, bytes]
) -> None:
    assert scan(parser, argument, keyword) == expected


@pytest.mark.parametrize(
    "argument",
    [
        # Another keyword, or a broken one.
        b"", b"FROM", b"FROM:", b"FROM: ", b"FRO:<a@b>", b"TO:<a@b>", b"FROM :<a@b>",
        b"FROM<a@b>", b" FROM:<a@b>", b"FROM;<a@b>", b"FROM\x1a<a@b>", b"FR\xcfM:<a@b>",
        b"\xc6ROM:<a@b>", b"MAIL FROM:<a@b>",
        # Only spaces may follow the colon.
        b"FROM:\t<a@b>", b"FROM:\r\n<a@b>", b"FROM:x<a@b>",
        # The null path, Postmaster, source routes: the general parser's.
        b"FROM:<>", b"FROM:<> SIZE=1", b"FROM:<Postmaster>", b"FROM:<postmaster>",
        b"FROM:<@relay.example:a@b>", b"FROM:<@r1.example,@r2.example:a@b>",
        # Quoted local parts and address literals.
        b'FROM:<"a"@b>', b'FROM:<"john doe"@b>', b'FROM:<"a\\"b"@b>',
        b"FROM:<a@[192.0.2.1]>", b"FROM:<a@[IPv6:2001:db8::1]>", b"FROM:<a@[tag:x]>",
        # Non-ASCII anywhere in the path (RFC 6531): the general parser decides.
        b"FROM:<j\xc3\xb6rg@b>", b"FROM:<a@b\xc3\xbccher.example>", b"FROM:<\x80@b>",
        b"FROM:<a@b\xff>", b"FROM:<a\xff@b>",
        # No angle brackets, or only one.
        b"FROM:a@b", b"FROM:a@b SIZE=1", b"FROM:<a@b", b"FROM:a@b>", b"FROM:<a@b SIZE=1",
        b"FROM:<<a@b>>", b"FROM:<a@b>>",
        # Dot-string faults.
        b"FROM:<@b>", b"FROM:<.a@b>", b"FROM:<a.@b>", b"FROM:<a..b@b>", b"FROM:<a b@b>",
        b"FROM:<a(c)@b>", b"FROM:<a\\b@b>", b"FROM:<a,b@b>", b"FROM:<a;b@b>", b"FROM:<a:b@b>",
        b"FROM:<a\x00@b>", b"FROM:<a\x7f@b>", b"FROM:<a@b@c>", b"FROM:<a[@b>",
        # Domain faults.
        b"FROM:<a@>", b"FROM:<a@.b>", b"FROM:<a@b.>", b"FROM:<a@b..c>", b"FROM:<a@-b>",
        b"FROM:<a@b->", b"FROM:<a@b-.c>", b"FROM:<a@b.-c>", b"FROM:<a@b_c>", b"FROM:<a@b c>",
        b"FROM:<a@b!c>", b"FROM:<a@b:25>",
        # After ">": the end, or spaces then the rest; nothing else.
        b"FROM:<a@b>x", b"FROM:<a@b>\tSIZE=1", b"FROM:<a@b>,", b"FROM:<a@b>\x00",
        b"FROM:<a@b>\r\n",
    ],
)  # fmt: skip
def test_scan_path_refuses(parser: ModuleType, argument: bytes) -> None:
    assert scan(parser, argument) is None


def test_scan_path_limits(parser: ModuleType) -> None:
    # RFC 5321 4.5.3.1.1: a local part of 64 octets, not 65.
    assert scan(parser, b"FROM:<" + LOCAL_64 + b"@b>") == (LOCAL_64.decode(), "b", b"")
    assert scan(parser, b"FROM:<" + LOCAL_64 + b"x@b>") is None
    assert scan(parser, b"FROM:<" + b"x" * 65 + b"@b>") is None
    # RFC 1035 2.3.4: a label of 63 octets, not 64 (first, middle or last).
    for domain in (LABEL_63, LABEL_63 + b".b", b"a." + LABEL_63 + b".b", b"a." + LABEL_63):
        assert scan(parser, b"TO:<a@" + domain + b">", b"TO:") == ("a", domain.decode(), b"")
        long_label = domain.replace(LABEL_63, LABEL_63 + b"x")
        assert scan(parser, b"TO:<a@" + long_label + b">", b"TO:") is None
    # RFC 5321 4.5.3.1.3: the path, "<" and ">" included, of 256 octets, not 257, whichever
    # part is the longer.
    path = b"<" + LOCAL_64 + b"@" + DOMAIN_189 + b">"
    assert len(path) == 256
    assert scan(parser, b"FROM:" + path + b" SIZE=1") == (
        LOCAL_64.decode(),
        DOMAIN_189.decode(),
        b"SIZE=1",
    )
    assert scan(parser, b"FROM:<" + LOCAL_64 + b"@" + DOMAIN_189 + b"d>") is None
    assert scan(parser, b"FROM:<" + LOCAL_64 + b"@" + DOMAIN_189 + b".d>") is None
    short_local = b"x" * 3
    domain = DOMAIN_189 + b"." + b"e" * (256 - 3 - len(short_local) - len(DOMAIN_189) - 1)
    assert len(short_local) + len(domain) + 3 == 256
    assert scan(parser, b"FROM:<xxx@" + domain + b">") == ("xxx", domain.decode(), b"")
    assert scan(parser, b"FROM:<xxxx@" + domain + b">") is None
    # A long argument is read to its end: no limit on the rest, no quadratic rescans.
    rest = b"X-PAD=" + b"p" * 100_000
    assert scan(parser, b"FROM:<a@b> " + rest) == ("a", "b", rest)
    assert scan(parser, b"FROM:<" + b"a." * 50_000 + b"a@b>") is None


def test_scan_path_agrees_with_parse_path(parser: ModuleType) -> None:
    """Every accepted vector above: the general Python path parser reads the same parts."""
    from alephsmtp.addresses import parse_path

    vectors = [
        b"FROM:<a@b> SIZE=100",
        b"from:   <" + ATEXT + b"@xn--bcher-kva.example>  BODY=8BITMIME",
        b"FROM:<" + LOCAL_64 + b"@" + DOMAIN_189 + b">",
        b"FROM:<first.last@" + LABEL_63 + b".example>",
    ]
    for argument in vectors:
        local_part, domain, rest = scan(parser, argument)
        address, text_rest = parse_path(argument[5:].lstrip(b" ").decode(), allow_null=True)
        assert (address.local_part, address.domain, text_rest) == (
            local_part,
            domain,
            rest.decode(),
        )
        assert str(address) == f"{local_part}@{domain}"


def test_scan_path_types(parser: ModuleType) -> None:
    # No buffer protocol, or a keyword that is not bytes: TypeError, as elsewhere in the core.
    for argument in ("FROM:<a@b>", None, 7):
        with pytest.raises(TypeError):
            parser.scan_path(argument, b"FROM:")
    for keyword in ("FROM:", bytearray(b"FROM:"), memoryview(b"FROM:"), None, 7):
        with pytest.raises(TypeError):
            parser.scan_path(b"FROM:<a@b>", keyword)
    with pytest.raises(TypeError):
        parser.scan_path(b"FROM:<a@b>")
    # An empty result shares no state with the argument: b"" for the rest.
    assert parser.scan_path(memoryview(b"TO:<a@b>"), b"TO:")[2] == b""


# --- long streams: the compiled core's block kernel (64-byte blocks) ------------------------
# Short vectors never reach the bulk path; these put dot lines, bare CR/LF and the end mark at
# every offset modulo 64 inside long bodies, and demand the twin's exact results.

from alephsmtp import _parser_py  # noqa: E402

try:
    compiled: ModuleType | None = (
        None
        if os.environ.get("ALEPHSMTP_NO_EXTENSIONS")
        else importlib.import_module("alephsmtp._parser")
    )
except ImportError:  # pragma: no cover - not built
    compiled = None


def _long_stream(offset: int, variant: int) -> bytes:
    filler = bytes((ord("a") + i % 26) for i in range(64 + offset))
    lines = [filler[: 40 + (i * 7 + offset) % 90] for i in range(12)]
    lines[3] = b"." + lines[3]  # a dot line: stuffed
    lines[7] = b".." + lines[7]
    if variant == 1:
        lines[5] = lines[5][:10] + b"\r" + lines[5][10:]  # a bare CR
    elif variant == 2:
        lines[9] = lines[9][:20] + b"\n." + lines[9][20:]  # a bare LF and a dot after it
    elif variant == 3:
        lines[6] = b"x" * (150 + offset)  # past a 130-octet line limit
    return b"\r\n".join(lines) + b"\r\n.\r\nNOOP\r\n"


@pytest.mark.skipif(compiled is None, reason="compiled parser unavailable")
@pytest.mark.parametrize("variant", [0, 1, 2, 3])
@pytest.mark.parametrize("policy", ["reject", "normalize"])
@pytest.mark.parametrize("limit", [0, 130, 1000])
def test_long_streams_at_every_block_offset(variant: int, policy: str, limit: int) -> None:
    assert compiled is not None
    for offset in range(64):
        stream = b"x" * offset + _long_stream(offset, variant)
        for split in (len(stream), 64, 97):
            results = []
            for module in (compiled, _parser_py):
                reader = module.DataReader(0, limit, policy)
                out = []
                for start in range(0, len(stream), split):
                    if reader.done:
                        break
                    out.append(reader.feed(stream[start : start + split]))
                state = (reader.size, repr(reader.error), reader.done)
                results.append((b"".join(out), state, reader.trailing if reader.done else None))
            assert results[0] == results[1], (offset, split)


# --- sizes at the integer boundaries: both cores give the same answer ----------------------

BOUNDARIES = [0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**39, -1]


def _construct(make: Any) -> tuple[str, str]:
    try:
        make()
    except (ValueError, OverflowError, TypeError) as error:
        return type(error).__name__, str(error)
    return "ok", ""


@pytest.mark.parametrize("value", BOUNDARIES)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m, v: m.BdatReader(v), id="BdatReader-size"),
        pytest.param(lambda m, v: m.BdatReader(1, v), id="BdatReader-max_size"),
        pytest.param(lambda m, v: m.BdatReader(1, 0, v), id="BdatReader-received"),
        pytest.param(lambda m, v: m.DataReader(v), id="DataReader-max_size"),
        pytest.param(lambda m, v: m.DataReader(0, v), id="DataReader-max_line_length"),
        pytest.param(lambda m, v: m.LineReader(v), id="LineReader-max_line_length"),
        pytest.param(lambda m, v: m.BufferPool(v or 1, 0), id="BufferPool-buffer_size"),
        pytest.param(lambda m, v: m.BufferPool(1, v), id="BufferPool-max_free"),
    ],
)
def test_sizes_at_the_integer_boundaries_get_the_same_answer(
    parser: ModuleType, make: Any, value: int
) -> None:
    """A size past 2**63 - 1 (``BDAT 9223372036854775808``) is a ValueError from both cores,
    never an OverflowError from one and a reader from the other."""
    twin = importlib.import_module("alephsmtp._parser_py")
    got = _construct(lambda: make(parser, value))
    assert got == _construct(lambda: make(twin, value))
    if value > 2**63 - 1 or value < 0:
        assert got[0] == "ValueError"


def test_a_chunk_after_the_largest_count_saturates_in_both_cores(parser: ModuleType) -> None:
    """Found by the fuzzer: ``received`` at 2**63 - 1 plus a chunk wrapped the compiled
    core's counter negative (and so hid the size error); both now stop at 2**63 - 1."""
    reader = parser.BdatReader(10, 2**32, 2**63 - 1)
    assert reader.error == MessageTooLarge()
    assert reader.feed(b"0123456789") == b""
    assert reader.size == 2**63 - 1
    assert reader.error == MessageTooLarge()
    unlimited = parser.BdatReader(4, 0, 2**63 - 2)
    assert unlimited.feed(b"abcd") == b"abcd"
    assert unlimited.size == 2**63 - 1
