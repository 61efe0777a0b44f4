"""A short run of tests/stress/load_and_fault.py in the suite (the long run is documented)."""

from __future__ import annotations

from stress.load_and_fault import check, run


async def test_load_and_faults_lose_and_double_nothing() -> None:
    ledger, state = await run(clients=150, concurrency=30, seconds=30, seed=20261128)
    assert sum(ledger.kinds.values()) == 150
    assert ledger.accepted  # the run did deliver
    assert check(ledger, state) == []
