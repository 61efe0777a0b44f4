"""Coverage-guided fuzzing of the parsing core with atheris (optional: ``pip install atheris``).

    python tests/fuzz/atheris_parser.py -runs=200000            # or -max_total_time=600
    python tests/fuzz/atheris_parser.py crash-<sha1>             # replay a finding

libFuzzer mutates the input bytes, guided by coverage of the pure-Python twin (instrumented
here; the compiled core is compared, not instrumented). Every input goes through the same checks
as ``fuzz_parser.py`` (both cores must agree, and agree with the reference models): the first
four bytes seed the split points and the limits, the rest is the stream. A finding raises, and
libFuzzer saves the input as ``crash-*``. Bounded by libFuzzer's ``-runs`` / ``-max_total_time``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

if __package__ in (None, ""):  # run as a script: the tests directory holds the fuzz package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["alephsmtp._parser_py"]):
    from fuzz.fuzz_parser import Checker, random_splits


def test_one_input(data: bytes) -> None:
    """One libFuzzer input through every check of fuzz_parser.py; raises on a finding."""
    provider = atheris.FuzzedDataProvider(data)
    rng = random.Random(provider.ConsumeInt(4))
    stream = provider.ConsumeBytes(provider.remaining_bytes())
    checker = Checker(rng, stream, random_splits(rng, stream))
    checker.line_reader()
    checker.data_reader("reject")
    checker.data_reader("normalize")
    checker.bdat_reader()
    checker.split_command()
    checker.scan_path()
    checker.round_trip()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
