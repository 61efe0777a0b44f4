"""Helpers shared by the benchmark scripts: test data, processes, /proc readings, tables, JSON.

Not a benchmark itself; ``parser.py``, ``server.py`` and ``memory.py`` import it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KiB = 1024
MiB = 1024 * 1024


def postfix_tool(name: str) -> str | None:
    """Path of one of Postfix's programs (``smtp-source``, ``smtp-sink``), or ``None``.

    Debian puts them in /usr/sbin, which a non-root user's PATH often lacks.
    """
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


# --- test data -------------------------------------------------------------------------------

_WORDS = (  # noqa: SIM905
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no "
    "message server client delivery queue header body envelope sender recipient transaction "
    "reply status pipelining extension buffer connection session timeout mailbox domain"
).split()
_WORDS_8BIT = (  # noqa: SIM905
    "привет мир сообщение сервер почта получатель отправитель доставка "
    "γειά σου κόσμε μήνυμα διακομιστής ταχυδρομείο "  # noqa: RUF001
    "日本語 メール サーバー 配信 受信者 送信者 "
    "中文 邮件 服务器 收件人 "
    "Grüße Straße Überweisung façade naïve coöperate "
    "😀 📧 ✉️ 🚀"
).split()


def _line(rng: random.Random, words: Sequence[str], width: int) -> str:
    """Words separated by spaces, cut or padded to exactly ``width`` characters."""
    parts: list[str] = []
    length = -1
    while length < width:
        word = rng.choice(words)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:width].rstrip().ljust(width, "x")


def _fill(lines: Sequence[bytes], size: int, rng: random.Random) -> bytes:
    """Random lines from ``lines`` (each with its CRLF) until ``size`` bytes are reached."""
    out: list[bytes] = []
    total = 0
    while total < size:
        line = rng.choice(lines)
        out.append(line)
        total += len(line)
    return b"".join(out)


def _with_dots(lines: list[bytes], rng: random.Random, share: float) -> list[bytes]:
    """Make ``share`` of ``lines`` start with a dot (so they are dot-stuffed on the wire).

    The dot replaces the first character (an empty line gets one), so lengths stay the same.
    """
    return [
        (b"." + line[1:] if len(line) > 2 else b"." + line) if rng.random() < share else line
        for line in lines
    ]


def ascii_body(size: int, dot_share: float = 0.015, seed: int = 1) -> bytes:
    """Plain ASCII text: 76-character lines, ``dot_share`` of them starting with a dot."""
    rng = random.Random(seed)
    lines = [_line(rng, _WORDS, 76).encode("ascii") + b"\r\n" for _ in range(2000)]
    return _fill(_with_dots(lines, rng, dot_share), size, rng)


def utf8_body(size: int, dot_share: float = 0.015, seed: int = 2) -> bytes:
    """8-bit text, mostly non-ASCII UTF-8: 76-character lines (about 120-200 bytes each)."""
    rng = random.Random(seed)
    lines = [_line(rng, _WORDS_8BIT, 76).encode("utf-8") + b"\r\n" for _ in range(2000)]
    return _fill(_with_dots(lines, rng, dot_share), size, rng)


def short_lines_body(size: int, dot_share: float = 0.02, seed: int = 3) -> bytes:
    """Short lines (0-12 characters), like a list or a quoted reply; some start with a dot."""
    rng = random.Random(seed)
    lines = [_line(rng, _WORDS, rng.randint(1, 12)).encode("ascii") + b"\r\n" for _ in range(500)]
    lines += [b"\r\n"] * 50 + [b">\r\n", b"-- \r\n"]
    return _fill(_with_dots(lines, rng, dot_share), size, rng)


def command_stream(size: int, seed: int = 4) -> bytes:
    """Pipelined SMTP command lines (RFC 2920 groups without DATA), CRLF-terminated."""
    rng = random.Random(seed)
    domains = ["example.org", "example.net", "mail.example.com", "xn--bcher-kva.example"]
    out: list[bytes] = []
    total = 0
    n = 0
    while total < size:
        n += 1
        sender = f"{rng.choice(_WORDS)}.{rng.choice(_WORDS)}{n % 997}@{rng.choice(domains)}"
        group = [f"MAIL FROM:<{sender}> SIZE={rng.randint(500, 10_000_000)} BODY=8BITMIME"]
        for _ in range(rng.randint(1, 4)):
            rcpt = f"{rng.choice(_WORDS)}{rng.randint(1, 9999)}@{rng.choice(domains)}"
            notify = " NOTIFY=SUCCESS,FAILURE" if rng.random() < 0.2 else ""
            group.append(f"RCPT TO:<{rcpt}>{notify}")
        group.append(rng.choice(["RSET", "NOOP", "rset", "HELP", "VRFY postmaster"]))
        chunk = "".join(line + "\r\n" for line in group).encode("ascii")
        out.append(chunk)
        total += len(chunk)
    return b"".join(out)


def dot_stuff(body: bytes) -> bytes:
    """RFC 5321 4.5.2: a line that starts with a dot gets another one (``body`` ends in CRLF)."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def message_text(size: int, dot_share: float, seed: int = 5) -> str:
    """A mail message of about ``size`` bytes (CRLF counted) with LF line ends, as a file holds.

    Headers, a blank line, then 76-character ASCII lines, ``dot_share`` of them starting with a
    dot. The same file feeds ``smtp-source -F`` and the bundled Python load client.
    """
    rng = random.Random(seed)
    headers = [
        "From: Bench Sender <sender@example.org>",
        "To: Bench Recipient <rcpt@example.net>",
        "Subject: alephsmtp benchmark message",
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        "Message-ID: <bench.0@example.org>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    lines = list(headers)
    total = sum(len(line) + 2 for line in lines)
    pool = [_line(rng, _WORDS, 76) for _ in range(500)]
    while total < size:
        line = rng.choice(pool)
        if rng.random() < dot_share:
            line = "." + line[1:]
        room = size - total - 2
        if room < len(line):
            line = line[: max(room, 1)]
        lines.append(line)
        total += len(line) + 2
    return "".join(line + "\n" for line in lines)


def wire_message(text: str) -> bytes:
    """What ``smtp-source -F`` sends for a file: CRLF line ends, dot-stuffed, then ``.<CRLF>``."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = [("." + line if line.startswith(".") else line) + "\r\n" for line in lines]
    return "".join(out).encode("utf-8") + b".\r\n"


def message_size(text: str) -> int:
    """The size of the message the server receives (CRLF line ends, unstuffed)."""
    return len(text.encode("utf-8")) + text.count("\n")


# --- processes and /proc -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str = "VmRSS") -> int:
    """A memory figure in KiB from ``/proc/<pid>/status``: VmRSS (resident), VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def free_port(low: int = 20000, high: int = 32767) -> int:
    """A TCP port free on 127.0.0.1 below the ephemeral range (so clients never take it)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(low, high)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (up to the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                # Read the greeting and say goodbye, so the server is not left with a broken
                # session in its logs.
                with contextlib.suppress(OSError):
                    sock.recv(512)
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(512)
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class ServerSpec:
    """A server under test: a name, how to start it, and what it is."""

    name: str
    kind: str  # "alephsmtp", "aiosmtpd", "floor" (a reference protocol) or "smtp-sink"
    loop: str = "asyncio"  # "asyncio", "uvloop" or "-" (not Python)
    pure: bool = False  # alephsmtp with ALEPHSMTP_NO_EXTENSIONS=1

    def command(self, port: int) -> list[str]:
        if self.kind == "smtp-sink":
            sink = postfix_tool("smtp-sink")
            assert sink is not None
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            # -m: its default of 256 simultaneous sessions would queue the rest (memory.py)
            return [sink, *user, "-m", "10000", "-c", f"127.0.0.1:{port}", "1000"]
        runner = str(HERE / "_servers.py")
        return [sys.executable, runner, self.kind, "--loop", self.loop, "--port", str(port)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("ALEPHSMTP_NO_EXTENSIONS", None)
        if self.pure:
            env["ALEPHSMTP_NO_EXTENSIONS"] = "1"
        return env


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def have_aiosmtpd() -> bool:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        return False
    return True


def all_servers() -> tuple[list[ServerSpec], list[str]]:
    """Every server that can run here, and notes about those that cannot."""
    notes: list[str] = []
    uv = have_uvloop()
    specs = [ServerSpec("alephsmtp-cython-asyncio", "alephsmtp")]
    if uv:
        specs.append(ServerSpec("alephsmtp-cython-uvloop", "alephsmtp", "uvloop"))
    specs.append(ServerSpec("alephsmtp-pure-asyncio", "alephsmtp", pure=True))
    if have_aiosmtpd():
        specs.append(ServerSpec("aiosmtpd-asyncio", "aiosmtpd"))
        if uv:
            specs.append(ServerSpec("aiosmtpd-uvloop", "aiosmtpd", "uvloop"))
    else:
        notes.append("aiosmtpd is not installed: skipped (pip install aiosmtpd)")
    if not uv:
        notes.append("uvloop is not installed: the uvloop variants are skipped")
    # The event loop's own cost: no SMTP server on that loop can spend less (see _servers.py).
    specs.append(ServerSpec("floor-asyncio", "floor"))
    if uv:
        specs.append(ServerSpec("floor-uvloop", "floor", "uvloop"))
    if postfix_tool("smtp-sink"):
        specs.append(ServerSpec("postfix-smtp-sink", "smtp-sink", "-"))
    else:
        notes.append("Postfix smtp-sink is not installed: skipped (Debian package postfix)")
    return specs, notes


def select_servers(specs: list[ServerSpec], patterns: str | None) -> list[ServerSpec]:
    """Keep the servers whose name contains one of the comma-separated ``patterns``."""
    if not patterns:
        return specs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [s for s in specs if any(p in s.name for p in wanted)]


@dataclass(eq=False)
class ServerProcess:
    """A server under test, started as its own process; always killed by :meth:`stop`. Its
    stderr goes to ``<log_dir>/<name>.stderr.log`` (beside the results file)."""

    spec: ServerSpec
    log_dir: Path = RESULTS
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    implementation: str = ""
    _log: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.spec.name}.stderr.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.spec.command(self.port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.spec.kind != "smtp-sink" else subprocess.DEVNULL,
            stderr=self._log,
            env=self.spec.environment(),
            start_new_session=True,  # Ctrl-C reaches only us; we stop the servers ourselves
        )
        _RUNNING.add(self)
        if self.spec.kind == "smtp-sink":
            wait_for_port(self.port, timeout, self.proc)
            self.implementation = "C"
            return
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.startswith(b"READY"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
        if not line.startswith(b"READY"):
            self.stop()
            tail = "\n".join(self.stderr_text().splitlines()[-15:])
            raise RuntimeError(f"{self.spec.name} did not start; its stderr ends with:\n{tail}")
        # "READY <port> <implementation>"
        self.implementation = line.split()[2].decode()

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far (warnings, tracebacks)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        _RUNNING.discard(self)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RUNNING: set[ServerProcess] = set()


def stop_all_servers() -> None:
    """Kill every server process still running (on errors, Ctrl-C or SIGTERM)."""
    for server in list(_RUNNING):
        server.stop()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def server_cleanup() -> Iterator[None]:
    """Run a benchmark so that every server it started is stopped, whatever happens."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        stop_all_servers()
        signal.signal(signal.SIGTERM, previous)


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's ``main``: line-buffered output, exit 130 on Ctrl-C or SIGTERM."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        status = main()
    except KeyboardInterrupt:
        print("\ninterrupted; every server process was stopped", file=sys.stderr)
        status = 130
    sys.exit(status)


# --- reporting -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What ran the benchmark."""
    import alephsmtp

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "alephsmtp": alephsmtp.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule, *(fmt(row) for row in cells[1:])])


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write the results, creating the directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults written to {target}")


def distinct_counts(lines: Sequence[str]) -> list[str]:
    """Repeated lines grouped, in order of first appearance: ``"<count> x <line>"``."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [line if n == 1 else f"{n} x {line}" for line, n in counts.items()]


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``"1.23x"``, or ``"-"``."""
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"
