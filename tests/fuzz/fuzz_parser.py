"""Long differential fuzz run of the parsing core: the compiled core against the pure twin.

    python tests/fuzz/fuzz_parser.py [--count 1000000] [--seconds 900] [--seed N] [--jobs 1]
    python tests/fuzz/fuzz_parser.py --seed N --start I --count 1 --verbose   # replay input I

Input ``I`` of a run is made from ``random.Random(f"{seed}:{I}")`` alone (reproducible one by
one): either random bytes biased to the SMTP alphabet (CR, LF, dots, NUL, 8-bit, the end mark
and its smuggling look-alikes, DATA/BDAT/STARTTLS, long runs), or a long, mostly clean body of
dot-stuffed CRLF lines with a few defects at random offsets (the input the compiled core's block
scan is built for); cut at random points and passed as bytes, bytearray, memoryview slices of a
larger buffer or non-contiguous views. Each input goes through:

- ``LineReader`` (a random limit, one policy): compiled and pure give the same transcript call by
  call (lines, errors, ``pending``, with ``feed(b"")``, ``take_pending()`` and limit changes
  mixed in), and what a drained reader returns equals a whole-stream reference of the contract;
- ``DataReader`` (both policies, with and without size and line limits, near the lengths of
  the input's lines and of the whole message): the same transcript
  (output, size, error, done, trailing) from both cores; and against a whole-stream reference:
  ``done``, ``size``, whether an error is set, the joined output while none is, and the bytes
  after the end mark (``trailing`` plus what was not fed) -- so nothing depends on the splits;
- ``BdatReader``: the same transcript, against exactly ``size`` bytes of the stream;
- ``split_command``: the same result, against the contract;
- ``scan_path`` (FROM: or TO:), on a MAIL/RCPT argument made for it (a simple path, one at the
  RFC 5321 limits, a fallback form, with keyword faults and a few bytes changed) or on the
  input's first bytes: the same result from both cores, and exactly what the Python fast path
  (commands' keyword rule, ``addresses._SIMPLE_PATH_RE`` and its limits) finds; when a tuple
  comes back, ``addresses.parse_path`` reads the same local part, domain and rest;
- a round trip: a body of lines dot-stuffed here plus ``.<CRLF>`` comes back byte-exact;
- every 64th input, ``BufferPool``: the same counters and errors for a random sequence of calls.

Bounded by ``--count`` and ``--seconds``. Prints the seed, then one summary line (inputs,
mismatches, exceptions, seconds); exits 1 on any mismatch or exception.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from alephsmtp import _parser_py, addresses


def _load_compiled() -> ModuleType | None:
    try:
        return importlib.import_module("alephsmtp._parser")
    except ImportError:  # not built: only the reference models to compare with
        return None


_compiled = _load_compiled()

CR, LF = 13, 10
ALPHABET = (
    b"\r", b"\n", b"\r\n", b".", b"\x00", b"a", b"Z", b" ", b"\xff", b"\xc3\xa9", b"\t",
)  # fmt: skip
WORDS = (
    b"DATA", b"data", b"BDAT 3", b"Bdat 1 LAST", b"STARTTLS", b"StartTLS", b"MAIL FROM:<a@b>",
    b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b".\r\n", b"\r\n.", b"..", b"...",
    b"\r\n..\r\n", b"\r\r\n", b"\r\n\r\n", b"  ", b"QUIT\r\n",
)  # fmt: skip


class Mismatch(Exception):
    """The cores disagree, or one of them breaks the contract."""


# --- inputs ----------------------------------------------------------------------------------


def token_input(rng: random.Random) -> bytes:
    """Bytes biased to the SMTP alphabet; sometimes long runs or arbitrary bytes."""
    parts = []
    for _ in range(rng.randrange(0, 48)):
        roll = rng.random()
        if roll < 0.25:
            parts.append(rng.choice(WORDS))
        elif roll < 0.29:
            parts.append(bytes([rng.choice(b"xy.\r")]) * rng.randrange(1, 700))
        elif roll < 0.33:
            parts.append(rng.randbytes(rng.randrange(1, 12)))
        else:
            parts.append(rng.choice(ALPHABET))
    return b"".join(parts)


DEFECTS = (b"\r", b"\n", b"\r\n.\r\n", b"\n.\n", b".\r\n", b"\r\n.", b"\n.\r\n", b"\r\r\n")


def body_input(rng: random.Random) -> bytes:
    """A long, mostly clean body of CRLF lines (what the compiled core's block scan takes in
    8/32-byte steps): line-start dots, lines of every length, now and then a defect (bare CR,
    bare LF, an end mark or a look-alike) at any offset, often the end mark and more after it."""
    lines = []
    for _ in range(rng.randrange(0, 150)):
        size = rng.choice(
            [
                rng.randrange(0, 4),
                rng.randrange(0, 40),
                rng.randrange(30, 100),
                rng.randrange(0, 2000),
            ]
        )
        roll = rng.random()
        if roll < 0.7:
            content = bytes([rng.choice(b"abxyz09 -.")]) * size
        elif roll < 0.9:
            content = bytes(rng.choice(b"abcdefghij .:;<>@\x00\t\xc3\xa9\xff") for _ in range(size))
        else:
            content = rng.randbytes(size).replace(b"\r", b"").replace(b"\n", b"")
        if rng.random() < 0.15:
            content = rng.choice([b".", b"..", b"..."]) + content
        lines.append(content + b"\r\n")
    data = bytearray(b"".join(lines))
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 5])):
        at = rng.randrange(0, len(data) + 1)
        data[at:at] = rng.choice(DEFECTS)
    if rng.random() < 0.6:
        data += b".\r\n" + rng.choice([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n", rng.randbytes(9)])
    return bytes(data)


def random_input(rng: random.Random) -> bytes:
    """A token soup (60%) or a long, mostly clean body (40%)."""
    return token_input(rng) if rng.random() < 0.6 else body_input(rng)


ATEXT = b"abxyzABZ0189!#$%&'*+-/=?^_`{|}~"
LDH = b"abzAZ09-"
LET_DIG = b"abzAZ09"
# One of each fallback form's marks, and bytes that are never part of a simple path.
PATH_NOISE = (
    b" ", b"  ", b"\t", b'"', b"\\", b"(", b",", b":", b";", b"[", b"]", b"<", b">", b"@",
    b".", b"..", b"-", b"_", b"\x00", b"\x7f", b"\x80", b"\xc3\xa9", b"\xff", b"\r\n", b"\x1a",
)  # fmt: skip
PATH_FORMS = (
    b"<>", b"<Postmaster>", b"<postmaster>", b"<@a.example,@b.example:x@y.example>",
    b'<"x y"@d.example>', b"<a@[192.0.2.1]>", b"<a@[IPv6:::1]>", b"a@b.example",
    b"<a@b.example", b"<j\xc3\xb6rg@b.example>", b"<a@b\xc3\xbccher.example>",
)  # fmt: skip
PATH_TAILS = (
    b"", b" SIZE=1", b"  BODY=8BITMIME SMTPUTF8", b"   ", b"x", b"\t", b">", b" \xff",
    b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b", b" \xc3\xa9=1",
)  # fmt: skip


def _run_of(rng: random.Random, alphabet: bytes) -> bytes:
    """A few mixed bytes of ``alphabet``, or one repeated, often to near the 63/64 limits."""
    if rng.random() < 0.7:
        return bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 7)))
    return bytes([rng.choice(alphabet)]) * rng.choice([rng.randrange(1, 5), rng.randrange(58, 71)])


def _label(rng: random.Random) -> bytes:
    """A domain label: mostly valid but for its length, sometimes any run of LDH bytes."""
    roll = rng.random()
    if roll < 0.6:
        middle = _run_of(rng, LDH) if rng.random() < 0.5 else b""
        return bytes([rng.choice(LET_DIG)]) + middle + bytes([rng.choice(LET_DIG)])
    if roll < 0.8:
        return bytes([rng.choice(LET_DIG)])
    return _run_of(rng, LDH)


def _boundary_path(rng: random.Random) -> bytes:
    """``<local@domain>`` at the RFC 5321 4.5.3.1 limits: a local part of 63-65 octets, a path
    of 255-257, labels of 62-64."""
    local_size = rng.choice([64, 65, 63, 1, 30])
    local = bytearray(b"l" * local_size)
    if local_size > 2 and rng.random() < 0.5:
        local[rng.randrange(1, local_size - 1)] = ord(".")
    domain_size = rng.choice([256, 257, 255, 100]) - local_size - 3
    unit = b"d" * rng.choice([63, 64, 62, 7]) + b"."
    domain = (unit * (domain_size // len(unit) + 1))[:domain_size]
    if domain.endswith(b"."):
        domain = domain[:-2] + b".e"
    return b"<" + bytes(local) + b"@" + domain + b">"


def path_input(rng: random.Random, keyword: bytes) -> bytes:
    """A MAIL/RCPT argument for ``keyword``: most often a simple path or nearly one."""
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randrange(0, 30))
    written = keyword
    if rng.random() < 0.25:
        other = b"TO:" if keyword == b"FROM:" else b"FROM:"
        # Another case (matches), or a keyword that must not match.
        forms = [keyword.lower(), keyword.capitalize(), other, keyword[:-1], keyword[:-1] + b" :"]
        forms += [b"", b"\xc6ROM:", keyword[:-1] + b"\x1a"]
        written = rng.choice(forms)
    if roll < 0.2:
        path = rng.choice(PATH_FORMS)
    elif roll < 0.45:
        path = _boundary_path(rng)
    else:
        local_part = b".".join(_run_of(rng, ATEXT) for _ in range(rng.randrange(1, 4)))
        domain = b".".join(_label(rng) for _ in range(rng.randrange(1, 5)))
        path = b"<" + local_part + b"@" + domain + b">"
    argument = bytearray(written + b" " * rng.choice([0, 0, 1, 3]) + path + rng.choice(PATH_TAILS))
    if rng.random() < 0.35:  # one to three bytes changed, added or removed
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(0, len(argument) + 1)
            noise = rng.choice(PATH_NOISE)
            op = rng.randrange(3)
            if op == 0:
                argument[at:at] = noise
            elif op == 1:
                argument[at : at + len(noise)] = noise
            else:
                del argument[at : at + 1]
    return bytes(argument)


def random_splits(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random points (sometimes one byte at a time, sometimes with empties)."""
    if 0 < len(data) <= 64 and rng.random() < 0.05:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 7)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


def as_buffer(rng: random.Random, piece: bytes) -> bytes | bytearray | memoryview:
    """The same bytes as some byte-like the contract accepts."""
    kind = rng.randrange(8)
    if kind == 0:
        return bytearray(piece)
    if kind == 1:  # a slice of a pooled buffer, as the session passes it
        buffer = bytearray(rng.randrange(0, 5)) + piece + bytearray(3)
        start = len(buffer) - len(piece) - 3
        return memoryview(buffer)[start : start + len(piece)]
    if kind == 2 and piece:  # not contiguous
        spread = bytearray(len(piece) * 2)
        spread[::2] = piece
        return memoryview(spread)[::2]
    return piece


# Sizes at the integer boundaries of a C long and a Py_ssize_t, and past them.
SIZE_BOUNDARIES = (2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**20 - 1, 10**39)


def _constructed(make: Callable[..., Any], *args: int) -> tuple[str, str]:
    """What constructing gives: ("ok", "") or the error's type and text."""
    try:
        make(*args)
    except (ValueError, OverflowError) as error:
        return type(error).__name__, str(error)
    return "ok", ""


def norm(item: Any) -> Any:
    """Errors compared by type (they compare by value anyway; this reads better)."""
    return type(item).__name__ if isinstance(item, Exception) else item


# --- reference models of the contract (whole stream, obviously correct, slow is fine) ------


def ref_lines(data: bytes, limit: int, normalize: bool) -> tuple[list[Any], bytes]:
    """Every line/error of ``data`` and what ``take_pending()`` returns at the end."""
    out: list[Any] = []
    pos = 0
    while (lf := data.find(b"\n", pos)) >= 0:
        raw = data[pos : lf + 1]
        pos = lf + 1
        if limit and len(raw) > limit:
            out.append("LineTooLong")
        elif raw.endswith(b"\r\n"):
            line = raw[:-2]
            out.append("BareCarriageReturn" if not normalize and b"\r" in line else line)
        elif normalize:
            out.append(raw[:-1])
        else:
            out.append("BareLineFeed")
    tail = data[pos:]
    return out, (b"" if limit and len(tail) >= limit else tail)


@dataclass
class DataResult:
    done: bool
    after: bytes  # the bytes after the end mark
    output: bytes  # the message, unstuffed (normalized)
    size: int
    error: bool


def ref_data(data: bytes, max_size: int, limit: int, normalize: bool) -> DataResult:
    """The DATA phase over the whole stream: end mark, unstuffing, size, whether a rule broke."""
    # The end mark is "." CRLF after a real CRLF (or first): the first "<CRLF>.<CRLF>".
    end = (b"\r\n" + data).find(b"\r\n.\r\n")
    done = end >= 0
    body = data[:end] if done else data
    out = bytearray()
    broken = False
    pos = 0
    while pos < len(body):
        lf = body.find(b"\n", pos)
        if lf < 0:  # the incomplete last line: a line-start dot (and CR) is still held
            tail = body[pos:]
            if tail in (b".", b".\r"):
                break
            content = tail[1:] if tail.startswith(b".") else tail
            # A CR is known to be bare only once the byte after it came.
            if not normalize and b"\r" in content[:-1]:
                broken = True
            if limit and len(content) > limit:
                broken = True
            out += content
            break
        raw = body[pos:lf]
        pos = lf + 1
        crlf = raw.endswith(b"\r")
        content = raw[:-1] if crlf else raw
        if not normalize and (not crlf or b"\r" in content):
            broken = True
        if content.startswith(b".") and len(content) > 1:
            content = content[1:]  # a stuffed dot
        if limit and len(content) + (2 if crlf else 1) > limit:
            broken = True
        out += content + (b"\r\n" if crlf or normalize else b"\n")
    if max_size and len(out) > max_size:
        broken = True
    return DataResult(done, data[end + 3 :] if done else b"", bytes(out), len(out), broken)


def after_keyword(argument: bytes, keyword: bytes) -> str | None:
    """The text ``addresses.parse_path`` gets for this argument: decoded (``surrogateescape``
    standing in for the command layer's refusal of bad UTF-8), after the keyword (matched as
    ``commands._after_keyword`` does: ASCII, any case) and the spaces after it."""
    text = argument.decode("utf-8", "surrogateescape")
    word = keyword.decode("ascii").upper()
    head = text[: len(word)]
    if not (head.isascii() and head.upper() == word):
        return None
    return text[len(word) :].lstrip(" ")


def ref_scan_path(argument: bytes, keyword: bytes) -> tuple[str, str, str] | None:
    """What ``addresses.parse_path`` takes without its general parser: the simple-path
    pattern and the RFC 5321 4.5.3.1 limits it checks there."""
    text = after_keyword(argument, keyword)
    if text is None:
        return None
    match = addresses._SIMPLE_PATH_RE.match(text)
    if match is None:
        return None
    local_part, domain = match.group(1, 2)
    if (
        len(local_part) > addresses.MAX_LOCAL_PART
        or len(local_part) + len(domain) + 3 > addresses.MAX_PATH
    ):
        return None
    return local_part, domain, text[match.end() :]


def stuff(lines: list[bytes]) -> bytes:
    """Lines (without terminators) framed as a client does (RFC 5321 4.5.2), with the end mark."""
    return b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines) + (
        b".\r\n"
    )


# --- one input -------------------------------------------------------------------------------


@dataclass
class Checker:
    rng: random.Random
    data: bytes
    pieces: list[bytes]
    notes: list[str] = field(default_factory=list)

    def views(self) -> list[bytes | bytearray | memoryview]:
        return [as_buffer(self.rng, piece) for piece in self.pieces]

    def compare(self, what: str, run: Callable[[ModuleType], Any]) -> Any:
        """``run`` on both cores; they must agree. Returns the pure core's result."""
        pure = run(_parser_py)
        if _compiled is not None:
            compiled = run(_compiled)
            if compiled != pure:
                raise Mismatch(f"{what}: compiled {compiled!r:.600} != pure {pure!r:.600}")
        return pure

    def line_reader(self) -> None:
        rng = self.rng
        limit = rng.choice([0, rng.randrange(1, 40), 512, 1563])
        policy = rng.choice(["reject", "normalize"])
        views = self.views()
        script = [rng.randrange(12) for _ in views]  # 0: feed(b""), 1: take_pending

        def transcript(module: ModuleType) -> list[Any]:
            reader = module.LineReader(limit, policy)
            log: list[Any] = []
            for view, op in zip(views, script, strict=True):
                log += [norm(x) for x in reader.feed(view)]
                if op == 0:
                    log.append([norm(x) for x in reader.feed(b"")])
                elif op == 1:
                    log.append(reader.take_pending())
                log.append(reader.pending)
            return log

        self.compare(f"LineReader({limit}, {policy}) transcript", transcript)

        def drained(module: ModuleType) -> tuple[list[Any], bytes]:
            reader = module.LineReader(limit, policy)
            lines: list[Any] = []
            for view in views:
                lines += [norm(x) for x in reader.feed(view)]
                for _ in range(len(self.data) + 2):  # the stop rule: resume until nothing
                    more = reader.feed(b"")
                    if not more:
                        break
                    lines += [norm(x) for x in more]
            return lines, reader.take_pending()

        got = self.compare(f"LineReader({limit}, {policy}) drained", drained)
        expected = ref_lines(self.data, limit, policy == "normalize")
        if got != expected:
            raise Mismatch(f"LineReader({limit}, {policy}) != reference: {got!r:.600}")

    def data_reader(self, policy: str) -> None:
        rng = self.rng
        max_size = rng.choice([0, 0, rng.randrange(0, 80), rng.randrange(0, len(self.data) + 9)])
        limit = rng.choice([0, 0, rng.randrange(1, 30), rng.randrange(30, 300), 1000, 2002])
        views = self.views()

        def transcript(module: ModuleType) -> tuple[list[Any], bytes, bytes]:
            reader = module.DataReader(max_size, limit, policy)
            steps: list[Any] = []
            rest = b""
            for index, view in enumerate(views):
                if reader.done:
                    rest = b"".join(self.pieces[index:])
                    break
                steps.append((reader.feed(view), reader.size, norm(reader.error), reader.done))
            return steps, rest, reader.trailing

        steps, rest, trailing = self.compare(
            f"DataReader({max_size}, {limit}, {policy})", transcript
        )
        _, size, error, done = steps[-1]
        got = DataResult(
            done, trailing + rest if done else b"", b"".join(s[0] for s in steps), size, bool(error)
        )
        expected = ref_data(self.data, max_size, limit, policy == "normalize")
        if got.error and expected.error:
            got.output = expected.output = b""  # what came before an error is for discarding
        if got != expected:
            raise Mismatch(
                f"DataReader({max_size}, {limit}, {policy}) != reference: {got!r:.500} "
                f"expected {expected!r:.500}"
            )

    def bdat_reader(self) -> None:
        rng = self.rng
        data = self.data
        size = rng.choice([0, rng.randrange(0, len(data) + 1), len(data) + rng.randrange(1, 9)])
        received = rng.choice([0, rng.randrange(0, 100)])
        max_size = rng.choice([0, rng.randrange(0, size + received + 2)])
        if rng.random() < 0.05:
            # The integer boundaries: BDAT 9223372036854775808 once overflowed one core and
            # not the other. Out of range, both must refuse the same way.
            size, max_size, received = (
                rng.choice([value, *SIZE_BOUNDARIES]) for value in (size, max_size, received)
            )
            if max(size, max_size, received) > 2**63 - 1:
                self.compare(
                    f"BdatReader({size}, {max_size}, {received})",
                    lambda module: _constructed(module.BdatReader, size, max_size, received),
                )
                return
        views = self.views()

        def transcript(module: ModuleType) -> list[Any]:
            reader = module.BdatReader(size, max_size, received)
            log: list[Any] = [reader.done, reader.remaining, norm(reader.error)]
            for index, view in enumerate(views):
                if reader.done:
                    log.append(("rest", b"".join(self.pieces[index:])))
                    break
                chunk = reader.feed(view)
                log.append((chunk, reader.size, reader.remaining, norm(reader.error), reader.done))
            log.append(reader.trailing)
            return log

        log = self.compare(f"BdatReader({size}, {max_size}, {received})", transcript)
        chunks = b"".join(e[0] for e in log[3:-1] if isinstance(e, tuple) and e[0] != "rest")
        rest = b"".join(e[1] for e in log[3:-1] if isinstance(e, tuple) and e[0] == "rest")
        taken = min(size, len(data))
        too_big = bool(max_size) and received + taken > max_size
        if size <= len(data) and log[-1] + rest != data[size:]:
            raise Mismatch(f"BdatReader({size}): trailing {log[-1]!r:.200}")
        if not too_big and chunks != data[:taken]:
            raise Mismatch(f"BdatReader({size}): chunk {chunks!r:.200}")
        final = [e for e in log[3:-1] if isinstance(e, tuple) and e[0] != "rest"]
        if size > len(data) and final and (final[-1][2], final[-1][4]) != (size - len(data), False):
            raise Mismatch(f"BdatReader({size}): remaining/done {final[-1]!r:.200}")

    def split_command(self) -> None:
        line = self.data[: self.rng.randrange(0, 300)]
        got = self.compare("split_command", lambda m: m.split_command(as_buffer(self.rng, line)))
        verb, _, argument = line.lstrip(b" ").partition(b" ")
        if got != (verb.upper(), argument.strip(b" ")):
            raise Mismatch(f"split_command({line!r:.200}) = {got!r}")

    def scan_path(self) -> None:
        rng = self.rng
        keyword = rng.choice([b"FROM:", b"TO:"])
        if rng.random() < 0.8:
            argument = path_input(rng, keyword)
        else:
            argument = self.data[: rng.randrange(0, 300)]
        got = self.compare(
            f"scan_path({argument!r:.300}, {keyword!r})",
            lambda m: m.scan_path(as_buffer(rng, argument), keyword),
        )
        expected = ref_scan_path(argument, keyword)
        if got is not None:
            got = (got[0], got[1], got[2].decode("utf-8", "surrogateescape"))
        if got != expected:
            raise Mismatch(
                f"scan_path({argument!r:.300}, {keyword!r}) = {got!r:.300}, "
                f"the Python fast path finds {expected!r:.300}"
            )
        if expected is not None:
            text = after_keyword(argument, keyword)
            assert text is not None
            address, rest = addresses.parse_path(
                text, allow_null=True, allow_utf8=True, allow_postmaster=keyword == b"TO:"
            )
            if (address.local_part, address.domain, rest) != expected:
                raise Mismatch(f"parse_path({text!r:.300}) = {address!r}, {rest!r:.100}")

    def round_trip(self) -> None:
        rng = self.rng
        normalize = rng.random() < 0.5
        text = self.data if normalize else self.data.replace(b"\r", b"")
        lines = [line.rstrip(b"\r") for line in text.split(b"\n")]  # no CRLF inside
        junk = rng.choice([b"", b"QUIT\r\n", b".\r\n", rng.randbytes(5)])
        framed = stuff(lines) + junk
        body = b"".join(line + b"\r\n" for line in lines)
        policy = "normalize" if normalize else "reject"
        pieces = random_splits(rng, framed)

        def run(module: ModuleType) -> tuple[bytes, bool, Any, bytes]:
            reader = module.DataReader(0, 0, policy)
            out = []
            rest = b""
            for index, piece in enumerate(pieces):
                if reader.done:
                    rest = b"".join(pieces[index:])
                    break
                out.append(reader.feed(piece))
            return b"".join(out), reader.done, reader.error, reader.trailing + rest

        got = self.compare("round trip", run)
        if got != (body, True, None, junk):
            raise Mismatch(f"round trip ({policy}): {got!r:.300} for {body!r:.300}")

    def buffer_pool(self) -> None:
        rng = self.rng
        size, max_free = rng.randrange(1, 64), rng.randrange(0, 5)
        ops = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]

        def run(module: ModuleType) -> list[Any]:
            pool = module.BufferPool(size, max_free)
            held: list[bytearray] = []
            log: list[Any] = []
            for op in ops:
                try:
                    if op <= 1:
                        held.append(pool.acquire())
                    elif op == 2 and held:
                        pool.release(held.pop(rng.randrange(len(held))))
                    else:
                        pool.release(bytearray(size if op == 3 else size + 1))
                    log.append("ok")
                except ValueError:
                    log.append("ValueError")
                if pool.allocated != pool.in_use + pool.free:
                    raise Mismatch(f"{module.__name__}.BufferPool counters {pool!r}")
                log.append((pool.allocated, pool.in_use, pool.free))
            return log

        state = rng.getstate()
        pure = run(_parser_py)
        if _compiled is not None:
            rng.setstate(state)  # the same choices of which buffer to release
            if run(_compiled) != pure:
                raise Mismatch("BufferPool transcripts differ")


def check_input(seed: int, index: int) -> None:
    """Input ``index`` of the run with ``seed``; raises Mismatch (or anything) on a finding."""
    rng = random.Random(f"{seed}:{index}")
    data = random_input(rng)
    checker = Checker(rng, data, random_splits(rng, data))
    checker.line_reader()
    checker.data_reader("reject")
    checker.data_reader("normalize")
    checker.bdat_reader()
    checker.split_command()
    checker.scan_path()
    checker.round_trip()
    if index % 64 == 0:
        checker.buffer_pool()


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Tally:
    inputs: int = 0
    mismatches: int = 0
    exceptions: int = 0
    reports: list[str] = field(default_factory=list)


def run_range(seed: int, indexes: Iterator[int], deadline: float, verbose: bool) -> Tally:
    tally = Tally()
    for index in indexes:
        if time.monotonic() >= deadline:
            break
        try:
            check_input(seed, index)
        except Mismatch as problem:
            tally.mismatches += 1
            tally.reports.append(f"input {index}: {problem}")
        except Exception as error:  # an escape is a finding too
            tally.exceptions += 1
            tally.reports.append(f"input {index}: {type(error).__name__}: {error}")
        tally.inputs += 1
        if verbose and tally.reports:
            print(tally.reports[-1], file=sys.stderr)
            tally.reports.clear()
    return tally


def _worker(seed: int, start: int, stop: int, step: int, deadline: float) -> Tally:
    return run_range(seed, iter(range(start, stop, step)), deadline, False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs (1,000,000)")
    parser.add_argument("--seconds", type=float, default=900.0, help="time bound (900)")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--start", type=int, default=0, help="the first input's index")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1)")
    parser.add_argument("--verbose", action="store_true", help="print every finding at once")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    cores = "compiled and pure" if _compiled is not None else "pure only (compiled not built)"
    print(f"fuzz_parser: seed={seed} start={args.start} count={args.count} cores: {cores}")
    sys.stdout.flush()
    started = time.monotonic()
    deadline = started + args.seconds
    stop = args.start + args.count
    if args.jobs <= 1:
        tallies = [run_range(seed, iter(range(args.start, stop)), deadline, args.verbose)]
    else:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(_worker, seed, args.start + job, stop, args.jobs, deadline)
                for job in range(args.jobs)
            ]
            tallies = [future.result() for future in futures]
    total = Tally()
    for tally in tallies:
        total.inputs += tally.inputs
        total.mismatches += tally.mismatches
        total.exceptions += tally.exceptions
        total.reports += tally.reports
    for report in sorted(total.reports)[:20]:
        print("  " + report)
    if total.reports:
        print(f"  replay one: --seed {seed} --start INPUT --count 1 --verbose")
    print(
        f"fuzz_parser: inputs={total.inputs} mismatches={total.mismatches} "
        f"exceptions={total.exceptions} seconds={time.monotonic() - started:.1f}"
    )
    return 1 if total.mismatches or total.exceptions else 0


if __name__ == "__main__":
    sys.exit(main())
