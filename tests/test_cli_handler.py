"""The CLI's ``--handler MODULE:NAME [--handler-arg KEY=VALUE]`` and ``--unix PATH``: the CLI as a
real process, with a handler module written to a tmp dir on ``PYTHONPATH``, served over a
Unix socket (LMTP, as an MTA would deliver) and over TCP; and every misuse refused in one line.
"""

from __future__ import annotations

import concurrent.futures
import mailbox
import os
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from _cli import start_cli, start_unix, stop_cli
from _lmtp import lmtp_send

HANDLERS = '''
import asyncio, json, os

def on_session(session):
    """on_session itself: refuses one recipient, answers the message with its own words."""
    def rcpt(sender, e):
        if e.command.recipient_address.local_part == "nobody":
            return "550 5.1.1 no such user (from the handler)"
    session.rcpt += rcpt
    session.message_received += lambda s, e: "250 2.0.0 kept by the handler"

class Spool:
    """A factory (a class): each instance is an on_session; writes one JSON line a message."""
    def __init__(self, spool, tag="spool"):
        self.spool, self.tag = spool, tag
    def __call__(self, session):
        session.message_received += self.received
    def received(self, session, e):
        with open(self.spool, "a") as f:
            f.write(json.dumps({"tag": self.tag, "peer": str(session.peer),
                                "rcpt": [str(r) for r in e.envelope.recipients],
                                "size": len(e.message)}) + "\\n")
        return [None] * len(e.envelope.recipients) if session.lmtp else None

def make_policy(refuse):
    """A factory (a function, given --handler-arg): refuses one recipient, passes the rest."""
    def on_session(session):
        session.rcpt += lambda s, e: ("550 5.7.1 refused by policy"
                                      if str(e.command.recipient_address) == refuse else None)
    return on_session

async def slow_greeting(session):
    await asyncio.sleep(0.01)
    session.start_transaction("220 cli.test greeted by the handler")

CONSTANT = 42

def returns_a_number(number):
    return int(number)
'''

BROKEN = "import no_such_dependency_here\n"


@pytest.fixture(scope="module")
def handler_dir() -> Iterator[Path]:
    # Short: it also holds the Unix sockets (107 bytes for a socket's path).
    directory = Path(tempfile.mkdtemp(prefix="alephsmtp-cli-"))
    (directory / "myhandlers.py").write_text(HANDLERS)
    (directory / "brokenhandlers.py").write_text(BROKEN)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def env(handler_dir: Path) -> Iterator[None]:
    """PYTHONPATH with the handler modules, for the CLI processes this test starts."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(handler_dir), old]))
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return out, err


# --- serving ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("env")
def test_lmtp_on_a_unix_socket_with_a_handler_factory(handler_dir: Path) -> None:
    path = handler_dir / "lmtp.sock"
    spool = handler_dir / "spool.jsonl"
    process = start_unix(
        path,
        "--lmtp",
        "--unix-mode",
        "600",
        "--handler",
        "myhandlers:Spool",
        "--handler-arg",
        f"spool={spool}",
        "--handler-arg",
        "tag=lmtp",
    )
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        replies = lmtp_send(
            path,
            "alice@example.org",
            ["bob@example.net", "carol@example.net"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        assert [code for code, _ in replies.values()] == [250, 250]
    finally:
        out, _ = stop(process)
    assert not path.exists()  # removed at the graceful stop
    # The handler is the whole behaviour (no output option): nothing printed.
    assert out == ""
    (line,) = spool.read_text().splitlines()
    assert '"tag": "lmtp"' in line
    assert f'"peer": "{path}"' in line
    assert '"rcpt": ["bob@example.net", "carol@example.net"]' in line


@pytest.mark.usefixtures("env")
def test_a_handler_runs_before_the_outputs(handler_dir: Path, tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    process, port = start_cli(
        "--maildir", str(maildir), "--handler", "myhandlers:make_policy",
        "--handler-arg", "refuse=eve@example.net",
    )  # fmt: skip
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            refused = client.sendmail(
                "alice@example.org",
                ["bob@example.net", "eve@example.net"],
                b"Subject: stored\r\n\r\nbody\r\n",
            )
    finally:
        stop_cli(process)
    assert refused == {"eve@example.net": (550, b"5.7.1 refused by policy")}
    (stored,) = mailbox.Maildir(str(maildir)).values()
    assert stored["Subject"] == "stored"
    assert stored["Delivered-To"] == "bob@example.net"


@pytest.mark.usefixtures("env")
def test_a_handler_that_answers_the_message_itself() -> None:
    process, port = start_cli("--handler", "myhandlers:on_session")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            client.mail("alice@example.org")
            assert client.rcpt("nobody@example.net") == (
                550,
                b"5.1.1 no such user (from the handler)",
            )
            client.rcpt("bob@example.net")
            assert client.data(b"Subject: answered\r\n\r\nbody\r\n") == (
                250,
                b"2.0.0 kept by the handler",
            )
    finally:
        out = stop_cli(process)
    assert "answered" not in out  # no --maildir etc.: the handler alone, nothing printed


@pytest.mark.usefixtures("env")
def test_an_async_on_session_with_print_output() -> None:
    process, port = start_cli("--handler", "myhandlers:slow_greeting", "--sink")
    try:
        client = smtplib.SMTP(timeout=30)
        try:
            assert client.connect("127.0.0.1", port) == (220, b"cli.test greeted by the handler")
            client.sendmail("alice@example.org", ["bob@example.net"], b"Subject: s\r\n\r\nx\r\n")
        finally:
            client.close()
    finally:
        stop_cli(process)


def test_the_module_may_come_from_the_current_directory(handler_dir: Path) -> None:
    """As ``python -m`` finds modules there; the handler module is not on PYTHONPATH here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run(
        [sys.executable, "-m", "alephsmtp", "--port", "0", "--handler", "myhandlers:CONSTANT"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=handler_dir,
        env=env,
    )
    # Found (not "no module named"), and then refused for what it is.
    assert "is not callable (it is a int)" in result.stderr


# --- refused in one line ---------------------------------------------------------------------

REFUSED = [
    (["--handler", "nosuchmodule_xyz:on_session"], "--handler: no module named 'nosuchmodule_xyz'"),
    (["--handler", "myhandlers:nope"], "--handler: module myhandlers has no attribute 'nope'"),
    (["--handler", "myhandlers:CONSTANT"], "--handler: myhandlers:CONSTANT is not callable"),
    (["--handler", "myhandlers"], "--handler wants MODULE:NAME"),
    (["--handler", ":on_session"], "--handler wants MODULE:NAME"),
    (
        ["--handler", "brokenhandlers:x"],
        "--handler: importing brokenhandlers failed: ModuleNotFoundError: "
        "No module named 'no_such_dependency_here'",
    ),
    (
        ["--handler", "myhandlers:Spool"],
        "--handler: myhandlers:Spool() failed: TypeError:",
    ),
    (
        ["--handler", "myhandlers:make_policy", "--handler-arg", "wrong=1"],
        "--handler: myhandlers:make_policy(wrong='1') failed: TypeError:",
    ),
    (
        ["--handler", "myhandlers:returns_a_number", "--handler-arg", "number=1"],
        "--handler: myhandlers:returns_a_number(...) made a int, not a callable on_session",
    ),
    (["--handler", "myhandlers:Spool", "--handler-arg", "spool"], "--handler-arg wants KEY=VALUE"),
    (
        ["--handler", "myhandlers:Spool", "--handler-arg", "a=1", "--handler-arg", "a=2"],
        "--handler-arg a is given twice",
    ),
    (["--handler-arg", "a=1"], "--handler-arg needs --handler"),
    (["--unix-mode", "600"], "--unix-mode needs --unix"),
    (["--unix", "{dir}/x.sock", "--unix-mode", "999"], "argument --unix-mode: wants permissions"),
    (["--unix", "{dir}/x.sock", "--port", "25"], "--unix replaces --host and --port"),
    (["--unix", "{dir}/x.sock", "--host", "0.0.0.0"], "--unix replaces --host and --port"),
    (
        ["--unix", "{dir}/x.sock", "--proxy-protocol", "--proxy-trusted", "10.0.0.0/8"],
        "--proxy-trusted does not apply to --unix",
    ),
    (["--unix", "{dir}/no/such/dir/x.sock"], "cannot listen on unix:{dir}/no/such/dir/x.sock: "),
    (["--unix", "{dir}/file.txt"], "cannot listen on unix:{dir}/file.txt: "),
]


def _run(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str] | None:
    # --port 0 unless --unix: a command line wrongly accepted then listens somewhere harmless.
    first = [] if "--unix" in argv else ["--port", "0"]
    try:
        return subprocess.run(
            [sys.executable, "-m", "alephsmtp", *first, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None  # accepted: it started serving


@pytest.fixture(scope="module")
def refusals(handler_dir: Path) -> dict[tuple[str, ...], subprocess.CompletedProcess[str] | None]:
    """Every command line of REFUSED, a few processes at a time."""
    (handler_dir / "file.txt").write_text("not a socket")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(handler_dir), old]))
    try:
        argvs = [tuple(a.format(dir=handler_dir) for a in argv) for argv, _ in REFUSED]
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            return dict(zip(argvs, pool.map(_run, argvs), strict=True))
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.parametrize(("argv", "named"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_misuse_is_refused_in_one_line(
    handler_dir: Path,
    refusals: dict[tuple[str, ...], subprocess.CompletedProcess[str] | None],
    argv: list[str],
    named: str,
) -> None:
    result = refusals[tuple(a.format(dir=handler_dir) for a in argv)]
    assert result is not None, f"accepted: it was still serving after 30 s: {argv}"
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("alephsmtp: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert named.format(dir=handler_dir) in result.stderr
    assert (handler_dir / "file.txt").read_text() == "not a socket"


def test_the_example_in_docs_cli_md(tmp_path: Path, handler_dir: Path) -> None:
    """docs/cli.md's mymail.py and command line, as written there (paths made local)."""
    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    if not page.is_file():
        pytest.skip("docs/ is not shipped here (an installed wheel's tests)")
    text = page.read_text(encoding="utf-8")
    code = text.split("```python\n# mymail.py", 1)[1].split("```", 1)[0]
    command = text.split("```sh\nalephsmtp --lmtp --unix", 1)[1].split("```", 1)[0]
    assert "--handler mymail:Recipients --handler-arg allowed=" in command
    (tmp_path / "mymail.py").write_text("# mymail.py" + code)
    allowed = tmp_path / "recipients"
    allowed.write_text("bob@example.net\ncarol@example.net\n")
    maildir = tmp_path / "Maildir"
    path = handler_dir / "docs-example.sock"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), old]))
    try:
        process = start_unix(
            path, "--lmtp", "--maildir", str(maildir),
            "--handler", "mymail:Recipients", "--handler-arg", f"allowed={allowed}",
        )  # fmt: skip
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        recipients = ["bob@example.net", "mallory@example.net"]
        replies = lmtp_send(path, "alice@example.org", recipients, b"Subject: doc\r\n\r\nx\r\n")
    finally:
        stop(process)
    assert replies["mallory@example.net"] == (550, b"5.1.1 No such user here")
    assert replies["bob@example.net"][0] == 250
    (stored,) = mailbox.Maildir(str(maildir)).values()
    assert stored["Subject"] == "doc"
