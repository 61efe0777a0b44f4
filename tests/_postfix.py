"""A private Postfix for tests: ``postfix -c DIR start-fg`` from a configuration in a tmp dir,
chroot off, smtpd on loopback ports, every accepted message delivered where ``delivery``
says (relayed to a capturing sink, or by LMTP to a socket).

Debian's package, installed by scripts/install-peers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _milterpeers import Daemon, free_port, program

POSTFIX = program("postfix")
needs_postfix = pytest.mark.skipif(
    POSTFIX is None, reason="postfix is not installed (scripts/install-peers installs it)"
)

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {home}/queue
data_directory = {home}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = test
myorigin = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
{delivery}
local_header_rewrite_clients =
smtputf8_enable = no
alias_maps =
alias_database =
maillog_file = /dev/stdout
milter_default_action = tempfail
milter_protocol = 6
smtp_tls_security_level = none
delay_warning_time = 0
notify_classes =
"""
SERVICES = """\
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
lmtp      unix  - - n - - lmtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_endpoint(endpoint: str) -> str:
    """``inet:PORT@HOST`` (Sendmail's form) as Postfix writes it, ``inet:HOST:PORT``."""
    kind, _, where = endpoint.partition(":")
    if "@" in where:
        port, _, host = where.partition("@")
        return f"{kind}:{host}:{port}"
    return endpoint


def relay_to(port: int) -> str:
    """``delivery`` for a Postfix that relays everything to an SMTP server on ``port``."""
    return f"relayhost = [127.0.0.1]:{port}"


class Postfix:
    """A private Postfix with one smtpd listener per name in ``listeners`` (each with the
    milters given, or none for ``""``), delivering as ``delivery`` (a main.cf line) says."""

    def __init__(
        self,
        home: Path,
        delivery: str,
        listeners: dict[str, str],
        main_cf: str = "",
        hostname: str = "mx.test",
    ) -> None:
        self.home = home
        self.ports = {name: free_port() for name in listeners}
        (home / "queue").mkdir()
        (home / "data").mkdir()
        subprocess.run(["chown", "postfix", str(home / "data")], check=True)
        config = MAIN_CF.format(home=home, delivery=delivery, hostname=hostname)
        (home / "main.cf").write_text(config + main_cf)
        smtpd = "".join(
            f"127.0.0.1:{self.ports[name]} inet n - n - - smtpd\n"
            f"  -o smtpd_milters={postfix_endpoint(endpoint)}\n"
            for name, endpoint in listeners.items()
        )
        (home / "master.cf").write_text(smtpd + SERVICES)
        assert POSTFIX is not None
        self.daemon = Daemon([POSTFIX, "-c", str(home), "start-fg"], home / "postfix.log")
        try:
            for name, port in self.ports.items():
                self.daemon.wait_for_port(port, f"postfix smtpd ({name})")
        except BaseException:
            self.stop()  # whatever it started
            raise

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` lists it."""
        out = subprocess.run(
            [program("postqueue") or "postqueue", "-c", str(self.home), "-j"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def send(self, sender: str, recipients: list[str], data: bytes, listener: str = "") -> Any:
        """A message to the first listener (or the one named), as smtplib sends it."""
        port = self.ports[listener] if listener else next(iter(self.ports.values()))
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            return client.sendmail(sender, recipients, data)

    def log(self) -> str:
        return (self.home / "postfix.log").read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while pattern not in self.log():
            assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{self.log()[-3000:]}"
            time.sleep(0.05)
        return self.log()

    def stop(self) -> None:
        subprocess.run([POSTFIX or "postfix", "-c", str(self.home), "stop"], check=False)
        try:
            self.daemon.process.wait(20)
        except subprocess.TimeoutExpired:
            self.daemon.stop()


@contextlib.contextmanager
def private_postfix(
    delivery: str, listeners: dict[str, str], main_cf: str = "", **options: Any
) -> Iterator[Postfix]:
    """A Postfix in its own directory (:func:`postfix_home`), stopped and removed after."""
    with postfix_home() as home:
        postfix = Postfix(home, delivery, listeners, main_cf, **options)
        try:
            yield postfix
        finally:
            postfix.stop()


@contextlib.contextmanager
def postfix_home() -> Iterator[Path]:
    """A directory for a private Postfix, removed after. Not pytest's tmp dir: its parents
    are private to root, and Postfix's daemons run as the postfix user, who must reach the
    queue (and any socket made there)."""
    home = Path(tempfile.mkdtemp(prefix="alephsmtp-postfix-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
