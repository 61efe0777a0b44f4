"""SessionConfig: every name, limit, policy and extension switch a server's sessions share.

One place for limits: the session, the server, the CLI and the docs read them from here.
Every limit has an RFC-sized default; ``0`` turns a size limit off.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypedDict

from .auth import MECHANISMS

if TYPE_CHECKING:
    from .extensions import Extension

__all__ = ["COMMAND_LINE_BASE", "SessionConfig", "SessionOptions"]

# RFC 4422 3.1: a mechanism name is 1 to 20 of A-Z, 0-9, "-", "_" (uppercased here).
_MECHANISM_NAME = re.compile(r"[A-Z0-9_\-]{1,20}\Z")

# RFC 5321 4.5.3.1.4 gives 512 octets for a command line; each extension that adds to MAIL or
# RCPT adds its own octets: SIZE (RFC 1870 4: 26), BODY=8BITMIME (15), SMTPUTF8 (RFC 6531 3.4:
# 10), DSN (RFC 3461 4: 110 on MAIL, 500 on RCPT), AUTH= (RFC 4954 5: 500).
COMMAND_LINE_BASE = 512
_SIZE_EXTRA = 26
_BODY_EXTRA = 15
_SMTPUTF8_EXTRA = 10
_DSN_EXTRA = 500
_CUSTOM_EXTRA = 128  # per registered Extension (its parameters)
_AUTH_EXTRA = 500


@dataclass(slots=True)
class SessionConfig:
    """What every session of one server shares. Keyword arguments of ``SmtpServer``."""

    hostname: str = field(default_factory=socket.getfqdn)
    greeting: str | None = None  # default: "220 <hostname> ESMTP alephsmtp"
    max_message_size: int = 32 << 20  # RFC 1870 SIZE; 552 5.3.4 past it
    max_command_line_length: int = COMMAND_LINE_BASE  # before extension additions
    max_text_line_length: int = 0  # RFC 5321 4.5.3.1.6 says 1000; 0 accepts any (Postfix)
    max_recipients: int = 1000  # RFC 5321 4.5.3.1.8 asks for at least 100; 452 4.5.3 past it
    max_connections: int = 10000  # per server (per worker); 421 4.7.0 at connect past it
    max_connections_per_ip: int = 50  # like Postfix's smtpd_client_connection_count_limit
    connection_limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # networks
    # "normalize": a bare CR or LF is taken as CRLF (Postfix smtpd_forbid_bare_newline = no)
    bare_newline: Literal["reject", "normalize"] = "reject"
    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: server timeout 5 minutes
    data_timeout: float = 180.0  # between reads of a message (RFC 5321 4.5.3.2.5: 3 minutes)
    min_data_rate: int = 500  # bytes/s over a message, after data_rate_grace (Postfix: 500)
    data_rate_grace: float = 30.0  # seconds before the data rate is judged
    # Replies the client does not take: writing stuck (the send buffer full) this long, or a
    # close still waiting to deliver its last reply, aborts the connection (Postfix's
    # smtpd_timeout covers writes too).
    write_timeout: float = 60.0
    handler_timeout: float = 60.0  # an async handler's answer to a command; 451 4.3.0 past it
    message_handler_timeout: float = 300.0  # message_received (RFC 5321 4.5.3.2.6: < 10 min)
    max_bad_commands: int = 20  # syntax/sequence errors before 421 4.7.0 (Postfix: 20)
    # NOOP, RSET, VRFY, EXPN, HELP: past this many (until a message is accepted), each counts
    # as an error too (Postfix's smtpd_junk_command_limit); 0: no limit.
    max_junk_commands: int = 100
    max_auth_failures: int = 5  # failed AUTH exchanges per session, then 421 4.7.0; 0: none
    auth_failure_delay: float = 1.0  # each failed AUTH after the first answers this late
    max_transactions: int = 0  # per session, 0: no limit; 421 4.7.0 past it
    max_commands: int = 0  # per session, 0: no limit; 421 4.7.0 past it
    # Postfix 3.9's smtpd_forbid_unauth_pipelining: a client that is not authenticated and
    # sends more after a command that must end a pipeline group (RFC 2920 3.1: EHLO, HELO,
    # DATA, VRFY, EXPN, NOOP; and STARTTLS) gets 554 5.5.0 and is closed. Most spam software
    # does this; real clients wait for those replies.
    forbid_unauth_pipelining: bool = False
    enhanced_status_codes: bool = True  # RFC 2034
    eightbitmime: bool = True  # RFC 6152
    smtputf8: bool = True  # RFC 6531
    pipelining: bool = True  # RFC 2920
    chunking: bool = True  # RFC 3030 CHUNKING (BDAT)
    binarymime: bool = True  # RFC 3030 BINARYMIME (needs CHUNKING)
    dsn: bool = True  # RFC 3461
    lmtp: bool = False  # RFC 2033: LHLO, one reply per recipient after the message
    # STARTTLS (RFC 3207) is offered when a server-side context is given.
    tls_context: ssl.SSLContext | None = None
    require_tls: bool = False  # MAIL and AUTH only after STARTTLS (530 5.7.0)
    tls_handshake_timeout: float = 30.0
    # AUTH (RFC 4954) is offered when the session's ``auth`` event has a handler.
    auth_mechanisms: tuple[str, ...] = MECHANISMS
    auth_require: bool = False  # MAIL only after AUTH (530 5.7.0)
    auth_over_plaintext: bool = False  # offer AUTH without TLS (RFC 4954 4: SHOULD NOT)
    # A message past this many bytes goes to a temporary file as it arrives (in
    # spool_directory, the system's temporary directory by default): RAM per connection stays
    # bounded, however large the messages (Postfix writes its queue file the same way).
    spool_threshold: int = 1 << 20
    spool_directory: str | None = None
    # Time handlers (per event) and the wait from a message's end to its reply, for the
    # metrics' latency histograms; off unless an exporter wants them (a clock read or two).
    measure_latency: bool = False
    # ESMTP extensions of your own (alephsmtp.extensions.Extension): EHLO keywords and the
    # MAIL/RCPT parameters they allow, typed by their converters.
    esmtp_extensions: tuple[Extension, ...] = ()
    # Networks whose clients may send XCLIENT (a proxy naming the client it speaks for: nginx
    # mail, Dovecot) and XFORWARD (an MTA forwarding the original client's attributes):
    # Postfix's smtpd_authorized_xclient_hosts / _xforward_hosts. Empty: nobody.
    xclient_networks: tuple[str, ...] = ()
    xforward_networks: tuple[str, ...] = ()
    command_buffer_size: int = 16 << 10
    data_buffer_size: int = 256 << 10

    def __post_init__(self) -> None:
        if self.bare_newline not in ("reject", "normalize"):
            raise ValueError("bare_newline must be 'reject' or 'normalize'")
        for name in (
            "max_message_size",
            "max_text_line_length",
            "max_recipients",
            "max_connections",
            "max_connections_per_ip",
            "min_data_rate",
            "max_bad_commands",
            "max_junk_commands",
            "max_auth_failures",
            "auth_failure_delay",
            "write_timeout",
            "max_transactions",
            "max_commands",
            "spool_threshold",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_command_line_length < COMMAND_LINE_BASE:
            raise ValueError("max_command_line_length below RFC 5321's 512 octets")
        # A name alephsmtp does not implement is for an auth_command handler to run (checked
        # against the registry by shape only: handlers come later than the configuration).
        bad = [name for name in self.auth_mechanisms if not _MECHANISM_NAME.match(name)]
        if bad:
            raise ValueError(f"not SASL mechanism names: {bad}")
        if self.require_tls and self.tls_context is None:
            raise ValueError("require_tls needs a tls_context")
        for networks in (self.xclient_networks, self.xforward_networks):
            for network in networks:
                ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        _check_extensions(self.esmtp_extensions)

    @property
    def command_line_limit(self) -> int:
        """The command line limit with what the offered extensions add."""
        limit = self.max_command_line_length + _SIZE_EXTRA + _AUTH_EXTRA
        if self.eightbitmime:
            limit += _BODY_EXTRA
        if self.smtputf8:
            limit += _SMTPUTF8_EXTRA
        if self.dsn:
            limit += _DSN_EXTRA
        # RFC 5321 4.1.2: each extension may extend the line; its parameters share this.
        return limit + _CUSTOM_EXTRA * len(self.esmtp_extensions)


# Keywords and MAIL/RCPT parameters alephsmtp serves itself: an Extension may not take them.
_BUILT_IN_KEYWORDS = frozenset(
    {
        "PIPELINING", "SIZE", "8BITMIME", "CHUNKING", "BINARYMIME", "SMTPUTF8", "DSN",
        "STARTTLS", "AUTH", "ENHANCEDSTATUSCODES", "HELP", "XCLIENT", "XFORWARD",
    }
)  # fmt: skip
_BUILT_IN_PARAMETERS = frozenset(
    {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "NOTIFY", "ORCPT"}
)


def _check_extensions(extensions: tuple[Extension, ...]) -> None:
    seen: set[str] = set()
    for extension in extensions:
        keyword = getattr(extension, "keyword", None)
        if not isinstance(keyword, str):
            raise TypeError(f"not an alephsmtp.Extension: {extension!r}")
        if keyword in _BUILT_IN_KEYWORDS or keyword in seen:
            raise ValueError(f"ESMTP keyword {keyword} is served already")
        seen.add(keyword)
        taken = _BUILT_IN_PARAMETERS.intersection(
            (*extension.mail_parameters, *extension.rcpt_parameters)
        )
        if taken:
            raise ValueError(f"{keyword}: parameters served already: {sorted(taken)}")


class SessionOptions(TypedDict, total=False):
    """:class:`SessionConfig`'s fields as keyword arguments (``SmtpServer(**options)``), so that
    a type checker catches a misspelt or mistyped option. Kept equal to the dataclass by a test.
    """

    hostname: str
    greeting: str | None
    max_message_size: int
    max_command_line_length: int
    max_text_line_length: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    connection_limit_exempt: tuple[str, ...]
    bare_newline: Literal["reject", "normalize"]
    idle_timeout: float
    data_timeout: float
    min_data_rate: int
    data_rate_grace: float
    write_timeout: float
    handler_timeout: float
    message_handler_timeout: float
    max_bad_commands: int
    max_junk_commands: int
    max_auth_failures: int
    auth_failure_delay: float
    max_transactions: int
    max_commands: int
    forbid_unauth_pipelining: bool
    enhanced_status_codes: bool
    eightbitmime: bool
    smtputf8: bool
    pipelining: bool
    chunking: bool
    binarymime: bool
    dsn: bool
    lmtp: bool
    tls_context: ssl.SSLContext | None
    require_tls: bool
    tls_handshake_timeout: float
    auth_mechanisms: tuple[str, ...]
    auth_require: bool
    auth_over_plaintext: bool
    spool_threshold: int
    spool_directory: str | None
    measure_latency: bool
    esmtp_extensions: tuple[Extension, ...]
    xclient_networks: tuple[str, ...]
    xforward_networks: tuple[str, ...]
    command_buffer_size: int
    data_buffer_size: int
