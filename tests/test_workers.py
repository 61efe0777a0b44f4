"""``SmtpServer(..., workers=N).run()``: N processes on one port (SO_REUSEPORT), the loop, and
the supervisor (:mod:`alephsmtp.workers`) that restarts workers and gives up on failing ones.

Each test runs a small script as a real process tree on 127.0.0.1 and talks to it with
smtplib; the handler appends a line per message (worker pid, loop module, subject) to a file.
The supervisor's own tests run it over small serving functions (one that crashes at start,
one that serves briefly), with short restart delays, and the CLI as ``python -m alephsmtp``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alephsmtp import SmtpServer
from alephsmtp.server import _loop_runner
from alephsmtp.workers import WorkerSupervisor

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"),
    reason="workers need SO_REUSEPORT and fork",
)

SCRIPT = """
import asyncio, logging, os, sys
from alephsmtp import SmtpServer

out, workers, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(process)d %(name)s %(message)s"
)

def on_session(session):
    def received(sender, e):
        subject = e.message.split(b"Subject: ", 1)[1].split(b"\\r\\n", 1)[0].decode()
        module = type(asyncio.get_running_loop()).__module__.split(".")[0]
        with open(out, "a") as f:
            f.write(f"{os.getpid()} {module} {subject}\\n")
    session.message_received += received

SmtpServer("127.0.0.1", 0, workers=workers, hostname="mx.test").run(on_session, loop=loop)
"""

LISTENING = re.compile(r"^(\d+) alephsmtp\.server listening on 127\.0\.0\.1:(\d+)$", re.M)
STARTED = re.compile(r"worker \d+ started \(pid (\d+)\)")


class Served:
    """A server (or supervisor) running as a process, its log, and what its handler recorded."""

    def __init__(self, tmp_path: Path, *command: str) -> None:
        self.out = tmp_path / "messages.txt"
        self.log_path = tmp_path / "stderr.log"
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, *command],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env=os.environ.copy(),
        )
        self.port = 0
        self.listener_pids: set[int] = set()

    @classmethod
    def script(cls, tmp_path: Path, workers: int, loop: str = "auto") -> Served:
        """SCRIPT with ``workers``, once every worker listens."""
        script = tmp_path / "serve.py"
        script.write_text(SCRIPT)
        served = cls(tmp_path, str(script), str(tmp_path / "messages.txt"), str(workers), loop)
        served.port, served.listener_pids = served._wait_listening(workers)
        return served

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_listening(self, count: int) -> tuple[int, set[int]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # bounded by the deadline
            found = LISTENING.findall(self.log())
            if len(found) >= count:
                ports = {int(port) for _, port in found}
                assert len(ports) == 1, f"workers on different ports: {ports}"
                return ports.pop(), {int(pid) for pid, _ in found}
            assert self.process.poll() is None, f"server exited early:\n{self.log()}"
            time.sleep(0.05)
        pytest.fail(f"server not listening:\n{self.log()}")

    def records(self) -> list[tuple[int, str, str]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [(int(pid), module, subject) for pid, module, subject in map(str.split, lines)]

    def wait_records(self, count: int) -> list[tuple[int, str, str]]:
        """The records, once ``count`` are written (the reply to DATA comes after)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded by the deadline
            records = self.records()
            if len(records) >= count:
                return records
            time.sleep(0.02)
        return self.records()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        """Last resort for a failed test: the whole tree, by pid."""
        for pid in self.listener_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log_file.close()


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start the script (``serve(workers, loop="auto")``); whatever is left is killed after."""
    started: list[Served] = []

    def start(workers: int, loop: str = "auto") -> Served:
        served = Served.script(tmp_path, workers, loop)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it is gone but for its exit status)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it is read
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "a@client.example", ["b@mx.test"], f"Subject: {subject}\r\n\r\nbody\r\n".encode()
        )


def test_two_workers_share_the_port_and_stop_on_sigterm(serve: Serve) -> None:
    served = serve(2)
    workers = {int(pid) for pid in STARTED.findall(served.log())}
    assert len(workers) == 2
    assert served.listener_pids == workers
    assert served.process.pid not in workers
    for number in range(20):  # one connection each: the kernel spreads them over the sockets
        send(served.port, f"m{number}")
    records = served.wait_records(20)
    assert sorted(subject for _, _, subject in records) == sorted(f"m{n}" for n in range(20))
    pids = {pid for pid, _, _ in records}
    assert pids <= workers
    assert len(pids) > 1, "every message went to one worker"
    # uvloop is used automatically when it is installed.
    expected_loop = "uvloop" if _installed("uvloop") else "asyncio"
    assert {module for _, module, _ in records} == {expected_loop}
    assert served.stop() == 0
    assert not [pid for pid in workers if _alive(pid)], "worker processes left behind"
    log = served.log()
    for pid in workers:
        assert re.search(rf"\(pid {pid}\) stopped", log), log


def test_sigterm_lets_a_transaction_in_progress_finish(serve: Serve) -> None:
    served = serve(2)
    client = smtplib.SMTP("127.0.0.1", served.port, timeout=30)
    try:
        client.ehlo("client.example")
        client.mail("a@client.example")
        client.rcpt("b@mx.test")
        code, _ = client.docmd("DATA")
        assert code == 354
        served.process.send_signal(signal.SIGTERM)
        # Both workers stop accepting (their graceful stop has begun) before the message ends.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded by the deadline
            try:
                socket.create_connection(("127.0.0.1", served.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("workers still accept connections after SIGTERM")
        client.send(b"Subject: late\r\n\r\nbody\r\n.\r\n")
        code, _ = client.getreply()
        assert code == 250
        # Then, the transaction over, the session ends (RFC 5321 3.8).
        code, message = client.getreply()
        assert (code, message[:5]) == (421, b"4.3.2")
    finally:
        client.close()
    assert [subject for _, _, subject in served.wait_records(1)] == ["late"]
    assert served.stop() == 0


def test_loop_opt_out(serve: Serve) -> None:
    served = serve(1, loop="asyncio")
    send(served.port, "plain")
    assert [(module, subject) for _, module, subject in served.wait_records(1)] == [
        ("asyncio", "plain")
    ]
    assert served.stop() == 0


def test_address_in_use_fails_in_the_caller() -> None:
    # The parent binds before it forks: an address in use is an OSError here, no worker starts.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SmtpServer("127.0.0.1", taken.getsockname()[1], workers=2)
        with pytest.raises(OSError, match="in use"):
            server.run()


def test_loop_choice() -> None:
    assert _loop_runner("asyncio") is asyncio.run
    with pytest.raises(ValueError, match="loop must be"):
        _loop_runner("trio")
    if _installed("uvloop"):
        import uvloop

        assert _loop_runner("auto") is uvloop.run
        assert _loop_runner("uvloop") is uvloop.run
    else:
        assert _loop_runner("auto") is asyncio.run
        with pytest.raises(ImportError):
            _loop_runner("uvloop")


def test_workers_option_is_checked() -> None:
    with pytest.raises(ValueError, match="workers"):
        SmtpServer("127.0.0.1", 0, workers=0)


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --- restarts: a worker that dies is replaced ------------------------------------------------


def test_a_killed_worker_is_restarted_and_clients_keep_being_served(serve: Serve) -> None:
    served = serve(2)
    killed, survivor = sorted(served.listener_pids)
    os.kill(killed, signal.SIGKILL)
    # Logged once the supervisor has reaped it: its socket has left the port's group by then.
    restarted = re.compile(
        rf"worker (\d) \(pid {killed}\) was killed by SIGKILL after [\d.]+ s; "
        r"restarting it in 0\.5 s \(failure 1 of 5\)"
    )
    _wait_for(lambda: restarted.search(served.log()) is not None, served.log)
    for number in range(3):  # clients are served meanwhile
        send(served.port, f"meanwhile{number}")
    assert len(served.wait_records(3)) == 3
    _wait_for(lambda: len(LISTENING.findall(served.log())) == 3, served.log)
    new = {int(pid) for pid, _ in LISTENING.findall(served.log())} - {killed, survivor}
    assert len(new) == 1, served.log()
    replacement = new.pop()
    served.listener_pids.add(replacement)
    # The kernel spreads connections over both sockets: the new worker takes some (each
    # connection has even odds, so 40 all missing it would take 2**-40 luck).
    for number in range(40):
        send(served.port, f"after{number}")
        if replacement in {pid for pid, _, _ in served.wait_records(4 + number)}:
            break
    records = served.records()
    assert replacement in {pid for pid, _, _ in records}, served.log()
    assert {pid for pid, _, _ in records} == {survivor, replacement}
    assert served.stop() == 0
    assert not [pid for pid in (survivor, replacement) if _alive(pid)]
    log = served.log()
    for pid in (survivor, replacement):
        assert re.search(rf"\(pid {pid}\) stopped", log), log
    assert "Traceback" not in log


SUPERVISED = """
import json, logging, os, signal, sys, time
from alephsmtp.workers import WorkerSupervisor, WorkersFailed

mode, workers, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(
    logging.Formatter(
        "%(process)d %(worker)s %(levelname)s %(message)s", defaults={"worker": "-"}
    )
)
logging.basicConfig(level=logging.INFO, handlers=[handler])

def serve(port):
    logging.getLogger("serve").info("serving on %d", port)
    if mode == "crash":
        os._exit(3)
    if mode == "raise":
        raise ValueError("a bug at start")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # mode "brief"
    time.sleep(0.3)

try:
    WorkerSupervisor(**options).run(serve, workers, host="127.0.0.1", port=0)
except WorkersFailed as error:
    print(f"gave up: {error}", file=sys.stderr)
    sys.exit(7)
"""

# pid, worker number (or "-": not a worker), level, message
LINE = re.compile(r"^(\d+) (\d+|-) ([A-Z]+) (.*)$", re.M)


def supervise(tmp_path: Path, mode: str, workers: int, **options: float) -> Served:
    """The supervisor over ``serve`` in ``mode`` (crash, raise, brief), as a process."""
    script = tmp_path / "supervised.py"
    script.write_text(SUPERVISED)
    return Served(tmp_path, str(script), mode, str(workers), json.dumps(options))


def test_a_worker_that_fails_at_start_is_given_up_on(tmp_path: Path) -> None:
    served = supervise(
        tmp_path, "crash", 2, restart_delay=0.02, max_restart_delay=0.03, max_failures=3
    )
    try:
        assert served.process.wait(timeout=60) == 7
    finally:
        served.kill()
    log = served.log()
    lines = LINE.findall(log)
    supervisor = served.process.pid
    # Three starts for each worker, each a new process whose records carry its pid and number.
    starts = [(int(pid), number) for pid, number, _, text in lines if text.startswith("serving")]
    assert sorted(number for _, number in starts) == ["1", "1", "1", "2", "2", "2"]
    assert len({pid for pid, _ in starts}) == 6
    assert supervisor not in {pid for pid, _ in starts}
    # The supervisor's own records: its pid, no worker number.
    ours = [(level, text) for pid, number, level, text in lines if int(pid) == supervisor]
    assert all(number == "-" for pid, number, _, _ in lines if int(pid) == supervisor)
    for slot in (1, 2):
        warnings = [
            text for level, text in ours if level == "WARNING" and f"worker {slot} " in text
        ]
        assert len(warnings) == 2, log
        assert re.search(
            r"exited with status 3 after [\d.]+ s; restarting it in 0\.02 s "
            r"\(failure 1 of 3\)",
            warnings[0],
        ), log
        assert "restarting it in 0.03 s (failure 2 of 3)" in warnings[1], log  # doubled, capped
        errors = [text for level, text in ours if level == "ERROR" and f"worker {slot} " in text]
        assert len(errors) == 1, log
        assert "exited with status 3" in errors[0]
        assert "3 failures in a row, each within 60 s of its start; not restarting it" in errors[0]
    assert log.rstrip().splitlines()[-1] == (
        "gave up: every worker failed 3 times in a row, each within 60 s of its start; "
        "giving up (see the log for why)"
    )
    assert "Traceback" not in log


def test_a_bug_in_a_worker_is_logged_with_its_traceback(tmp_path: Path) -> None:
    served = supervise(tmp_path, "raise", 1, max_failures=1)
    try:
        assert served.process.wait(timeout=60) == 7
    finally:
        served.kill()
    log = served.log()
    assert re.search(r"^\d+ 1 CRITICAL worker 1 failed$", log, re.M), log
    assert "ValueError: a bug at start" in log
    assert re.search(r"worker 1 \(pid \d+\) exited with status 1 .* not restarting it", log)


def test_sigterm_during_a_restart_delay_stops_at_once(tmp_path: Path) -> None:
    # Both workers crash and wait 10 minutes for their restart: only the signal can end this.
    served = supervise(tmp_path, "crash", 2, restart_delay=600, max_restart_delay=600)
    try:
        waiting = re.compile(r"restarting it in 600 s")
        _wait_for(lambda: len(waiting.findall(served.log())) == 2, served.log)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
    finally:
        served.kill()
    log = served.log()
    assert re.search(r"INFO stopping 0 workers \(SIGTERM\)$", log, re.M), log
    assert log.rstrip().endswith("INFO stopped"), log
    assert log.count("serving on") == 2  # nothing restarted


def test_a_worker_that_ran_long_enough_starts_a_new_count(tmp_path: Path) -> None:
    # It serves 0.3 s, past stable_after, then exits: never more than one failure in a row.
    served = supervise(tmp_path, "brief", 1, restart_delay=0.02, stable_after=0.1, max_failures=2)
    try:
        first = "restarting it in 0.02 s (failure 1 of 2)"
        _wait_for(lambda: served.log().count(first) >= 3, served.log)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
    finally:
        served.kill()
    log = served.log()
    assert "exited with status 0 after 0." in log  # an exit nobody asked for, even a clean one
    assert "failure 2 of 2" not in log, log
    assert "not restarting" not in log, log


def test_restart_policy() -> None:
    default = WorkerSupervisor()
    assert [default.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, None]
    patient = WorkerSupervisor(restart_delay=1, max_restart_delay=5, max_failures=100)
    assert [patient.backoff(n) for n in (1, 2, 3, 4, 99)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert patient.backoff(100) is None
    with pytest.raises(ValueError, match="restart delays"):
        WorkerSupervisor(restart_delay=2, max_restart_delay=1)
    with pytest.raises(ValueError, match="max_failures"):
        WorkerSupervisor(max_failures=0)
    with pytest.raises(ValueError, match="stable_after"):
        WorkerSupervisor(stable_after=-1)


# --- the command line ------------------------------------------------------------------------

# asctime, [pid], logger, level, message
CLI_LINE = re.compile(r"^\S+ \S+ \[(\d+)\] (\S+) ([A-Z]+) (.*)$")


def _cli(tmp_path: Path, *args: str, runner: str | None = None) -> Served:
    """``python -m alephsmtp --sink ARGS`` (or ``runner`` in its place), as a process."""
    command = [runner] if runner else ["-m", "alephsmtp"]
    return Served(tmp_path, *command, "--hostname", "cli.test", "--sink", *args)


def test_cli_workers_log_their_pid_on_every_line(tmp_path: Path) -> None:
    served = _cli(tmp_path, "--port", "0", "--workers", "2")
    try:
        listening = re.compile(r"\[(\d+)\] alephsmtp\.server INFO listening on 127\.0\.0\.1:(\d+)")
        _wait_for(lambda: len(listening.findall(served.log())) == 2, served.log)
        found = listening.findall(served.log())
        served.listener_pids = {int(pid) for pid, _ in found}
        send(int(found[0][1]), "cli")
        _wait_for(lambda: " octets, accepted: 250" in served.log(), served.log)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0
    finally:
        served.kill()
    lines = served.log().splitlines()
    parsed = [CLI_LINE.match(line) for line in lines]
    assert all(parsed), lines
    records = [(int(m[1]), m[2], m[3], m[4]) for m in parsed if m]
    supervisor = served.process.pid
    workers = {int(pid) for pid in STARTED.findall(served.log())}
    assert workers == served.listener_pids
    assert supervisor not in workers
    assert {pid for pid, name, _, _ in records if name == "alephsmtp.workers"} == {supervisor}
    assert {pid for pid, name, _, _ in records if name != "alephsmtp.workers"} <= workers
    said = [(pid, text) for pid, _, _, text in records]
    assert (supervisor, f"started 2 workers on port {found[0][1]}") in said
    assert (supervisor, "stopping 2 workers (SIGTERM)") in said
    assert said[-1] == (supervisor, "stopped")
    for pid in workers:  # each worker's server says it stops and has stopped
        assert (pid, "stopping (0 session(s) open)") in said
        assert (pid, "stopped") in said


# Runs the CLI with a quicker restart policy than the default (0.5 s doubling, 5 failures),
# so that giving up takes a fraction of a second; nothing else changes.
QUICK_CLI = """
import sys
from alephsmtp import cli, server, workers

class Quick(workers.WorkerSupervisor):
    def __init__(self):
        super().__init__(restart_delay=0.02, max_restart_delay=0.05, max_failures=3)

server.WorkerSupervisor = Quick
sys.exit(cli.main())
"""


def test_cli_gives_up_on_failing_workers_in_one_line(tmp_path: Path) -> None:
    # A real reason for every worker to fail at start: the second address is taken (the
    # supervisor reserves the port on the first one only), so each worker's bind fails.
    with _taken_loopback_port() as (second, port):
        runner = tmp_path / "quick_cli.py"
        runner.write_text(QUICK_CLI)
        served = _cli(
            tmp_path,
            *("--host", "127.0.0.1", "--host", second, "--port", str(port), "--workers", "2"),
            runner=str(runner),
        )
        try:
            assert served.process.wait(timeout=60) == 1
        finally:
            served.kill()
    log = served.log()
    assert "Traceback" not in log
    *logged, last = log.rstrip().splitlines()
    assert last == (
        "alephsmtp: every worker failed 3 times in a row, each within 60 s of its start; "
        "giving up (see the log for why)"
    )
    assert all(CLI_LINE.match(line) for line in logged), log
    cannot = [line for line in logged if "cannot serve" in line]
    assert len(cannot) == 6, log
    assert all("address already in use" in line for line in cannot), log
    assert len([line for line in logged if "not restarting it" in line]) == 2


class _taken_loopback_port:
    """A second loopback address (127.0.0.2, or ::1 where that is missing) with a port taken
    there by a socket without SO_REUSEPORT: (address, port)."""

    def __enter__(self) -> tuple[str, int]:
        for family, address in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family)
            try:
                sock.bind((address, 0))
            except OSError:
                sock.close()
                continue
            sock.listen()
            self.sock = sock
            return address, int(sock.getsockname()[1])
        pytest.skip("no second loopback address (127.0.0.2 or ::1) to take a port on")

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def _wait_for(condition: Callable[[], bool], log: Callable[[], str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # bounded by the deadline
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out; the log:\n{log()}")
