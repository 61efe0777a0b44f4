"""A short run of ``tests/stress/load_and_fault.py`` in the suite (the long run is documented),
and the checks of that script, proven to catch what they are for."""

from __future__ import annotations

from stress.load_and_fault import KINDS, Ledger, Message, check, run


async def test_load_and_faults_lose_nothing_and_double_nothing() -> None:
    clients = 4 * len(KINDS)
    ledger = await run(clients=clients, concurrency=24, seconds=60, seed=20261128)
    assert check(ledger) == []
    assert ledger.skipped == 0
    assert set(ledger.kinds) == set(KINDS)
    assert sum(ledger.kinds.values()) == clients
    accepted = [m for m in ledger.messages.values() if m.reply == 250]
    assert len(accepted) >= 4 * 5  # the well-behaved parts alone frame that many
    assert sum(ledger.delivered.values()) >= len(accepted)
    assert (ledger.sessions_left, ledger.buffers_in_use) == (0, (0, 0))


def test_the_checks_catch_each_violation() -> None:
    ledger = Ledger(sessions_left=0, buffers_in_use=(0, 0))
    body = b"Message-Id: <%s>\r\n\r\nbody\r\n"
    cases = {
        b"lost": Message(b"lost", body % b"lost", "normal", end_sent=True, reply=250),
        b"twice": Message(b"twice", body % b"twice", "normal", end_sent=True, reply=250),
        b"refused": Message(b"refused", body % b"refused", "too-large", end_sent=True, reply=552),
        b"partial": Message(b"partial", body % b"partial", "abort-data"),
        b"race": Message(b"race", body % b"race", "drop-after-end", end_sent=True),
        b"altered": Message(b"altered", body % b"altered", "normal", end_sent=True, reply=250),
    }
    ledger.messages.update(cases)
    for name in (b"twice", b"twice", b"refused", b"partial", b"race"):
        ledger.record(body % name)
    ledger.record((body % b"altered") + b"!")
    ledger.record(b"Message-Id: <nobody>\r\n\r\n")
    problems = "\n".join(check(ledger))
    for expected in (
        "lost (normal) got 250 and was delivered 0 times",
        "twice (normal) got 250 and was delivered 2 times",
        "refused (too-large) got 552 and was delivered",
        "partial (abort-data) was delivered without its end of data",
        "altered was delivered altered",
        "1 delivered messages no client framed",
    ):
        assert expected in problems
    assert "race" not in problems  # sent whole, then dropped: may have been accepted
    assert len(check(ledger)) == 6
    ledger.sessions_left, ledger.buffers_in_use = 1, (0, 1)
    assert len(check(ledger)) == 8
