"""Long differential fuzz run of the parsing core: compiled vs pure-Python twin.

    python tests/fuzz/fuzz_parser.py [--count 1000000] [--seconds 900] [--seed N]

Each input is random bytes drawn mostly from the SMTP alphabet (CR, LF, dot, NUL, letters,
8-bit, command words), fed to both implementations of LineReader, DataReader (both
bare-newline policies, with and without limits), BdatReader and split_command, split at
random points. Outputs, errors and states must be identical; the DataReader's joined output
must not depend on the split points; a body dot-stuffed here must come back byte-exact.
Bounded by count and time; prints one summary line; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from alephsmtp import _parser, _parser_py

ALPHABET = [b"\r", b"\n", b".", b"\x00", b"a", b"Z", b" ", b"\xff", b"\xc3\xa9", b"\r\n"]
WORDS = [b"DATA", b"BDAT 3", b"STARTTLS", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"..", b"MAIL"]


def random_input(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(0, 60)):
        parts.append(rng.choice(WORDS) if rng.random() < 0.15 else rng.choice(ALPHABET))
        if rng.random() < 0.05:
            parts.append(b"x" * rng.randrange(1, 1200))
    return b"".join(parts)


def splits(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 6)))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def norm(item: Any) -> Any:
    return (type(item).__name__, str(item)) if isinstance(item, Exception) else item


def run_lines(module: Any, pieces: list[bytes], limit: int, policy: str) -> list[Any]:
    reader = module.LineReader(limit, policy)
    out: list[Any] = []
    for piece in pieces:
        out += [norm(x) for x in reader.feed(bytearray(piece))]
        out += [norm(x) for x in reader.feed(b"")]
        out.append(reader.pending)
    out.append(reader.take_pending())
    return out


def run_data(module: Any, pieces: list[bytes], options: tuple[int, int, str]) -> list[Any]:
    reader = module.DataReader(*options)
    out: list[Any] = []
    for piece in pieces:
        if reader.done:
            break
        out.append(reader.feed(memoryview(piece)))
        out.append((reader.size, norm(reader.error), reader.done))
    out.append(reader.trailing if reader.done else None)
    return out


def run_bdat(module: Any, pieces: list[bytes], size: int, maximum: int) -> list[Any]:
    reader = module.BdatReader(size, maximum, 0)
    out: list[Any] = []
    for piece in pieces:
        if reader.done:
            break
        out.append(reader.feed(piece))
        out.append((reader.size, reader.remaining, norm(reader.error), reader.done))
    out.append(reader.trailing if reader.done else None)
    return out


def stuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def check_one(rng: random.Random, data: bytes) -> str | None:
    pieces = splits(rng, data)
    limit = rng.choice([0, 16, 512])
    for policy in ("reject", "normalize"):
        if run_lines(_parser, pieces, limit, policy) != run_lines(
            _parser_py, pieces, limit, policy
        ):
            return f"LineReader({limit}, {policy})"
        options = (rng.choice([0, 50, 10**6]), rng.choice([0, 20, 1000]), policy)
        compiled = run_data(_parser, pieces, options)
        if compiled != run_data(_parser_py, pieces, options):
            return f"DataReader{options}"
        whole = run_data(_parser, [data], options)
        # Without an error, the joined output does not depend on the split points.
        if (
            options[0] == options[1] == 0
            and compiled[-1] is not None
            and whole[-1] is not None
            and compiled[-2][1] is None
            and b"".join(compiled[0:-1:2]) != whole[0]
        ):
            return f"DataReader split-dependence{options}"
    size = rng.randrange(0, len(data) + 2)
    maximum = rng.choice([0, size // 2 + 1])
    if run_bdat(_parser, pieces, size, maximum) != run_bdat(_parser_py, pieces, size, maximum):
        return "BdatReader"
    line = data[:200]
    if _parser.split_command(line) != _parser_py.split_command(line):
        return "split_command"
    body = data.replace(b"\r", b"").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    framed = stuff(body) + b".\r\n" if body else b".\r\n"
    for module in (_parser, _parser_py):
        reader = module.DataReader(0, 0, "reject")
        got = b"".join(reader.feed(p) for p in splits(rng, framed) if not reader.done)
        if not reader.done or got != body or reader.error is not None:
            return f"round trip ({module.__name__})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    started = time.monotonic()
    done = mismatches = exceptions = 0
    report: Callable[[str], None] = lambda text: print(text, file=sys.stderr)  # noqa: E731
    while done < args.count and time.monotonic() - started < args.seconds:
        data = random_input(rng)
        try:
            problem = check_one(rng, data)
        except Exception as error:  # every escape is a finding
            exceptions += 1
            report(f"exception {error!r} on {data[:300]!r}")
        else:
            if problem is not None:
                mismatches += 1
                if mismatches <= 10:
                    report(f"mismatch in {problem} on {data[:300]!r}")
        done += 1
    elapsed = time.monotonic() - started
    print(
        f"fuzz_parser: seed={seed} inputs={done} mismatches={mismatches} "
        f"exceptions={exceptions} seconds={elapsed:.0f}"
    )
    return 1 if mismatches or exceptions else 0


if __name__ == "__main__":
    sys.exit(main())
