"""Long fuzz run of whole sessions through the fake transport, over both parsing cores.

    python tests/fuzz/fuzz_session.py [--count 100000] [--seconds 900] [--seed N] [--strict]
    python tests/fuzz/fuzz_session.py --seed N --start I --count 1 --verbose   # replay input I

The same generators and checks as ``tests/test_session_fuzz.py`` (``fuzz/session_model.py``),
driven by ``random.Random(f"{seed}:{I}")`` for input ``I``, in turn:

- a modelled session, run on both cores: every reply allowed by the model, every message that
  got 250 after its end of data delivered byte-exact with its envelope, in order, and exactly
  the ones the model says must be accepted;
- arbitrary bytes, run whole and cut (on one core) and cut (on the other): nothing escapes,
  reply lines well formed, nothing written after close, buffers back in their pools, and the
  three runs agree byte for byte;
- arbitrary bytes while the fake clock jumps past the timeouts (alternating cores).

Streams that meet a known, accepted cause of split dependence (none today; see
``tests/fuzz/session_model.py``) would be counted and skip only the comparison between runs,
unless ``--strict``. Bounded by ``--count`` and ``--seconds``; prints the seed and a summary line;
exits 1 on any finding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import random
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: the tests directory holds _harness and fuzz
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.session_model import (
    Outcome,
    RandomDraw,
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

KINDS = ("model", "noise", "clock")


def _cores() -> list[ModuleType]:
    cores = [importlib.import_module("alephsmtp._parser_py")]
    with contextlib.suppress(ImportError):  # not built: the pure core only
        cores.insert(0, importlib.import_module("alephsmtp._parser"))
    return cores


async def check_input(
    seed: int, index: int, cores: list[ModuleType], strict: bool
) -> tuple[str, list[str], set[str]]:
    """Input ``index``: its kind, the problems found and the known issues met."""
    draw = RandomDraw(random.Random(f"{seed}:{index}"))
    kind = KINDS[index % len(KINDS)]
    problems: list[str] = []
    outs: list[Outcome] = []
    if kind == "model":
        script = model_script(draw)
        cuts = cut_points(draw, len(script.stream))
        for core in cores:
            with use_core(core):
                out = await run_script(script, cuts)
            outs.append(out)
            problems += [f"[{core.__name__}] {p}" for p in check_model(script, out)]
    elif kind == "noise":
        variant, stream = noise_script(draw)
        cuts = cut_points(draw, len(stream))
        first, other = cores[(index // 3) % len(cores)], cores[(index // 3 + 1) % len(cores)]
        with use_core(first):
            outs += [await run_stream(variant, stream, []), await run_stream(variant, stream, cuts)]
        with use_core(other):
            outs.append(await run_stream(variant, stream, cuts))
        problems += check_noise(variant, stream, outs, strict=strict)
    else:
        variant, stream = noise_script(draw)
        cuts = cut_points(draw, len(stream))
        clock = clock_steps(draw, len(cuts) + 1 + len(stream) // 4096)
        with use_core(cores[(index // 3) % len(cores)]):
            outs.append(await run_stream(variant, stream, cuts, clock=clock))
        problems += check_noise(variant, stream, outs)
    return kind, problems, set().union(*(out.known for out in outs))


async def run(args: argparse.Namespace, seed: int) -> int:
    cores = _cores()
    print(
        f"fuzz_session: seed={seed} start={args.start} count={args.count} "
        f"cores={','.join(core.__name__.rsplit('.', 1)[1] for core in cores)}"
    )
    sys.stdout.flush()
    started = time.monotonic()
    kinds: Counter[str] = Counter()
    known: Counter[str] = Counter()
    findings = exceptions = 0
    reports: list[str] = []
    for index in range(args.start, args.start + args.count):
        if time.monotonic() - started >= args.seconds:
            break
        try:
            kind, problems, met = await check_input(seed, index, cores, args.strict)
        except Exception as error:  # an escape from the harness is a finding too
            exceptions += 1
            kind, problems, met = "?", [f"{type(error).__name__}: {error}"], set()
        kinds[kind] += 1
        known.update(met)
        if problems:
            findings += 1
            reports.append(f"input {index} ({kind}): " + " | ".join(problems)[:1500])
            if args.verbose or len(reports) <= 10:
                print("  " + reports[-1])
    elapsed = time.monotonic() - started
    for issue, count in sorted(known.items()):
        print(f"  known issue met {count}x: {issue}")
    if reports:
        print(f"  replay one: --seed {seed} --start INPUT --count 1 --verbose")
    print(
        f"fuzz_session: inputs={sum(kinds.values())} "
        f"({', '.join(f'{k}={kinds[k]}' for k in KINDS)}) findings={findings} "
        f"exceptions={exceptions} seconds={elapsed:.1f}"
    )
    return 1 if findings or exceptions else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs (100,000)")
    parser.add_argument("--seconds", type=float, default=900.0, help="time bound (900)")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--start", type=int, default=0, help="the first input's index")
    parser.add_argument("--strict", action="store_true", help="compare runs on known issues too")
    parser.add_argument("--verbose", action="store_true", help="print every finding")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    return asyncio.run(run(args, seed))


if __name__ == "__main__":
    sys.exit(main())
