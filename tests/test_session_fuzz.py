"""Whole sessions fuzzed through the fake transport, over both parsing cores.

Two properties, both with arbitrary split points:
- a modelled stream (transactions by DATA and BDAT with random bodies, interleaved with junk that
  must not disturb them): every message the model accepts is delivered byte-exact, in order,
  and nothing else is;
- arbitrary bytes: nothing escapes the session, every reply line is a well-formed reply, and the
  buffers are back in their pools when the connection ends.

``ALEPHSMTP_FUZZ_EXAMPLES`` raises the example count; ``tests/fuzz/fuzz_session.py`` is the long
run of the same model.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _harness import Harness
from alephsmtp import _parser_py, session

EXAMPLES = int(os.environ.get("ALEPHSMTP_FUZZ_EXAMPLES", "150"))
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -][^\r\n]*)?\r\n")

try:
    from alephsmtp import _parser as _compiled
except ImportError:  # pragma: no cover - not built
    _compiled = None  # type: ignore[assignment]

CORES: list[Any] = [pytest.param(_parser_py, id="python")]
CORES.append(
    pytest.param(_compiled, id="cython")
    if _compiled is not None and not os.environ.get("ALEPHSMTP_NO_EXTENSIONS")
    else pytest.param(None, id="cython", marks=pytest.mark.skip(reason="compiled core unavailable"))
)


@pytest.fixture(params=CORES)
def core(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """Run the session on one parsing core (whatever alephsmtp.parser chose at import)."""
    module = request.param
    saved = {name: getattr(session, name) for name in ("LineReader", "DataReader", "BdatReader")}
    saved_pool = session.BufferPool
    for name in saved:
        setattr(session, name, getattr(module, name))
    session.BufferPool = module.BufferPool  # type: ignore[misc]
    try:
        yield module
    finally:
        for name, value in saved.items():
            setattr(session, name, value)
        session.BufferPool = saved_pool  # type: ignore[misc]


# --- the model ----------------------------------------------------------------------------

_line_bytes = st.binary(max_size=90).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_body = st.lists(
    st.one_of(_line_bytes, st.sampled_from([b".", b"..", b".x", b"", b"\xff\xfe", b" ."])),
    max_size=12,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
_junk_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.encode
)
_junk = st.one_of(
    _junk_text.map(lambda t: b"XFOO " + t + b"\r\n"),
    _junk_text.map(lambda t: b"NOOP " + t + b"\r\n"),
    _junk_text.map(lambda t: b"VRFY x" + t + b"\r\n"),
    st.just(b"NOOP\n"),  # a bare LF line: refused, and still one line
    st.just(b"MAIL FROM:<not an address>\r\n"),
    st.just(b"RCPT TO:<a@b.example>\r\n"),  # out of order: 503
    st.just(b"DATA\r\n"),  # out of order: 503
    st.just(b"BDAT 4\r\nQUIT"),  # out of order: 503, and the chunk is still read
    st.just(b"AUTH PLAIN\r\n"),  # not offered: 503
    st.just(b"STARTTLS\r\n"),  # not offered: 502
    st.integers(1000, 3000).map(lambda n: b"NOOP " + b"x" * n + b"\r\n"),  # too long
    st.just(b"RSET\r\n"),
)


def _stuff(body: bytes) -> bytes:
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in body.split(b"\r\n")[:-1]
    )


@st.composite
def _transaction(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body = draw(_body)
    envelope = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
    if draw(st.booleans()):
        return envelope + b"DATA\r\n" + _stuff(body) + b".\r\n", body
    data = draw(st.binary(max_size=300))
    cut = draw(st.integers(0, len(data)))
    chunks = [data[:cut], data[cut:]]
    framed = b"BDAT %d\r\n%s" % (len(chunks[0]), chunks[0])
    framed += b"BDAT %d LAST\r\n%s" % (len(chunks[1]), chunks[1])
    return envelope + framed, data


@st.composite
def _session_stream(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    parts = [b"EHLO fuzz.test\r\n"]
    expected: list[bytes] = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            parts.append(draw(_junk))
        framed, body = draw(_transaction())
        parts.append(framed)
        expected.append(body)
    parts.append(b"QUIT\r\n")
    return b"".join(parts), expected


def _feed(h: Harness, data: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(points):
        h.send(data[start:end])


def _check_replies(written: bytes) -> list[bytes]:
    lines = written.split(b"\r\n")
    assert lines[-1] == b"", written[-200:]
    for line in lines[:-1]:
        assert REPLY_LINE.fullmatch(line + b"\r\n"), line
    return lines[:-1]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(_session_stream(), st.lists(st.integers(0, 10**6), max_size=12))
def test_every_accepted_message_arrives_byte_exact(
    core: ModuleType, stream: tuple[bytes, list[bytes]], cuts: list[int]
) -> None:
    data, expected = stream

    async def run() -> None:
        h = Harness(max_bad_commands=0, idle_timeout=0)
        delivered: list[bytes] = []
        h.session.message_received += lambda s, e: delivered.append(e.message)
        _feed(h, data, cuts)
        lines = _check_replies(bytes(h.transport.written))
        assert lines[-1] == b"221 2.0.0 Bye"
        assert h.transport.closed
        assert delivered == expected
        pools = h.session._pools
        assert (pools.command.in_use, pools.data.in_use) == (0, 0)

    asyncio.run(run())


_noise = st.lists(
    st.one_of(
        st.sampled_from(
            [b"\r", b"\n", b"\r\n", b".", b"\r\n.\r\n", b"\n.\n", b"\x00", b" ", b"DATA\r\n",
             b"BDAT 5\r\n", b"BDAT 2 LAST\r\n", b"MAIL FROM:<a@b.example>\r\n",
             b"RCPT TO:<c@d.example>\r\n",
             b"AUTH LOGIN\r\n", b"*\r\n", b"EHLO x\r\n", b"RSET\r\n", b"\xff", b"LHLO y\r\n"]
        ),
        st.binary(max_size=30),
    ),
    max_size=40,
).map(b"".join)  # fmt: skip


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    _noise, st.lists(st.integers(0, 10**6), max_size=12), st.sampled_from(["reject", "normalize"])
)
def test_arbitrary_bytes_never_escape(
    core: ModuleType, noise: bytes, cuts: list[int], policy: str
) -> None:
    async def run() -> None:
        h = Harness(bare_newline=policy, auth_over_plaintext=True, idle_timeout=0)
        h.session.auth += lambda s, e: e.check_password("pw")
        h.session.message_received += lambda s, e: None
        _feed(h, b"EHLO fuzz.test\r\n" + noise, cuts)
        _check_replies(bytes(h.transport.written))
        h.transport.close()
        pools = h.session._pools
        assert (pools.command.in_use, pools.data.in_use) == (0, 0)

    asyncio.run(run())
