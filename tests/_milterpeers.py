"""The real milters the tests start: rspamd, OpenDKIM, OpenDMARC, ClamAV (module fixtures).

Each program is Debian's, installed by scripts/install-peers, started in the foreground from
a configuration written to a tmp dir, on a loopback port, once per test module that asks for
it, and stopped at the module's end. Used by test_milter_peers.py and test_milter_postfix.py.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"


def program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


RSPAMD = program("rspamd")
OPENDKIM = program("opendkim")
OPENDKIM_GENKEY = program("opendkim-genkey")
OPENDMARC = program("opendmarc")
CLAMD = program("clamd")
CLAMAV_MILTER = program("clamav-milter")

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: milter peers\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <peers.1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"this is a plain message.\r\n"
)


def needs(*names: str | None) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        any(name is None for name in names),
        reason="not installed (scripts/install-peers installs rspamd, opendkim, opendkim-tools, "
        "opendmarc, clamav-daemon, clamav-milter)",
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    """A program in the foreground, its output in a log file; ``stop()`` ends it."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(self, ready: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(f"{what} exited ({self.process.returncode}): {self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready after {timeout:g} s: {self.output()}")
            time.sleep(0.05)

    def wait_for_port(self, port: int, what: str) -> None:
        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        self.wait_for(listening, what)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        # libmilter's daemons notice SIGTERM only at their next 5 s poll: a second is given,
        # then they are killed (nothing of theirs outlives the test).
        self.process.terminate()
        try:
            self.process.wait(1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for daemon in reversed(started):
            daemon.stop()


# --- the programs ------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="rspamd")
def rspamd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if RSPAMD is None:
        pytest.skip("rspamd is not installed (scripts/install-peers)")
    home = tmp_path_factory.mktemp("rspamd")
    port = free_port()
    (home / "override.d").mkdir()
    (home / "local.d").mkdir()
    (home / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
    (home / "override.d" / "worker-proxy.inc").write_text(
        f'bind_socket = "127.0.0.1:{port}";\nmilter = yes;\ntimeout = 120s;\ncount = 1;\n'
        'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n'
    )
    for worker in ("normal", "controller"):
        (home / "override.d" / f"worker-{worker}.inc").write_text("enabled = false;\n")
    (home / "override.d" / "logging.inc").write_text(
        f'type = "file";\nfilename = "{home}/rspamd.log";\nlevel = "info";\n'
    )
    # The stock TLD list takes rspamd 10+ s to compile; five suffixes are enough here. DNS:
    # short timeouts (no network in the sandbox).
    (home / "local.d" / "options.inc").write_text(
        f'url_tld = "{home}/tld.dat";\ndns {{\n  timeout = 0.3s;\n  retransmits = 1;\n}}\n'
    )
    (home / "local.d" / "milter_headers.conf").write_text(
        'use = ["x-spamd-result", "x-spam-status"];\nskip_local = false;\n'
        "skip_authenticated = false;\n"
    )
    args = [RSPAMD, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf"]
    args += [f"--var={name}={home}" for name in ("LOCAL_CONFDIR", "DBDIR", "RUNDIR", "LOGDIR")]
    with daemons() as started:
        daemon = Daemon(args, home / "rspamd.out")
        started.append(daemon)
        daemon.wait_for_port(port, "rspamd")
        yield f"inet:127.0.0.1:{port}"


@pytest.fixture(scope="module", name="dkim_home")
def dkim_home_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if OPENDKIM is None or OPENDKIM_GENKEY is None:
        pytest.skip("opendkim / opendkim-tools are not installed (scripts/install-peers)")
    home = tmp_path_factory.mktemp("opendkim")
    subprocess.run(
        [OPENDKIM_GENKEY, "-D", str(home), "-d", "example.org", "-s", "test"], check=True
    )
    # The DNS record opendkim-genkey wrote, as one TestPublicKeys line (no DNS in the sandbox).
    record = "".join(
        part
        for line in (home / "test.txt").read_text().splitlines()
        for part in line.split('"')[1::2]
    )
    (home / "keys.txt").write_text(f"test._domainkey.example.org {record.replace(' ', '')}\n")
    return home


def start_opendkim(home: Path, name: str, extra: str) -> tuple[Daemon, str]:
    port = free_port()
    config = home / f"{name}.conf"
    config.write_text(
        "Syslog no\n"
        "Mode sv\n"
        "Domain example.org\n"
        "Selector test\n"
        f"KeyFile {home}/test.private\n"
        "RequireSafeKeys no\n"  # pytest's tmp dirs live under the world-writable /tmp
        "Canonicalization relaxed/simple\n"
        f"TestPublicKeys {home}/keys.txt\n"
        "AuthservID mx.test\n"
        "AlwaysAddARHeader yes\n" + extra
    )
    daemon = Daemon(
        [str(OPENDKIM), "-f", "-x", str(config), "-p", f"inet:{port}@127.0.0.1"],
        home / f"{name}.log",
    )
    daemon.wait_for_port(port, f"opendkim ({name})")
    return daemon, f"inet:{port}@127.0.0.1"


@pytest.fixture(scope="module", name="opendkim")
def opendkim_fixture(dkim_home: Path) -> Iterator[tuple[str, str]]:
    """(signer, verifier): the signer treats 127.0.0.1 as internal (its default), the
    verifier has no internal host, so it checks what 127.0.0.1 sends."""
    with daemons() as started:
        signer, signing = start_opendkim(dkim_home, "signer", "")
        started.append(signer)
        verifier, verifying = start_opendkim(dkim_home, "verifier", "InternalHosts 192.0.2.1\n")
        started.append(verifier)
        yield signing, verifying


@pytest.fixture(scope="module", name="opendmarc")
def opendmarc_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if OPENDMARC is None:
        pytest.skip("opendmarc is not installed (scripts/install-peers)")
    home = tmp_path_factory.mktemp("opendmarc")
    port = free_port()
    (home / "ignore").write_text("192.0.2.1\n")  # its default ignores 127.0.0.1
    config = home / "opendmarc.conf"
    config.write_text(
        "Syslog false\n"
        "AuthservID mx.test\n"
        "TrustedAuthservIDs mx.test\n"
        f"IgnoreHosts {home}/ignore\n"
        "RequiredHeaders false\n"
        "SPFSelfValidate true\n"
        "DNSTimeout 1\n"
    )
    with daemons() as started:
        daemon = Daemon(
            [OPENDMARC, "-f", "-c", str(config), "-p", f"inet:{port}@127.0.0.1"],
            home / "opendmarc.log",
        )
        started.append(daemon)
        daemon.wait_for_port(port, "opendmarc")
        yield f"inet:{port}@127.0.0.1"


@pytest.fixture(scope="module", name="clamav")
def clamav_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """clamd with one signature, for EICAR, in a private database directory (no freshclam,
    no download), and clamav-milter in front of it."""
    if CLAMD is None or CLAMAV_MILTER is None:
        pytest.skip("clamav-daemon / clamav-milter are not installed (scripts/install-peers)")
    home = tmp_path_factory.mktemp("clamav")
    (home / "db").mkdir()
    (home / "db" / "eicar.ndb").write_text(f"Alephsmtp-Test.EICAR:0:*:{EICAR.hex()}\n")
    socket_path = home / "clamd.sock"
    (home / "clamd.conf").write_text(
        f"LocalSocket {socket_path}\n"
        f"DatabaseDirectory {home}/db\n"
        "Foreground yes\n"
        f"TemporaryDirectory {home}\n"
    )
    port = free_port()
    (home / "milter.conf").write_text(
        f"MilterSocket inet:{port}@127.0.0.1\n"
        f"ClamdSocket unix:{socket_path}\n"
        "Foreground yes\n"
        "OnInfected Reject\n"
        "AddHeader Replace\n"
        f"LogFile {home}/milter.log\n"
        "LogInfected Full\n"
    )
    with daemons() as started:
        clamd = Daemon([CLAMD, "-c", str(home / "clamd.conf")], home / "clamd.log")
        started.append(clamd)
        clamd.wait_for(socket_path.exists, "clamd")
        milter = Daemon(
            [CLAMAV_MILTER, "-c", str(home / "milter.conf")], home / "clamav-milter.out"
        )
        started.append(milter)
        milter.wait_for_port(port, "clamav-milter")
        yield f"inet:{port}@127.0.0.1", home / "milter.log"


def field(message: bytes, name: bytes) -> list[bytes]:
    """The values of every header field ``name`` (unfolded)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    values = []
    for line in head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ").split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            values.append(value.strip())
    return values
