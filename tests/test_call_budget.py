"""Python calls per command through the real session: a budget CI holds.

Timings are noisy on shared machines; the number of Python calls a command costs is not. It is
counted with a profile hook (calls into alephsmtp's own modules only: the event loop, the
standard library and the compiled core do not count) while a session on the fake transport
answers a command or a message, and compared with a budget set from what the design reaches.
A change that adds a layer to the hot path fails here; raise a budget only for a reason you can
name in the commit.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

import alephsmtp
from _harness import Harness
from alephsmtp.parser import IMPLEMENTATION

SOURCE = os.path.dirname(alephsmtp.__file__)
BODY = b"Subject: budget\r\n\r\n" + b"y" * 1000 + b"\r\n"
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
ROUNDS = 20

# scenario: (what the client sends per round, as reads), budget (compiled core, pure twin)
SCENARIOS: dict[str, tuple[list[bytes], int, int]] = {
    # A 1 KiB message on a persistent session: the envelope in one read, the body in another.
    "message": ([ENVELOPE, BODY + b".\r\n"], 31, 64),
    "noop": ([b"NOOP\r\n"], 7, 15),
    "mail-rset": ([b"MAIL FROM:<a@example.org>\r\n", b"RSET\r\n"], 20, 38),
    "ehlo": ([b"EHLO client.example\r\n"], 14, 22),
}


def count_calls(run: Callable[[], None]) -> tuple[int, Counter[str]]:
    calls: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(SOURCE):
            where = frame.f_code.co_filename[len(SOURCE) + 1 :]
            calls[f"{where}:{frame.f_code.co_name}"] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return sum(calls.values()), calls


@pytest.mark.parametrize("with_handler", [False, True], ids=["no-handler", "handler"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_python_calls_per_round_stay_within_the_budget(
    scenario: str, with_handler: bool
) -> None:
    reads, compiled_budget, pure_budget = SCENARIOS[scenario]
    h = Harness()
    if with_handler:
        # A handler that passes, on every event the scenario raises.
        for name in ("ehlo", "mail", "rcpt", "data", "noop", "rset", "message_received"):
            getattr(h.session, name).connect(lambda sender, e: None)
    h.send(b"EHLO warm.example\r\n")
    for read in reads:
        h.send(read)  # once, to warm caches (the rendered replies, the parsed answers)
    h.output()

    def run() -> None:
        for _ in range(ROUNDS):
            for read in reads:
                h.send(read)

    total, calls = count_calls(run)
    assert h.replies()  # the session answered
    per_round = total / ROUNDS
    budget = compiled_budget if IMPLEMENTATION == "cython" else pure_budget
    # A handler costs the chain: one run_chain (and an event-args object) per event.
    events = {"message": 4, "noop": 1, "mail-rset": 2, "ehlo": 1}[scenario]
    if with_handler:
        budget += 2 * events
    detail = ", ".join(f"{name} {count / ROUNDS:g}" for name, count in calls.most_common(12))
    assert per_round <= budget, f"{per_round:g} calls per round, budget {budget}: {detail}"
