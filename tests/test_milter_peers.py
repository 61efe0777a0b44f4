"""alephsmtp in front of the milters operators run: rspamd, OpenDKIM, OpenDMARC, ClamAV.

The real programs (Debian's packages, installed by scripts/install-peers), each started once
per module in the foreground from a configuration written to a tmp dir, on a loopback port,
and stopped at the end:

- rspamd's proxy worker in milter mode (self-scan, the stock rules with a five-entry TLD list
  so it starts in a second): GTUBE is refused with rspamd's reply, a clean message gets its
  X-Spamd-Result / X-Spam-Status headers;
- OpenDKIM as signer (mail from 127.0.0.1, an internal host) with a key made by
  opendkim-genkey, and as verifier (no internal hosts) reading that key from a TestPublicKeys
  file instead of DNS: the signature verifies (dkim=pass), a changed body does not;
- OpenDMARC behind the verifier, trusting its Authentication-Results: dmarc=none (the
  sandbox has no DNS for _dmarc records: a policy cannot be published, so only "none" and the
  header can be shown);
- clamav-milter in front of clamd, whose database is one .ndb signature for the EICAR test
  string written by the test (no download): EICAR is refused, a clean message is marked.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from alephsmtp import SmtpServer
from alephsmtp.milter import Milters

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


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
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


@pytest.fixture(scope="module")
def dkim_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
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


@pytest.fixture(scope="module")
def opendkim(dkim_home: Path) -> Iterator[tuple[str, str]]:
    """(signer, verifier): the signer treats 127.0.0.1 as internal (its default), the
    verifier has no internal host, so it checks what 127.0.0.1 sends."""
    with daemons() as started:
        signer, signing = start_opendkim(dkim_home, "signer", "")
        started.append(signer)
        verifier, verifying = start_opendkim(dkim_home, "verifier", "InternalHosts 192.0.2.1\n")
        started.append(verifier)
        yield signing, verifying


@pytest.fixture(scope="module")
def opendmarc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
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


@pytest.fixture(scope="module")
def clamav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
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


# --- alephsmtp in front of them ------------------------------------------------------------------


class Mx:
    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[Any] = []

    async def send(self, message: bytes = MESSAGE) -> tuple[int, str]:
        """One message; the server's reply to it (code, text)."""
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=60)
        await client.connect()
        try:
            errors, text = await client.sendmail("alice@example.org", ["bob@example.net"], message)
            assert not errors
            return 250, text
        except aiosmtplib.SMTPResponseException as error:
            return error.code, error.message
        finally:
            with contextlib.suppress(Exception):
                await client.quit()


@contextlib.asynccontextmanager
async def mx(*endpoints: str) -> AsyncIterator[Mx]:
    server = SmtpServer("127.0.0.1", 0, hostname="mx.test")
    box: Mx | None = None

    def on_session(session: Any) -> None:
        assert box is not None
        session.message_received += lambda s, e: box.received.append(e)

    await server.start(Milters(list(endpoints), command_timeout=30).wrap(on_session))
    box = Mx(server.port)
    try:
        yield box
    finally:
        await server.stop(grace=5)


def field(message: bytes, name: bytes) -> list[bytes]:
    """The values of every header field ``name`` (unfolded)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    values = []
    for line in head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ").split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            values.append(value.strip())
    return values


# --- the tests -----------------------------------------------------------------------------------


@needs(RSPAMD)
async def test_rspamd_rejects_gtube(rspamd: str) -> None:
    async with mx(rspamd) as box:
        code, text = await box.send(MESSAGE.replace(b"this is a plain message.", GTUBE))
    assert (code, text) == (554, "5.7.1 Gtube pattern")
    assert box.received == []


@needs(RSPAMD)
async def test_rspamd_adds_its_headers_to_a_clean_message(rspamd: str) -> None:
    async with mx(rspamd) as box:
        code, _ = await box.send()
    assert code == 250
    (delivered,) = box.received
    (status,) = field(delivered.message, b"X-Spam-Status")
    assert status.startswith(b"No, score=")
    (result,) = field(delivered.message, b"X-Spamd-Result")
    assert result.startswith(b"default: False [")
    # The headers went at the end of the header section; the body is untouched.
    assert delivered.message.endswith(b"\r\n\r\nHello Bob,\r\nthis is a plain message.\r\n")
    report = delivered.envelope.milter
    assert {name for name, _ in report.added_headers} == {"X-Spamd-Result", "X-Spam-Status"}
    assert report.verdicts[-1].action == "accept"


@needs(OPENDKIM, OPENDKIM_GENKEY)
async def test_opendkim_signs_and_its_signature_verifies(opendkim: tuple[str, str]) -> None:
    signer, verifier = opendkim
    async with mx(signer) as signing:
        assert (await signing.send())[0] == 250
    signed = signing.received[0].message
    (signature,) = field(signed, b"DKIM-Signature")
    assert b"d=example.org" in signature
    assert b"s=test" in signature
    assert signed.startswith(b"DKIM-Signature: ")  # inserted at the top (index 0)
    assert signed.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])

    async with mx(verifier) as verifying:
        assert (await verifying.send(signed))[0] == 250
        assert (await verifying.send(signed.replace(b"Hello Bob", b"Hello Eve")))[0] == 250
    good, bad = (e.message for e in verifying.received)
    (results,) = field(good, b"Authentication-Results")
    assert results.startswith(b"mx.test;")
    assert b"dkim=pass" in results
    assert b"header.d=example.org" in results
    (results,) = field(bad, b"Authentication-Results")
    assert b"dkim=fail" in results


@needs(OPENDKIM, OPENDKIM_GENKEY, OPENDMARC)
async def test_opendmarc_after_opendkim(opendkim: tuple[str, str], opendmarc: str) -> None:
    signer, verifier = opendkim
    async with mx(signer) as signing:
        assert (await signing.send())[0] == 250
    signed = signing.received[0].message
    # A chain as smtpd_milters = verifier, opendmarc: the second milter reads the first's
    # Authentication-Results field, added to the message it is shown.
    async with mx(verifier, opendmarc) as box:
        assert (await box.send(signed))[0] == 250
    results = field(box.received[0].message, b"Authentication-Results")
    assert any(b"dkim=pass" in value for value in results)
    (dmarc,) = [value for value in results if b"dmarc=" in value]
    assert dmarc.startswith(b"mx.test;")
    assert b"dmarc=none" in dmarc
    assert b"header.from=example.org" in dmarc


@needs(CLAMD, CLAMAV_MILTER)
async def test_clamav_refuses_eicar_and_marks_clean_mail(clamav: tuple[str, Path]) -> None:
    endpoint, log = clamav
    async with mx(endpoint) as box:
        clean = await box.send()
        infected = await box.send(MESSAGE.replace(b"this is a plain message.", EICAR))
    assert clean[0] == 250
    assert infected[0] == 550
    (delivered,) = box.received
    assert field(delivered.message, b"X-Virus-Status") == [b"Clean"]
    assert field(delivered.message, b"X-Virus-Scanned")[0].startswith(b"clamav-milter ")
    # The test's own signature found it: the detection is not a download.
    assert "infected by Alephsmtp-Test.EICAR" in log.read_text()


@needs(RSPAMD, OPENDKIM, OPENDKIM_GENKEY, CLAMD, CLAMAV_MILTER)
async def test_three_real_milters_in_a_chain(
    rspamd: str, opendkim: tuple[str, str], clamav: tuple[str, Path]
) -> None:
    signer, _ = opendkim
    endpoint, _ = clamav
    async with mx(endpoint, rspamd, signer) as box:
        assert (await box.send())[0] == 250
        assert (await box.send(MESSAGE.replace(b"this is a plain message.", EICAR)))[0] == 550
    message = box.received[0].message
    assert field(message, b"X-Virus-Status") == [b"Clean"]
    assert field(message, b"X-Spam-Status")[0].startswith(b"No")
    assert message.startswith(b"DKIM-Signature: ")
    milters = [verdict.milter for verdict in box.received[0].envelope.milter.verdicts]
    assert milters == [endpoint, rspamd, signer]
