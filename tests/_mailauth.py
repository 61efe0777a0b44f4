"""Shared by the mailauth tests: a real DNS server (dnsmasq) serving a generated test zone on
loopback, keys made by ``opendkim-genkey``, and opendkim run in its test mode (``-t``).

Nothing here reaches beyond 127.0.0.1. dnsmasq answers only from its configuration
(``no-resolv``, ``local=/test/``: every other name under ``.test`` is NXDOMAIN).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

_SBIN = "/usr/sbin:/usr/local/sbin:/sbin"
DNSMASQ = shutil.which("dnsmasq") or shutil.which("dnsmasq", path=_SBIN)
OPENDKIM = shutil.which("opendkim") or shutil.which("opendkim", path=_SBIN)
GENKEY = shutil.which("opendkim-genkey") or shutil.which("opendkim-genkey", path=_SBIN)

needs_dnsmasq = pytest.mark.skipif(
    DNSMASQ is None, reason="dnsmasq is not installed (scripts/install-peers: dnsmasq-base)"
)
needs_opendkim = pytest.mark.skipif(
    OPENDKIM is None or GENKEY is None,
    reason="opendkim is not installed (scripts/install-peers: opendkim, opendkim-tools)",
)


def private_dir() -> Path:
    """A directory only we can read: opendkim refuses a key or configuration in a directory
    others may write, /tmp included, so it is made under ~/.cache."""
    base = Path.home() / ".cache"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="alephsmtp-mailauth-", dir=base))
    path.chmod(0o700)
    return path


def genkey(directory: Path, domain: str, selector: str, bits: int = 2048) -> tuple[Path, str]:
    """A key pair by opendkim-genkey: the private key's path and the DNS record's text."""
    assert GENKEY is not None
    subprocess.run(
        [GENKEY, "-b", str(bits), "-d", domain, "-s", selector, "-D", str(directory)],
        check=True,
        timeout=120,
    )
    zone_text = (directory / f"{selector}.txt").read_text()
    record = "".join(re.findall(r'"([^"]*)"', zone_text))
    return directory / f"{selector}.private", record


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as udp:
        udp.bind(("127.0.0.1", 0))
        port: int = udp.getsockname()[1]
    return port


def _txt_strings(text: str) -> str:
    # One TXT record of several character-strings of at most 255 octets (RFC 1035 3.3.14).
    parts = [text[i : i + 250] for i in range(0, len(text), 250)] or [""]
    return ",".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"' for part in parts)


class DnsServer:
    """dnsmasq on 127.0.0.1:<port>, serving ``records``: ``{(name, type): [values]}`` with
    types TXT, A, AAAA, MX (``"pref host"``), PTR."""

    def __init__(self, directory: Path, records: Mapping[tuple[str, str], Sequence[str]]) -> None:
        assert DNSMASQ is not None
        lines = [
            "listen-address=127.0.0.1",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            "no-negcache",
            "local-ttl=300",  # dnsmasq says TTL 0 for its own records by default: no caching
            "local=/test/",
            "log-queries",
        ]
        for (name, rdtype), values in records.items():
            for value in values:
                if rdtype == "TXT":
                    lines.append(f"txt-record={name},{_txt_strings(value)}")
                elif rdtype in ("A", "AAAA"):
                    lines.append(f"host-record={name},{value}")
                elif rdtype == "MX":
                    preference, host = value.split()
                    lines.append(f"mx-host={name},{host},{preference}")
                elif rdtype == "PTR":
                    lines.append(f"ptr-record={name},{value}")
                else:
                    raise ValueError(rdtype)
        self.config = directory / "dnsmasq.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = directory / "dnsmasq.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        for _attempt in range(5):
            self.port = _free_port()
            command = [
                DNSMASQ,
                "--keep-in-foreground",
                f"--conf-file={self.config}",
                f"--port={self.port}",
                f"--pid-file={directory / 'dnsmasq.pid'}",
                "--log-facility=-",
            ]
            if os.geteuid() == 0:
                command.append("--user=root")
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=log)
            if self._ready():
                return
            self.stop()
        raise RuntimeError(f"dnsmasq did not start: {self.log_path.read_text()[-2000:]}")

    def _ready(self) -> bool:
        import dns.message
        import dns.query

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                query = dns.message.make_query("ready.test.", "TXT")
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
                return True
            except Exception:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


@contextlib.contextmanager
def dns_server(
    directory: Path, records: Mapping[tuple[str, str], Sequence[str]]
) -> Iterator[DnsServer]:
    server = DnsServer(directory, records)
    try:
        yield server
    finally:
        server.stop()


def unbound_config(directory: Path, dns_port: int) -> Path:
    """A libunbound configuration that sends every question to our dnsmasq (opendkim's
    ``ResolverConfiguration``); ``test.`` is one of unbound's blocked special-use zones
    (RFC 6761) unless told otherwise."""
    path = directory / "unbound.conf"
    path.write_text(
        "server:\n"
        "    do-not-query-localhost: no\n"
        '    module-config: "iterator"\n'
        '    local-zone: "test." nodefault\n'
        "forward-zone:\n"
        '    name: "."\n'
        f"    forward-addr: 127.0.0.1@{dns_port}\n"
    )
    return path


def opendkim_sign(
    directory: Path,
    message: bytes,
    *,
    domain: str,
    selector: str,
    key: Path,
    canonicalization: str = "relaxed/relaxed",
    extra: str = "",
) -> bytes:
    """``message`` signed by opendkim (its test mode runs the real milter code paths on a
    file): the DKIM-Signature it inserts, then the message."""
    assert OPENDKIM is not None
    config = directory / f"sign-{canonicalization.replace('/', '-')}.conf"
    config.write_text(
        "Mode s\nSyslog no\nBackground no\n"
        f"Domain {domain}\nSelector {selector}\nKeyFile {key}\n"
        f"Canonicalization {canonicalization}\n{extra}"
    )
    source = directory / "to-sign.eml"
    source.write_bytes(message)
    done = subprocess.run(
        [OPENDKIM, "-x", str(config), "-t", str(source), "-vv"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = done.stdout.decode() + done.stderr.decode()
    match = re.search(r"hname='DKIM-Signature' hvalue='(.*?)'\n", output, re.S)
    assert match is not None, output
    value = match.group(1).replace("\r\n", "\n").replace("\n", "\r\n")
    return b"DKIM-Signature: " + value.encode() + b"\r\n" + message


def opendkim_verify(directory: Path, message: bytes, dns_port: int) -> str:
    """opendkim's verdict on ``message``, its keys from our DNS: the
    ``Authentication-Results`` value it would add, and its log line."""
    assert OPENDKIM is not None
    resolver = unbound_config(directory, dns_port)
    config = directory / "verify.conf"
    config.write_text(
        "Mode v\nSyslog no\nBackground no\nAlwaysAddARHeader yes\n"
        f"AuthservID verifier.test\nResolverConfiguration {resolver}\n"
    )
    source = directory / "to-verify.eml"
    source.write_bytes(message)
    done = subprocess.run(
        [OPENDKIM, "-x", str(config), "-t", str(source), "-vv"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.stdout.decode() + done.stderr.decode()


class Zone:
    """The test zone and what the tests need to know about it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # One 2048-bit key (what senders use today) published for several domains, and a
        # 1024-bit one for the ARC forwarder.
        self.key, self.record = genkey(directory, "example.test", "sel", 2048)
        self.arc_key, self.arc_record = genkey(directory, "forwarder.test", "arc", 1024)
        spf_ok = "v=spf1 ip4:127.0.0.1 -all"
        records: dict[tuple[str, str], list[str]] = {
            # SPF: one domain per outcome (RFC 7208 2.6).
            ("example.test", "TXT"): [spf_ok],
            ("fail.test", "TXT"): ["v=spf1 -all"],
            ("softfail.test", "TXT"): ["v=spf1 ~all"],
            ("neutral.test", "TXT"): ["v=spf1 ?all"],
            ("bad.test", "TXT"): ["v=spf1 ip4:127.0.0.1 frobnicate:x -all"],
            ("twice.test", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
            ("loop.test", "TXT"): ["v=spf1 include:loop2.test -all"],
            ("loop2.test", "TXT"): ["v=spf1 include:loop.test -all"],
            ("void.test", "TXT"): ["v=spf1 a:nx1.void.test a:nx2.void.test a:nx3.void.test ~all"],
            ("mx.test", "TXT"): ["v=spf1 mx -all"],
            ("mx.test", "MX"): ["10 mail.mx.test"],
            ("mail.mx.test", "A"): ["127.0.0.1"],
            ("a.test", "TXT"): ["v=spf1 a:host.a.test -all"],
            ("host.a.test", "A"): ["127.0.0.1"],
            ("helo.test", "TXT"): [spf_ok],
            ("forwarder.test", "TXT"): ["v=spf1 ip4:127.0.0.2 -all"],
            # DKIM keys.
            ("sel._domainkey.example.test", "TXT"): [self.record],
            ("sel._domainkey.reject.test", "TXT"): [self.record],
            ("sel._domainkey.strict.test", "TXT"): [self.record],
            ("sel._domainkey.sub.test", "TXT"): [self.record],
            ("sel._domainkey.other.test", "TXT"): [self.record],
            ("revoked._domainkey.example.test", "TXT"): ["v=DKIM1; k=rsa; p="],
            ("arc._domainkey.forwarder.test", "TXT"): [self.arc_record],
            # DMARC (RFC 7489 6.3).
            ("_dmarc.example.test", "TXT"): ["v=DMARC1; p=none"],
            ("_dmarc.reject.test", "TXT"): ["v=DMARC1; p=reject"],
            ("_dmarc.quarantine.test", "TXT"): ["v=DMARC1; p=quarantine"],
            ("_dmarc.strict.test", "TXT"): ["v=DMARC1; p=reject; adkim=s; aspf=s"],
            ("_dmarc.sub.test", "TXT"): ["v=DMARC1; p=none; sp=reject"],
            ("_dmarc.pct.test", "TXT"): ["v=DMARC1; p=reject; pct=0"],
            ("_dmarc.twice.test", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        }
        for domain in ("reject.test", "quarantine.test", "strict.test", "sub.test", "pct.test"):
            records.setdefault((domain, "TXT"), [spf_ok])
        # RFC 7208 4.6.4: eleven includes in a row pass the limit of ten lookups.
        for index in range(12):
            records[(f"l{index}.chain.test", "TXT")] = [
                f"v=spf1 include:l{index + 1}.chain.test -all"
            ]
        records[("l12.chain.test", "TXT")] = ["v=spf1 ip4:127.0.0.1 -all"]
        records[("chain.test", "TXT")] = ["v=spf1 include:l0.chain.test -all"]
        records[("short.chain.test", "TXT")] = ["v=spf1 include:l4.chain.test -all"]
        self.records = records
        self.dns = DnsServer(directory, records)

    def stop(self) -> None:
        self.dns.stop()


def running_zone() -> Iterator[Zone]:
    """The body of each test module's (module-scoped) ``zone`` fixture."""
    if DNSMASQ is None or GENKEY is None:
        pytest.skip("dnsmasq / opendkim-genkey not installed (scripts/install-peers)")
    made = Zone(private_dir())
    try:
        yield made
    finally:
        made.stop()
        shutil.rmtree(made.directory, ignore_errors=True)


def message(
    author: str = "Alice <alice@example.test>",
    body: bytes = b"Hello there,\r\n\r\nthis is a test.\r\n",
    extra: bytes = b"",
) -> bytes:
    return (
        f"From: {author}\r\nTo: bob@example.org\r\nSubject: mailauth test\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <t1@example.test>\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )
