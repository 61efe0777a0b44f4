"""The command line: its own logic, and every misuse refused in one line (run as a process).

Messages the CLI serves are tested in test_server.py and test_handlers.py; relaying over TLS in
test_relay_tls.py.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import trustme

from _cli import start_cli, stop_cli
from alephsmtp import _cli_checks
from alephsmtp.auth import Credentials
from alephsmtp.cli import build_parser, check_credentials
from alephsmtp.commands import AuthCommand
from alephsmtp.events import AuthEventArgs

CHALLENGE = b"<1234.5678@mx.test>"


class CountedCredentials(Credentials):
    """Credentials that record every secret they are checked against."""

    checked: ClassVar[list[str]] = []

    def check_password(self, secret: str) -> bool:
        CountedCredentials.checked.append(secret)
        return super().check_password(secret)


def cram(username: str, password: str) -> AuthEventArgs:
    digest = hmac.new(password.encode(), CHALLENGE, "md5").hexdigest()
    credentials = CountedCredentials("CRAM-MD5", username, None, "", CHALLENGE, digest)
    return AuthEventArgs(AuthCommand("CRAM-MD5"), credentials)


def test_an_unknown_user_costs_the_same_check_as_a_wrong_password() -> None:
    users = {"alice": "s3cret"}
    CountedCredentials.checked.clear()
    assert check_credentials(users, cram("alice", "s3cret"))
    assert not check_credentials(users, cram("alice", "wrong"))
    assert not check_credentials(users, cram("mallory", "s3cret"))
    # One HMAC each: the unknown user's against a secret nobody knows.
    assert len(CountedCredentials.checked) == 3
    assert CountedCredentials.checked[:2] == ["s3cret", "s3cret"]
    assert CountedCredentials.checked[2] not in users.values()


# --- misuse: refused before anything starts, in one line ------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files the bad command lines name: certificates and keys (trustme), a user file."""
    where = tmp_path_factory.mktemp("cli-files")
    ca = trustme.CA()
    leaf, other = ca.issue_cert("mx.test"), ca.issue_cert("other.test")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    contents = {
        "cert": chain,  # the certificate alone: its key is elsewhere
        "key": leaf.private_key_pem.bytes(),
        "other_key": other.private_key_pem.bytes(),
        "encrypted_key": b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n"
        b"-----END ENCRYPTED PRIVATE KEY-----\n",
        "garbage": b"not a certificate, not a key\n",
        "ca": ca.cert_pem.bytes(),
        "users": b"alice:s3cret\n",
        "password": b"pw\n",
    }
    paths = {}
    for name, data in contents.items():
        path = where / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)
    paths["missing"] = str(where / "no-such-file.pem")
    return paths


# (command line, what the one line must name). "{name}" is a file of the fixture above.
REFUSED = [
    # listening
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--port", "smtp"], "--port"),
    (["--hostname", "bad host"], "--hostname"),
    (["--hostname", "-bad.example"], "--hostname"),
    (["--workers", "0"], "--workers"),
    (["--proxy-trusted", "10.0.0.0/8"], "--proxy-protocol"),
    (["--milter-default-action", "accept"], "--milter"),
    (["--milter", "bogus"], "milter"),
    (["--proxy-protocol", "--proxy-trusted", "10.0.0.1/8"], "--proxy-trusted"),
    (["--proxy-protocol", "--proxy-trusted", "office"], "--proxy-trusted"),
    (["--xclient-from", "10.0.0.1/8"], "--xclient-from"),
    (["--xforward-from", "office"], "--xforward-from"),
    # limits: negative, not a number, 0 where 0 cannot mean "no limit"
    (["--idle-timeout", "-1"], "--idle-timeout"),
    (["--idle-timeout", "nan"], "--idle-timeout"),
    (["--data-timeout", "0"], "--data-timeout"),
    (["--write-timeout", "-5"], "--write-timeout"),
    (["--write-timeout", "inf"], "--write-timeout"),
    (["--backlog", "0"], "--backlog"),
    (["--max-message-size", "-1"], "--max-message-size"),
    (["--max-message-size", "32M"], "--max-message-size"),
    (["--max-recipients", "-1"], "--max-recipients"),
    (["--max-connections", "-1"], "--max-connections"),
    (["--max-connections-per-ip", "1.5"], "--max-connections-per-ip"),
    (["--bare-newline", "accept"], "--bare-newline"),
    (["--log-level", "loud"], "--log-level"),
    (["--no-such-option"], "--no-such-option"),
    # outputs
    (["--sink", "--maildir", "{missing}"], "--sink"),
    (["--relay", "bad:port:x"], "--relay"),
    (["--relay", "mx.test:0"], "--relay"),
    (["--relay", "mx.test:65536"], "--relay"),
    (["--relay", "bad host:25"], "--relay"),
    (["--relay-user", "u"], "--relay-user"),
    (["--relay-starttls"], "--relay-starttls"),
    (["--relay-password-file", "{password}"], "--relay-password-file"),
    (["--relay-ca-file", "{ca}"], "--relay-ca-file"),
    (["--relay", "mx.test", "--relay-ca-file", "{ca}"], "--relay-starttls"),
    (["--relay", "mx.test", "--relay-starttls", "--relay-ca-file", "{garbage}"], "{garbage}"),
    (["--relay", "mx.test", "--relay-starttls", "--relay-ca-file", "{missing}"], "{missing}"),
    (["--relay", "mx.test", "--relay-user", "u"], "--relay-password-file"),
    # TLS
    (["--tls-cert", "{cert}"], "no private key"),
    (["--tls-cert", "{cert}", "--tls-key", "{garbage}"], "no private key"),
    (["--tls-cert", "{cert}", "--tls-key", "{cert}"], "no private key"),
    (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "does not match"),
    (["--tls-cert", "{cert}", "--tls-key", "{encrypted_key}"], "encrypted"),
    (["--tls-cert", "{garbage}", "--tls-key", "{key}"], "no certificate"),
    (["--tls-cert", "{missing}"], "{missing}"),
    (["--tls-key", "{key}"], "--tls-cert"),
    (["--require-tls"], "--tls-cert"),
    (["--implicit-tls"], "--tls-cert"),
    # AUTH
    (["--auth-file", "{users}"], "--auth-over-plaintext"),
    (["--auth-file", "{missing}", "--auth-over-plaintext"], "{missing}"),
    (["--auth-require"], "--auth-file"),
    (["--auth-over-plaintext"], "--auth-file"),
    # mail authentication
    (["--verify", "spf,bogus"], "--verify"),
    (["--verify", ","], "--verify"),
    (["--dmarc-policy", "enforce"], "--dmarc-policy"),
    (["--arc-seal"], "--arc-seal"),
    (["--dkim-sign", "example.org"], "--dkim-sign"),
    (["--dkim-sign", "example.org:sel:{missing}"], "--dkim-sign"),
    (["--verify", "spf", "--dns-server", "127.0.0.1:99999"], "--dns-server"),
    (["--verify", "spf", "--dns-server", "bad host"], "--dns-server"),
]


def _run(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str] | None:
    # --port 0 first: a command line wrongly accepted listens somewhere harmless until the
    # timeout (a later --port wins, so the bad port cases still test theirs).
    try:
        return subprocess.run(
            [sys.executable, "-m", "alephsmtp", "--port", "0", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None  # accepted: it started serving


@pytest.fixture(scope="module")
def refusals(
    files: dict[str, str],
) -> dict[tuple[str, ...], subprocess.CompletedProcess[str] | None]:
    """Every command line of REFUSED, run as a process, a few at a time: each process spends
    most of its half second starting Python, so this takes a fraction of one after another."""
    argvs = [tuple(arg.format(**files) for arg in argv) for argv, _ in REFUSED]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        return dict(zip(argvs, pool.map(_run, argvs), strict=True))


@pytest.mark.parametrize(("argv", "named"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_misuse_is_refused_in_one_line(
    files: dict[str, str],
    refusals: dict[tuple[str, ...], subprocess.CompletedProcess[str] | None],
    argv: list[str],
    named: str,
) -> None:
    result = refusals[tuple(arg.format(**files) for arg in argv)]
    assert result is not None, f"accepted: it was still serving after 30 s: {argv}"
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("alephsmtp: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.endswith("\n")
    assert "Traceback" not in result.stderr
    assert named.format(**files) in result.stderr


def test_lower_case_log_level_and_auth_over_plaintext(files: dict[str, str]) -> None:
    process, port = start_cli(
        "--log-level", "debug", "--auth-file", files["users"], "--auth-over-plaintext"
    )
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.login("alice", "s3cret")
            client.sendmail("alice@example.org", ["bob@example.net"], b"Subject: x\r\n\r\nx\r\n")
    finally:
        stop_cli(process)


def test_auth_plaintext_is_the_old_name_of_auth_over_plaintext() -> None:
    assert build_parser().parse_args(["--auth-plaintext"]).auth_over_plaintext is True


def test_tls_certificate_and_key_in_one_file_or_two(files: dict[str, str], tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(Path(files["cert"]).read_bytes() + Path(files["key"]).read_bytes())
    separate = ["--tls-cert", files["cert"], "--tls-key", files["key"]]
    for tls in (["--tls-cert", str(both)], separate):
        process, port = start_cli(*tls)
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                assert client.has_extn("starttls")
        finally:
            stop_cli(process)


def test_docs_cli_md_has_a_row_for_every_option() -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    if not page.is_file():
        pytest.skip("docs/ is not shipped here (an installed wheel's tests)")
    rows = [line for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    options = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--auth-plaintext"  # the old name: in a row
    ]
    missing = [o for o in options if not any(row.startswith(f"| `{o}") for row in rows)]
    assert missing == []
    # Each row: option, default, meaning, and what it refuses (or "—").
    for row in rows:
        if row.startswith("| `--"):
            assert row.count(" | ") >= 3, row


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mx.test", ("mx.test", 25)),
        ("mx.test:587", ("mx.test", 587)),
        ("relay_1:2525", ("relay_1", 2525)),  # a container's name resolves; so it is taken
        ("192.0.2.1:2525", ("192.0.2.1", 2525)),
        ("2001:db8::1", ("2001:db8::1", 25)),
        ("[2001:db8::1]:587", ("2001:db8::1", 587)),
        ("bücher.example", ("bücher.example", 25)),
    ],
)
def test_relay_host_forms(text: str, expected: tuple[str, int]) -> None:
    assert _cli_checks.host_port(text) == expected


@pytest.mark.parametrize("text", ["", ":25", "[2001:db8::1]x", "a..b", "mx.test:", "[mx.test]:25"])
def test_relay_host_refused(text: str) -> None:
    with pytest.raises(_cli_checks.CliError, match="--relay wants"):
        _cli_checks.host_port(text)


def test_xclient_and_xforward_from() -> None:
    process, port = start_cli("--xclient-from", "127.0.0.0/8", "--xforward-from", "10.0.0.0/8")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("xclient")
            assert not client.has_extn("xforward")  # loopback is not 10.0.0.0/8
            assert client.docmd("XFORWARD", "NAME=x")[0] == 550
            assert client.docmd("XCLIENT", "ADDR=192.0.2.1")[0] == 220
    finally:
        stop_cli(process)
