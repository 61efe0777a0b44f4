"""Server CPU per message with a milter: alephsmtp + OpenDKIM against Postfix + OpenDKIM.

Run from the repository root, as root on Debian/Ubuntu (``scripts/install-peers`` installs
Postfix, OpenDKIM and opendkim-tools; ``scripts/bench-setup`` smtp-source)::

    python benchmarks/milter.py                 # 5,000 messages a run: about 8 minutes
    python benchmarks/milter.py --quick         # a smoke run, about a minute
    python benchmarks/milter.py --messages 2000 --repeat 3 --json /tmp/milter.json

One OpenDKIM signs every message (a key made by opendkim-genkey; 127.0.0.1 is an internal
host). In front of it, each in turn, on 127.0.0.1:

- alephsmtp (this checkout, compiled core; asyncio and uvloop) with ``Milters([opendkim])``
  and a handler that counts the messages that arrive signed, then discards them;
- Postfix 3.7 from a private configuration: ``smtpd_milters = opendkim``, chroot off,
  every queued message handed to the discard transport, ``max_use``/``max_idle`` high so that
  no smtpd or cleanup process exits during a run (its CPU would be lost);
- alephsmtp without any milter, as the reference for what the milter adds.

smtp-source sends 1 KiB messages (the same file to each), one per connection and on persistent
sessions, bounded in count and in time. The figure to read is the server's CPU per message:
utime + stime from ``/proc/<pid>/stat`` before and after each run, summed for Postfix over
its ``smtpd`` and ``cleanup`` processes (the ones that receive a message and run the milter
conversation; Postfix's queue manager and discard agent deliver, and are left out, as
alephsmtp delivers nothing). OpenDKIM's CPU per message is shown too: the same program doing
the same work behind both; it is the bottleneck, so msg/s is about OpenDKIM. With ``--repeat
N`` each figure is the best of N rounds (least server CPU per message). Results go to
``--json`` (default ``benchmarks/results/milter.json``), the servers' stderr logs beside it;
the exit status is 1 if any run had errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    KiB,
    cpu_seconds,
    format_table,
    free_port,
    have_uvloop,
    machine_info,
    message_size,
    message_text,
    postfix_tool,
    ratio,
    run_main,
    wait_for_port,
    write_json,
)

SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"
HOSTNAME = "bench.example"


def program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


# --- the alephsmtp server process (this script with --serve) -------------------------------------


async def serve(port: int, milter: str | None, loop_name: str) -> None:
    from alephsmtp import IMPLEMENTATION, SmtpServer
    from alephsmtp.milter import Milters

    counts = {"messages": 0, "signed": 0}

    def count(session: Any, e: Any) -> None:
        counts["messages"] += 1
        if e.message.startswith(b"DKIM-Signature: "):
            counts["signed"] += 1

    def on_session(session: Any) -> None:
        session.message_received += count

    server = SmtpServer("127.0.0.1", port, hostname=HOSTNAME, backlog=4096)
    if milter:
        await server.start(Milters([milter]).wrap(on_session))
    else:
        await server.start(on_session)
    print(f"READY {server.port} {IMPLEMENTATION} {loop_name}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    print(f"COUNTS {counts['messages']} {counts['signed']}", file=sys.stderr, flush=True)


def serve_main(args: argparse.Namespace) -> int:
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.serve, args.milter, args.loop))
    return 0


# --- the programs --------------------------------------------------------------------------------


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_opendkim(home: Path) -> tuple[Daemon, str]:
    genkey, opendkim = program("opendkim-genkey"), program("opendkim")
    assert genkey is not None and opendkim is not None
    subprocess.run([genkey, "-D", str(home), "-d", "example.org", "-s", "bench"], check=True)
    port = free_port()
    config = home / "opendkim.conf"
    config.write_text(
        "Syslog no\nMode s\nDomain example.org\nSelector bench\n"
        f"KeyFile {home}/bench.private\nRequireSafeKeys no\nCanonicalization relaxed/simple\n"
    )
    log = home / "opendkim.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [opendkim, "-f", "-x", str(config), "-p", f"inet:{port}@127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_port(port, 30, proc)
    return Daemon("opendkim", proc, log), f"inet:127.0.0.1:{port}"


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {home}/queue
data_directory = {home}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
default_transport = discard
relay_transport = discard
local_header_rewrite_clients =
smtputf8_enable = no
alias_maps =
alias_database =
maillog_file = /dev/stdout
notify_classes =
smtpd_milters = {milter}
milter_default_action = tempfail
max_use = 1000000
max_idle = 3600s
default_process_limit = 100
"""
POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
proxymap  unix  - - n - - proxymap
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Postfix:
    home: Path
    port: int
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, home: Path, milter: str) -> Postfix:
        postfix = program("postfix")
        assert postfix is not None
        port = free_port()
        (home / "queue").mkdir()
        (home / "data").mkdir()
        subprocess.run(["chown", "postfix", str(home / "data")], check=True)
        (home / "main.cf").write_text(
            POSTFIX_MAIN.format(home=home, hostname=HOSTNAME, milter=milter)
        )
        (home / "master.cf").write_text(POSTFIX_MASTER.format(port=port))
        log = (home / "postfix.out").open("wb")
        proc = subprocess.Popen(
            [postfix, "-c", str(home), "start-fg"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        postfix = cls(home, port, proc)
        try:
            wait_for_port(port, 60, proc)
        except BaseException:
            postfix.stop()  # whatever it started
            raise
        return postfix

    def master_pid(self) -> int:
        return int((self.home / "queue" / "pid" / "master.pid").read_text().split()[0])

    def receivers(self) -> dict[int, float]:
        """CPU seconds of each smtpd and cleanup process of this instance, by pid."""
        master = self.master_pid()
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[1]) == master and comm in (b"smtpd", b"cleanup"):
                cpu[int(entry)] = cpu_seconds(int(entry))
        return cpu

    def stop(self) -> None:
        postfix = program("postfix") or "postfix"
        subprocess.run([postfix, "-c", str(self.home), "stop"], capture_output=True, check=False)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class AlephServer:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, name: str, milter: str | None, loop: str, log_dir: Path) -> AlephServer:
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"milter-{name}.stderr.log"
        command = [sys.executable, __file__, "--serve", str(port), "--loop", loop]
        if milter:
            command += ["--milter", milter]
        env = dict(os.environ)
        env.pop("ALEPHSMTP_NO_EXTENSIONS", None)
        with log.open("wb") as err:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True
            )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"READY"):
            proc.kill()
            raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
        return cls(name, proc, port, log)

    def stop(self) -> tuple[int, int]:
        """Stop it; the (messages, signed) it counted."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        match = re.search(r"COUNTS (\d+) (\d+)", self.log.read_text())
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# --- load and measurement ------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    scenario: str
    messages: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    milter_cpu: float = 0.0
    msgs_per_s: float = 0.0
    cpu_us_per_msg: float | None = None
    milter_cpu_us_per_msg: float | None = None
    processes: int = 1
    errors: list[str] = field(default_factory=list)


def smtp_source(
    port: int, path: Path, count: int, sessions: int, persistent: bool
) -> tuple[int, float, list[str]]:
    source = postfix_tool("smtp-source")
    assert source is not None
    command = [source, "-c", "-s", str(sessions), "-m", str(count)]
    if persistent:
        command.append("-d")
    command += ["-M", "client.example", "-f", "sender@example.org", "-t", "rcpt@example.net"]
    command += ["-F", str(path), f"127.0.0.1:{port}"]
    errors: list[str] = []
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, timeout=600, check=False)
    elapsed = time.monotonic() - start
    if proc.returncode:
        errors.append(f"smtp-source exited with status {proc.returncode}")
    errors += [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    counters = re.findall(rb"\d+", proc.stdout)
    return (int(counters[-1]) if counters else 0), elapsed, errors


SCENARIOS = {"per-connection": False, "persistent": True}


def measure(
    name: str,
    scenario: str,
    port: int,
    path: Path,
    count: int,
    sessions: int,
    server_cpu: Any,
    milter_pid: int | None,
) -> Run:
    run = Run(name, scenario)
    before = server_cpu()
    milter_before = cpu_seconds(milter_pid) if milter_pid else 0.0
    run.messages, run.elapsed, run.errors = smtp_source(
        port, path, count, sessions, SCENARIOS[scenario]
    )
    after = server_cpu()
    if isinstance(before, dict):
        gone = set(before) - set(after)
        if gone:
            run.errors.append(f"{len(gone)} server process(es) exited during the run: CPU lost")
        run.cpu = sum(after.values()) - sum(before.get(pid, 0.0) for pid in after)
        run.processes = len(after)
    else:
        run.cpu = after - before
    if milter_pid:
        run.milter_cpu = cpu_seconds(milter_pid) - milter_before
    if run.messages:
        run.msgs_per_s = run.messages / run.elapsed
        run.cpu_us_per_msg = run.cpu / run.messages * 1e6
        if milter_pid:
            run.milter_cpu_us_per_msg = run.milter_cpu / run.messages * 1e6
    cpu = f"{run.cpu_us_per_msg:.0f} us/msg" if run.cpu_us_per_msg else "-"
    print(f"    {scenario:<15} {run.messages:>6} msgs {run.msgs_per_s:>8.0f} msg/s {cpu:>12}")
    for error in run.errors[:3]:
        print(f"      {error}")
    return run


@contextlib.contextmanager
def private_home() -> Iterator[Path]:
    # Not under a private parent: Postfix's daemons (user postfix) must reach the queue.
    home = Path(tempfile.mkdtemp(prefix="alephsmtp-milter-bench-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def report(runs: list[Run]) -> str:
    out = []
    for scenario in SCENARIOS:
        rows = [r for r in runs if r.scenario == scenario]
        postfix = next((r for r in rows if r.server.startswith("postfix")), None)
        table = []
        for run in rows:
            table.append(
                [
                    run.server,
                    run.messages,
                    f"{run.msgs_per_s:,.0f}",
                    f"{run.cpu_us_per_msg:,.0f}" if run.cpu_us_per_msg else "-",
                    ratio(run.cpu_us_per_msg, postfix.cpu_us_per_msg if postfix else None),
                    f"{run.milter_cpu_us_per_msg:,.0f}" if run.milter_cpu_us_per_msg else "-",
                    run.processes,
                    len(run.errors),
                ]
            )
        out.append(f"1 KiB messages, {scenario} (server CPU: see the module docstring)")
        out.append(
            format_table(
                [
                    "server",
                    "msgs",
                    "msg/s",
                    "server CPU us/msg",
                    "vs Postfix",
                    "opendkim CPU us/msg",
                    "server procs",
                    "errors",
                ],
                table,
            )
        )
        out.append("")
    return "\n".join(out)


def one_round(
    args: argparse.Namespace, home: Path, path: Path, milter: str, opendkim: Daemon, count: int
) -> list[Run]:
    """Every server, both scenarios, once."""
    runs: list[Run] = []
    servers = [("alephsmtp-asyncio+opendkim", milter, "asyncio")]
    if have_uvloop():
        servers.append(("alephsmtp-uvloop+opendkim", milter, "uvloop"))
    servers.append(("alephsmtp-asyncio (no milter)", None, "asyncio"))
    for name, endpoint, loop in servers:
        print(f"  {name}")
        server = AlephServer.start(name, endpoint, loop, Path(args.json).parent)
        try:
            smtp_source(server.port, path, args.warmup, 4, False)
            for scenario in SCENARIOS:
                runs.append(
                    measure(
                        name,
                        scenario,
                        server.port,
                        path,
                        count,
                        args.sessions,
                        lambda s=server: cpu_seconds(s.proc.pid),
                        opendkim.proc.pid if endpoint else None,
                    )
                )
        finally:
            received, signed = server.stop()
        if endpoint and signed != received:
            runs[-1].errors.append(f"{received - signed} of {received} not signed")
        print(f"    {received} messages received, {signed} signed")
    print("  postfix+opendkim")
    postfix_home = Path(tempfile.mkdtemp(prefix="postfix-", dir=home))
    postfix_home.chmod(0o755)
    postfix = Postfix.start(postfix_home, milter)
    try:
        smtp_source(postfix.port, path, args.warmup, 4, False)  # starts its processes
        for scenario in SCENARIOS:
            runs.append(
                measure(
                    "postfix-3.7+opendkim",
                    scenario,
                    postfix.port,
                    path,
                    count,
                    args.sessions,
                    postfix.receivers,
                    opendkim.proc.pid,
                )
            )
    finally:
        postfix.stop()
    return runs


def best_of(runs: list[Run]) -> list[Run]:
    """Per server and scenario, the run with the least server CPU per message (the machine is
    shared: the least disturbed round is the most telling); errors of every round kept."""
    best: dict[tuple[str, str], Run] = {}
    errors: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        key = (run.server, run.scenario)
        errors.setdefault(key, []).extend(run.errors)
        kept = best.get(key)
        if kept is None or (run.cpu_us_per_msg or 1e12) < (kept.cpu_us_per_msg or 1e12):
            best[key] = run
    for key, run in best.items():
        run.errors = errors[key]
    return list(best.values())


def bench_main(args: argparse.Namespace) -> int:
    missing = [name for name in ("opendkim", "opendkim-genkey", "postfix") if program(name) is None]
    if postfix_tool("smtp-source") is None:
        missing.append("smtp-source")
    if missing:
        print(f"missing: {', '.join(missing)} (scripts/install-peers, scripts/bench-setup)")
        return 2
    if os.geteuid() != 0:
        print("Postfix runs from a private configuration, which needs root")
        return 2
    count = args.messages or (300 if args.quick else 5000)
    info = machine_info()
    print(f"{info['time']}  {info['cpu']}, {info['cpus']} CPUs, Python {info['python']}")
    runs: list[Run] = []
    with private_home() as home:
        (home / "dkim").mkdir()
        opendkim, milter = start_opendkim(home / "dkim")
        try:
            path = home / "message.txt"
            path.write_text(message_text(KiB, 0.02))
            print(f"message: {message_size(path.read_text())} bytes; opendkim at {milter}")
            for round_number in range(1, args.repeat + 1):
                if args.repeat > 1:
                    print(f"round {round_number} of {args.repeat}")
                runs += one_round(args, home, path, milter, opendkim, count)
        finally:
            opendkim.stop()
    best = best_of(runs)
    print()
    if args.repeat > 1:
        print(f"best of {args.repeat} rounds (least server CPU per message)")
    print(report(best))
    write_json(
        args.json,
        {
            "machine": info,
            "messages": count,
            "sessions": args.sessions,
            "repeat": args.repeat,
            "best": [asdict(r) for r in best],
            "runs": [asdict(r) for r in runs],
        },
    )
    errors = sum(len(run.errors) for run in best)
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=0, help="per run (default: 5000)")
    parser.add_argument("--sessions", type=int, default=4, help="smtp-source -s (default: 4)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300 messages")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the best is shown")
    parser.add_argument(
        "--warmup", type=int, default=100, help="messages before each server's runs"
    )
    parser.add_argument("--json", default=str(RESULTS / "milter.json"))
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--milter", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_main(args)
    return bench_main(args)


if __name__ == "__main__":
    run_main(main)
