"""What the command line refuses, and how it says so: option types for argparse, the options
that need one another, TLS files read with a reason for each failure. Every refusal is one line
on stderr and exit status 2 (``alephsmtp.cli.main``); none is a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import ssl
from collections.abc import Callable
from typing import NoReturn

__all__ = [
    "ArgumentParser",
    "CliError",
    "host_port",
    "hostname",
    "network",
    "permissions",
    "refuse_what_cannot_work",
    "relay_tls_context",
    "seconds",
    "tls_context",
    "whole_number",
]


class CliError(Exception):
    """A problem with the command line's options or files, reported in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a misuse said as every other refusal is: one line, exit status 2
    (argparse's own way prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of {low} or more"
            raise argparse.ArgumentTypeError(f"wants a whole number {span}, not {text!r}")
        return value

    return parse


def seconds(zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, more than 0 (or 0 too, if ``zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            least = "0 or more" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"wants a number of seconds, {least}, not {text!r}")
        return value

    return parse


def network(text: str) -> str:
    """An argparse type: an IP network (``192.0.2.0/24``, ``2001:db8::/32``, one address)."""
    try:
        return str(ipaddress.ip_network(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"wants an IP network such as 192.0.2.0/24, not {text!r} ({error})"
        ) from None


def permissions(text: str) -> int:
    """An argparse type: file permission bits in octal (``660``, ``0660``, ``0o660``)."""
    digits = text[2:] if text[:2].lower() == "0o" else text
    try:
        value = int(digits, 8) if digits and digits.isdigit() else -1
    except ValueError:  # an 8 or a 9
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(
            f"wants permissions in octal, from 000 to 777 (such as 660), not {text!r}"
        )
    return value


# RFC 5321 4.1.2: sub-domain = Let-dig [Ldh-str], at most 63 octets (RFC 1035 2.3.4).
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
# A host to connect to needs only to resolve: resolvers take underscores too (container names).
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _is_domain(name: str, label: re.Pattern[str] = _LABEL) -> bool:
    """Whether ``name`` is a domain as RFC 5321 4.1.2 spells one (a U-label via IDNA)."""
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(label.match(part) for part in name.split("."))


def _is_address_literal(text: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def hostname(text: str) -> str:
    """An argparse type: the server's name, said in its greeting and EHLO reply."""
    if not (_is_domain(text) or _is_address_literal(text)):
        raise argparse.ArgumentTypeError(
            f"wants a domain name (letters, digits, hyphens, dots) or an address literal "
            f"such as [192.0.2.1], not {text!r}"
        )
    return text


def host_port(text: str, default_port: int = 25) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` (a bare IPv6 address: no port)."""
    port: str | None
    try:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(rest)
            port = rest[1:] if rest else None
            ipaddress.IPv6Address(host)
        elif text.count(":") > 1:
            host, port = text, None
            ipaddress.IPv6Address(host)
        else:
            host, colon, port = text.partition(":")
            port = port if colon else None
            if not _is_domain(host, _HOST_LABEL):  # a name, or an IPv4 address
                raise ValueError(host)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(port)
    except ValueError:
        raise CliError(f"--relay wants HOST[:PORT] or [IPv6]:PORT, not {text!r}") from None
    return host, int(port) if port is not None else default_port


_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----")


def _read_pem(path: str, what: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read().decode("ascii", "replace")
    except OSError as error:
        raise CliError(f"cannot load the {what} {path}: {error.strerror or error}") from None


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """The server's context, or what is wrong with the files said plainly: OpenSSL's own
    words for most of these are "[SSL] PEM lib"."""
    where = f"cannot load the TLS certificate {cert}"
    cert_text = _read_pem(cert, "TLS certificate")
    if _PEM_CERTIFICATE not in cert_text:
        raise CliError(f"{where}: no certificate in it ({_PEM_CERTIFICATE} ...)")
    key_path = key or cert
    key_text = cert_text if key is None else _read_pem(key, "TLS key")
    found = _PEM_KEY.search(key_text)
    if found is None:
        if key is None:
            raise CliError(f"{where}: no private key in it; name the key file with --tls-key")
        raise CliError(f"cannot load the TLS key {key}: no private key in it")
    if "ENCRYPTED" in found.group(1) or "Proc-Type: 4,ENCRYPTED" in key_text:
        raise CliError(f"cannot load the TLS key {key_path}: it is encrypted; give it unencrypted")

    def no_password() -> bytes:  # never OpenSSL's prompt on the terminal
        raise CliError(f"cannot load the TLS key {key_path}: it is encrypted")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise CliError(
                f"{where}: the private key in {key_path} does not match its certificate"
            ) from None
        raise CliError(f"{where}: {error.reason or error}") from None
    except OSError as error:
        raise CliError(f"{where}: {error.strerror or error}") from None
    return context


def relay_tls_context(path: str) -> ssl.SSLContext:
    """Verifies the relay's certificate against the CA certificates in ``path`` only."""
    try:
        return ssl.create_default_context(cafile=path)
    except ssl.SSLError as error:
        reason = "no CA certificate in it" if "NO_CERTIFICATE" in str(error.reason) else error
        raise CliError(f"cannot load --relay-ca-file {path}: {reason}") from None
    except OSError as error:
        raise CliError(f"cannot load --relay-ca-file {path}: {error.strerror or error}") from None


def refuse_what_cannot_work(args: argparse.Namespace) -> None:
    """Options that would be ignored, or that would make a server unable to do its job."""
    relay_options = ("--relay-starttls", "--relay-ca-file", "--relay-user", "--relay-password-file")
    dependencies: list[tuple[object, object, str]] = [
        (args.tls_key, args.tls_cert, "--tls-key needs --tls-cert"),
        (args.implicit_tls, args.tls_cert, "--implicit-tls needs --tls-cert"),
        (args.require_tls, args.tls_cert, "--require-tls needs --tls-cert"),
        (args.proxy_trusted, args.proxy_protocol, "--proxy-trusted needs --proxy-protocol"),
        (args.unix_mode is not None, args.unix, "--unix-mode needs --unix"),
        (args.handler_arg, args.handler, "--handler-arg needs --handler"),
        *(
            (getattr(args, option[2:].replace("-", "_")), args.relay, f"{option} needs --relay")
            for option in relay_options
        ),
        (args.relay_ca_file, args.relay_starttls, "--relay-ca-file needs --relay-starttls"),
        (args.auth_require, args.auth_file, "--auth-require needs --auth-file"),
        (args.auth_over_plaintext, args.auth_file, "--auth-over-plaintext needs --auth-file"),
        # RFC 4954 4: AUTH is offered only over TLS, so without it nobody could log in.
        (
            args.auth_file,
            args.tls_cert or args.auth_over_plaintext,
            "--auth-file needs --tls-cert (AUTH is offered only over TLS), "
            "or --auth-over-plaintext to offer it without (for tests)",
        ),
        (
            args.sink,
            not (args.maildir or args.mbox or args.eml_dir or args.relay),
            "--sink discards messages: it cannot go with another output",
        ),
        (
            args.milter_default_action != "tempfail",
            args.milter,
            "--milter-default-action needs --milter",
        ),
    ]
    for given, needed, message in dependencies:
        if given and not needed:
            raise CliError(message)
    if args.unix and (args.host or args.port is not None):
        raise CliError("--unix replaces --host and --port: give one or the other")
    if args.unix and args.proxy_trusted:
        # A Unix-domain socket's clients have no address to trust.
        raise CliError(
            "--proxy-trusted does not apply to --unix: the socket file's permissions "
            "(--unix-mode) decide who may connect"
        )
