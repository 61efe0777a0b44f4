"""Whole sessions fuzzed through the fake transport, over both parsing cores (hypothesis).

The generators, the runner and the checks are in ``tests/fuzz/session_model.py``, shared with
the long run ``tests/fuzz/fuzz_session.py``. Three properties, every stream cut at arbitrary
points (sometimes one byte at a time):

- a modelled client (transactions by DATA with bodies it dot-stuffs itself and by BDAT, junk
  between and inside them that must not disturb them, AUTH exchanges, STARTTLS with no TLS,
  pipelined to the end): each reply has the code the model allows, and the messages delivered
  are exactly those of the transactions that got 250 after their end of data, byte-exact, with
  their envelopes, in order; and those are exactly the ones the model says must be accepted;
- arbitrary bytes: nothing escapes ``send``, every reply line is well formed, nothing is written
  after close, the buffers go back to their pools, and the replies and deliveries are the same
  whatever the split points and whichever core;
- arbitrary bytes while the fake clock jumps past timeouts: the same, minus the comparison.

``ALEPHSMTP_FUZZ_EXAMPLES=N`` sets the examples per property and core (default 150).

The tests at the end reproduce what the fuzzing found in ``src``, now fixed.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _harness import Harness, MockLoop
from alephsmtp import session
from fuzz.session_model import (
    Outcome,
    Variant,
    check_model,
    check_noise,
    clock_steps,
    cut_points,
    model_script,
    noise_script,
    run_script,
    run_stream,
    use_core,
)

T = TypeVar("T")

EXAMPLES = int(os.environ.get("ALEPHSMTP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

PYTHON_CORE = importlib.import_module("alephsmtp._parser_py")


def _compiled_core() -> tuple[ModuleType | None, str]:
    if os.environ.get("ALEPHSMTP_NO_EXTENSIONS"):
        return None, "ALEPHSMTP_NO_EXTENSIONS is set"
    try:
        return importlib.import_module("alephsmtp._parser"), ""
    except ImportError as exc:  # not built
        return None, f"alephsmtp._parser is not built ({exc})"


COMPILED_CORE, NO_COMPILED_REASON = _compiled_core()


@pytest.fixture(params=["cython", "python"])
def core(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The session's readers and buffer pools from one core, whatever alephsmtp.parser chose."""
    if request.param == "cython" and COMPILED_CORE is None:
        pytest.skip(f"compiled core unavailable: {NO_COMPILED_REASON}")
    module = COMPILED_CORE if request.param == "cython" else PYTHON_CORE
    assert module is not None
    with use_core(module):
        yield module


def _other(core: ModuleType) -> ModuleType | None:
    return PYTHON_CORE if core is COMPILED_CORE else COMPILED_CORE


class HypothesisDraw:
    """The model's choices, drawn by hypothesis (so failures shrink)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def chance(self, percent: int) -> bool:
        return self.data.draw(st.integers(0, 99)) >= 100 - percent

    def pick(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(list(options)))

    def raw(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


def test_the_core_under_test_is_the_one_the_session_uses(core: ModuleType) -> None:
    h = Harness(loop=MockLoop())
    assert type(h.session._reader) is core.LineReader
    assert vars(session)["DataReader"] is core.DataReader
    assert vars(session)["BdatReader"] is core.BdatReader
    assert type(h.session._pools.command) is core.BufferPool
    if core is COMPILED_CORE:
        assert core.__file__ is not None
        assert not core.__file__.endswith(".py")


@FUZZ
@given(st.data())
def test_modelled_sessions_deliver_exactly_the_accepted_messages(
    core: ModuleType, data: st.DataObject
) -> None:
    draw = HypothesisDraw(data)
    script = model_script(draw)
    cuts = cut_points(draw, len(script.stream))
    out = asyncio.run(run_script(script, cuts))
    assert check_model(script, out) == []


@FUZZ
@given(st.data())
def test_arbitrary_bytes_never_escape_and_never_depend_on_the_splits(
    core: ModuleType, data: st.DataObject
) -> None:
    draw = HypothesisDraw(data)
    variant, stream = noise_script(draw)
    cuts = cut_points(draw, len(stream))

    async def runs() -> list[Outcome]:
        outs = [await run_stream(variant, stream, []), await run_stream(variant, stream, cuts)]
        other = _other(core)
        if other is not None:
            with use_core(other):
                outs.append(await run_stream(variant, stream, cuts))
        return outs

    assert check_noise(variant, stream, asyncio.run(runs())) == []


@FUZZ
@given(st.data())
def test_timeouts_at_arbitrary_points_close_cleanly(core: ModuleType, data: st.DataObject) -> None:
    draw = HypothesisDraw(data)
    variant, stream = noise_script(draw)
    cuts = cut_points(draw, len(stream))
    clock = clock_steps(draw, len(cuts) + 1 + len(stream) // 4096)
    out = asyncio.run(run_stream(variant, stream, cuts, clock=clock))
    assert check_noise(variant, stream, [out]) == []


# --- what the fuzzing found (reproducers; each passes once src is fixed) --------------------

ENVELOPE = b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


def _replies_and_deliveries(variant: Variant, stream: bytes, cuts: list[int]) -> Any:
    out = asyncio.run(run_stream(variant, stream, cuts))
    assert out.problems == []
    return out.written.split(b"\r\n"), out.delivered


@pytest.mark.parametrize("command", [b" DATA", b"  BDAT 9 LAST"], ids=["space-DATA", "space-BDAT"])
def test_leading_space_data_or_bdat_does_not_depend_on_the_splits(
    core: ModuleType, command: bytes
) -> None:
    stream = ENVELOPE + command + b"\r\nRSET\r\n.\r\nQUIT\r\n"
    at = len(ENVELOPE + command) + 2  # right after the command line
    assert _replies_and_deliveries(Variant(), stream, []) == _replies_and_deliveries(
        Variant(), stream, [at]
    )


@pytest.mark.parametrize("after_auth", [True, False], ids=["command-after", "response-with"])
def test_auth_line_limits_do_not_depend_on_the_splits(core: ModuleType, after_auth: bool) -> None:
    variant = Variant(auth=True)
    if after_auth:
        stream = b"EHLO x\r\nAUTH PLAIN\r\n*\r\nNOOP " + b"a" * 3000 + b"\r\nQUIT\r\n"
    else:
        response = b"AHVzZXIA" + b"cHBw" * 500  # base64 of "\0user\0ppp...": 2,008 octets
        stream = b"EHLO x\r\nAUTH PLAIN\r\n" + response + b"\r\nQUIT\r\n"
    at = stream.index(b"AUTH PLAIN\r\n") + 12  # the next read starts after the AUTH command
    assert _replies_and_deliveries(variant, stream, []) == _replies_and_deliveries(
        variant, stream, [at]
    )


@pytest.mark.parametrize("reset", [b"RSET", b"EHLO again"])
def test_streamed_chunks_of_a_reset_transaction_are_discarded(
    core: ModuleType, reset: bytes
) -> None:
    h = Harness(loop=MockLoop())
    events: list[str] = []
    h.session.message_chunk += lambda s, e: events.append(f"chunk {e.offset} {e.chunk!r}")
    h.session.message_discarded += lambda s, e: events.append("discarded")
    h.session.message_received += lambda s, e: events.append(f"received {e.size}")
    h.send(ENVELOPE + b"BDAT 3\r\nabc" + reset + b"\r\n")
    h.send(ENVELOPE[8:] + b"BDAT 2 LAST\r\nde")
    assert events == ["chunk 0 b'abc'", "discarded", "chunk 0 b'de'", "received 2"]
