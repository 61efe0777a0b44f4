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
    """What every session of one server shares: names, limits, timeouts, policies, and which
    extensions are served. Its fields are the keyword arguments of ``SmtpServer`` (typed as
    [`SessionOptions`][alephsmtp.config.SessionOptions]); a size or count limit of ``0`` means no
    limit unless its description says otherwise."""

    hostname: str = field(default_factory=socket.getfqdn)
    """The server's name, in the greeting and the EHLO reply (default: this host's FQDN)."""
    greeting: str | None = None
    """The greeting when ``on_session`` does not give one (default
    ``"220 <hostname> ESMTP alephsmtp"``)."""
    max_message_size: int = 32 << 20
    """Bytes per message, advertised as ``SIZE`` (RFC 1870): ``552 5.3.4`` at MAIL for a
    larger ``SIZE=``, and after the end of data for a message that grew past it."""
    max_command_line_length: int = COMMAND_LINE_BASE
    """A command line's octets, CRLF included, before what the offered extensions add (RFC
    5321 4.5.3.1.4: 512); ``500 5.5.2`` past it. Not 0."""
    max_text_line_length: int = 0
    """Octets per line of a message (RFC 5321 4.5.3.1.6 says 1000); 0 accepts any, as
    Postfix does."""
    max_recipients: int = 1000
    """Recipients per transaction (RFC 5321 4.5.3.1.8 asks for at least 100); ``452 4.5.3``
    past it."""
    max_connections: int = 10000
    """Open connections per server (per worker); ``421 4.7.0`` at connect past it. The
    descriptor limit (``RLIMIT_NOFILE``) caps it too."""
    max_connections_per_ip: int = 50
    """Open connections per client address (Postfix's smtpd_client_connection_count_limit);
    ``421 4.7.0`` at connect past it."""
    connection_limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """Networks ``max_connections_per_ip`` does not apply to."""
    bare_newline: Literal["reject", "normalize"] = "reject"
    """A bare CR or LF: ``"reject"`` (``500 5.5.2`` in a command, ``554 5.5.2`` for a
    message: SMTP smuggling) or ``"normalize"`` (taken as CRLF)."""
    idle_timeout: float = 300.0
    """Seconds to wait for a command (RFC 5321 4.5.3.2.7: 5 minutes); ``421 4.4.2`` past it."""
    data_timeout: float = 180.0
    """Seconds between reads of a message (RFC 5321 4.5.3.2.5: 3 minutes)."""
    min_data_rate: int = 500
    """Bytes per second a message must average once ``data_rate_grace`` is over (Postfix:
    500); ``421 4.4.2`` below it. 0: not checked."""
    data_rate_grace: float = 30.0
    """Seconds of a message before its data rate is judged."""
    write_timeout: float = 60.0
    """Seconds a client may leave its replies untaken (our send buffer full), or a closing
    connection its last reply, before the connection is aborted (Postfix's smtpd_timeout
    covers writes too)."""
    handler_timeout: float = 60.0
    """Seconds an asynchronous handler may take to answer a command; ``451 4.3.0`` past it."""
    message_handler_timeout: float = 300.0
    """Seconds ``message_received`` handlers may take (RFC 5321 4.5.3.2.6: the client waits
    10 minutes); ``451 4.3.0`` past it."""
    max_bad_commands: int = 20
    """Syntax, sequence and unknown-command errors per session (Postfix: 20), then
    ``421 4.7.0`` and close."""
    max_junk_commands: int = 100
    """NOOP, RSET, VRFY, EXPN and HELP per session until a message is accepted (Postfix's
    smtpd_junk_command_limit); past it each counts as an error too."""
    max_auth_failures: int = 5
    """Failed AUTH exchanges per session, then ``421 4.7.0`` and close."""
    auth_failure_delay: float = 1.0
    """Seconds each failed AUTH after the first waits before its reply (password guessing)."""
    max_transactions: int = 0
    """Mail transactions per session; ``421 4.7.0`` past it."""
    max_commands: int = 0
    """Commands per session; ``421 4.7.0`` past it."""
    forbid_unauth_pipelining: bool = False
    """Postfix 3.9's smtpd_forbid_unauth_pipelining: a client that is not authenticated and
    sends more after a command that must end a pipeline group (RFC 2920 3.1: EHLO, HELO, DATA,
    VRFY, EXPN, NOOP; and STARTTLS) gets ``554 5.5.0`` and is closed. Most spam software does
    this; real clients wait for those replies."""
    enhanced_status_codes: bool = True
    """RFC 2034 ``ENHANCEDSTATUSCODES``: an RFC 3463 code on every reply."""
    eightbitmime: bool = True
    """RFC 6152 ``8BITMIME``: ``BODY=7BIT`` / ``8BITMIME``."""
    smtputf8: bool = True
    """RFC 6531 ``SMTPUTF8``: UTF-8 addresses in a transaction begun with it."""
    pipelining: bool = True
    """RFC 2920 ``PIPELINING`` advertised (pipelined commands are answered in order anyway)."""
    chunking: bool = True
    """RFC 3030 ``CHUNKING``: BDAT."""
    binarymime: bool = True
    """RFC 3030 ``BINARYMIME`` (needs ``chunking``)."""
    dsn: bool = True
    """RFC 3461 ``DSN``: RET, ENVID, NOTIFY, ORCPT validated and kept on the envelope."""
    lmtp: bool = False
    """Speak LMTP (RFC 2033): LHLO, and one reply per recipient after the message."""
    tls_context: ssl.SSLContext | None = None
    """A server-side context: STARTTLS (RFC 3207) is offered, or with
    ``SmtpServer(implicit_tls=True)`` TLS starts at once (RFC 8314)."""
    require_tls: bool = False
    """MAIL and AUTH only after STARTTLS (``530 5.7.0``)."""
    tls_handshake_timeout: float = 30.0
    """Seconds a TLS handshake may take."""
    auth_mechanisms: tuple[str, ...] = MECHANISMS
    """The SASL mechanisms offered (RFC 4954), when an ``auth`` or ``auth_command`` handler
    will judge them, and over TLS unless ``auth_over_plaintext``."""
    auth_require: bool = False
    """MAIL only after AUTH (``530 5.7.0``)."""
    auth_over_plaintext: bool = False
    """Offer AUTH without TLS (RFC 4954 4: SHOULD NOT; for tests)."""
    spool_threshold: int = 1 << 20
    """Bytes of a message kept in memory; past them it goes to a temporary file as it arrives,
    so RAM per connection stays bounded, however large the messages (Postfix writes its queue
    file the same way). 0: always in memory."""
    spool_directory: str | None = None
    """Where spooled messages go (default: the system's temporary directory)."""
    measure_latency: bool = False
    """Time handlers (per event) and the wait from a message's end to its reply, for the
    metrics' latency histograms (a clock read or two; off unless an exporter wants them)."""
    esmtp_extensions: tuple[Extension, ...] = ()
    """ESMTP extensions of your own ([`Extension`][alephsmtp.extensions.Extension]): EHLO keywords
    and the MAIL/RCPT parameters they allow, typed by their converters."""
    xclient_networks: tuple[str, ...] = ()
    """Networks whose clients may send XCLIENT, naming the client they speak for (a proxy:
    nginx mail, Dovecot; Postfix's smtpd_authorized_xclient_hosts). Empty: XCLIENT is not
    served."""
    xforward_networks: tuple[str, ...] = ()
    """Networks whose clients may send XFORWARD, the original client of what they relay
    (Postfix's smtpd_authorized_xforward_hosts). Empty: XFORWARD is not served."""
    command_buffer_size: int = 16 << 10
    """Bytes of each pooled read buffer for commands."""
    data_buffer_size: int = 256 << 10
    """Bytes of each pooled read buffer while a message is read."""

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
    """[`SessionConfig`][alephsmtp.config.SessionConfig]'s fields as keyword arguments
    (``SmtpServer(**options)``), so that a type checker catches a misspelt or mistyped option. Kept
    equal to the dataclass by a test.
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
