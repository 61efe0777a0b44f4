"""``aiosmtpd.smtp`` on alephsmtp: [`SMTP`][alephsmtp.compat.aiosmtpd.smtp.SMTP],
[`Session`][alephsmtp.compat.aiosmtpd.smtp.Session],
[`Envelope`][alephsmtp.compat.aiosmtpd.smtp.Envelope] and the AUTH types, with aiosmtpd 1.4's
signatures and semantics.

An [`SMTP`][alephsmtp.compat.aiosmtpd.smtp.SMTP] object is the adapter between one alephsmtp session
and an aiosmtpd handler: [`SMTP.attach()`][alephsmtp.compat.aiosmtpd.smtp.SMTP.attach] (the
``on_session`` of an [`SmtpServer`][alephsmtp.server.SmtpServer]) builds the aiosmtpd ``Session``
and ``Envelope`` and connects the session's events to the handler's ``handle_XXX`` hooks, turning
the strings they return into replies. alephsmtp reads and checks the bytes, keeps the command order,
the limits and the timeouts; the hooks decide what aiosmtpd lets them decide. An ``SMTP`` object is
also an asyncio protocol factory's product, as in aiosmtpd:
``loop.create_server(lambda: SMTP(handler), host, port)`` serves the same way, each connection
handed to a session of an alephsmtp server kept per event loop and configuration
(`SmtpServer.protocol_factory <alephsmtp.SmtpServer.protocol_factory>()`), so that such connections
share its buffer pools, replies as written, metrics and connection limits.

Events the handler has no hook for are not even connected (a session with no handler for an
event costs nothing for it); the envelope a hook sees is filled from alephsmtp's own envelope
whenever no ``handle_MAIL`` / ``handle_RCPT`` hook keeps it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dis
import email._header_value_parser as _header_parser
import enum
import functools
import inspect
import logging
import re
import socket
import ssl
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from typing import Any, NamedTuple, TypeVar

from alephsmtp import __version__ as _alephsmtp_version
from alephsmtp.auth import AuthCancelled
from alephsmtp.config import SessionConfig
from alephsmtp.envelope import SmtpEnvelope
from alephsmtp.errors import SmtpError
from alephsmtp.events import (
    AuthCommandEventArgs,
    AuthEventArgs,
    CommandEventArgs,
    MessageReceivedEventArgs,
)
from alephsmtp.replies import Reply
from alephsmtp.server import SmtpServer
from alephsmtp.session import SmtpSession

from ._support import ssl_details, verbatim_reply, word_options
from .proxy_protocol import proxy_data

__all__ = [
    "ALLOWED_BEFORE_STARTTLS",
    "BOGUS_LIMIT",
    "CALL_LIMIT_DEFAULT",
    "DATA_SIZE_DEFAULT",
    "MISSING",
    "SMTP",
    "AuthCallbackType",
    "AuthMechanismType",
    "AuthResult",
    "AuthenticatorType",
    "Envelope",
    "LoginPassword",
    "Session",
    "TLSSetupException",
    "__ident__",
    "__version__",
    "auth_mechanism",
    "login_always_fail",
    "sanitize",
    "sanitized_log",
    "syntax",
]

log = logging.getLogger("alephsmtp.compat.aiosmtpd")


class _Missing(enum.Enum):
    MISSING = object()


MISSING = _Missing.MISSING
"""What a hook returns (or aiosmtpd's server finds) when it leaves the default to the server."""

__version__ = "1.4.6"  # the aiosmtpd API this module follows
__ident__ = f"alephsmtp {_alephsmtp_version}"
BOGUS_LIMIT = 5
CALL_LIMIT_DEFAULT = 20
DATA_SIZE_DEFAULT = 2**25
# RFC 3207 4: before STARTTLS, with require_starttls, only these are served.
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})

AuthCallbackType = Callable[[str, bytes, bytes], bool]
AuthenticatorType = Callable[["SMTP", "Session", "Envelope", str, Any], "AuthResult"]
AuthMechanismType = Callable[["SMTP", list[str]], Awaitable[Any]]
RT = TypeVar("RT")
DecoratorType = Callable[[Callable[..., RT]], Callable[..., RT]]


@dataclass(kw_only=True)
class AuthResult:
    """What an ``authenticator`` decides (aiosmtpd 1.3+): keyword arguments only.

    ``message``, if given, is sent as the reply (code included); ``auth_data`` is kept as
    ``session.auth_data``. ``handled`` is accepted for compatibility: the client always gets a
    reply here (aiosmtpd sends none for a refusal with ``handled=True``, and the client hangs).
    """

    success: bool
    handled: bool = True
    message: str | None = None
    auth_data: Any = field(default=None, repr=False)


class LoginPassword(NamedTuple):
    """The ``auth_data`` of the LOGIN and PLAIN mechanisms; its repr hides the password."""

    login: bytes
    password: bytes

    def __str__(self) -> str:
        return f"LoginPassword(login='{self.login.decode(errors='replace')}', password=...)"

    def __repr__(self) -> str:
        return str(self)


class Session:
    """What one connection has built up; a new one is made after STARTTLS (RFC 3207 4.2)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.peer: Any = None
        self.ssl: dict[str, Any] | None = None
        self.host_name: str | None = None
        self.extended_smtp = False
        self.loop = loop
        self.proxy_data: Any = None
        self._login_data: Any = None
        self.auth_data: Any = None
        self.authenticated: bool | None = None

    @property
    def login_data(self) -> Any:
        """Deprecated in aiosmtpd 1.3: the login of the last successful AUTH."""
        log.warning("Session.login_data is deprecated and will be removed in version 2.0")
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        log.warning("Session.login_data is deprecated and will be removed in version 2.0")
        self._login_data = value


class Envelope:
    """One mail transaction, as the hooks fill it in. A new one after RSET, HELO/EHLO, the
    end of a message and STARTTLS."""

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.content: bytes | str | None = None
        self.original_content: bytes | None = None
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []


def syntax(text: str, extended: str | None = None, when: str | None = None) -> DecoratorType[RT]:
    """Give an ``smtp_XXX`` command method its HELP text (``when``: the SMTP attribute that
    must be true for the command to be listed)."""

    def decorator(function: Callable[..., RT]) -> Callable[..., RT]:
        function.__smtp_syntax__ = text  # type: ignore[attr-defined]
        function.__smtp_syntax_extended__ = extended  # type: ignore[attr-defined]
        function.__smtp_syntax_when__ = when  # type: ignore[attr-defined]
        return function

    return decorator


_MECHANISM_NAME = re.compile(r"[A-Z0-9_-]+\Z")


def auth_mechanism(actual_name: str) -> DecoratorType[RT]:
    """Name the SASL mechanism an ``auth_XXX`` method implements (a name with a dash, or
    in lower case: it is uppercased)."""
    name = actual_name.upper()
    if not _MECHANISM_NAME.match(name):
        raise ValueError(f"Invalid AUTH mechanism name: {name}")

    def decorator(function: Callable[..., RT]) -> Callable[..., RT]:
        function.__auth_mechanism_name__ = name  # type: ignore[attr-defined]
        return function

    return decorator


def login_always_fail(mechanism: str, login: bytes, password: bytes) -> bool:
    """The ``auth_callback`` used when neither it nor an ``authenticator`` is given."""
    return False


class TLSSetupException(Exception):
    """Kept for code that imports it; alephsmtp reports a failed handshake by closing."""


_AUTH_LINE = re.compile(rb"(\s*AUTH\s+\S+[^\S\r\n]+)(\S+)((?:\r\n)?)", re.IGNORECASE)


def sanitize(text: bytes) -> bytes:
    """A command line with the credentials of ``AUTH <mechanism> <response>`` masked."""
    match = _AUTH_LINE.match(text)
    if match is None:
        return text
    return match.group(1) + b"********" + match.group(3)


def sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """Log with every ``bytes`` argument passed through
    [`sanitize()`][alephsmtp.compat.aiosmtpd.smtp.sanitize]."""
    func(msg, *(sanitize(a) if isinstance(a, bytes) else a for a in args), **kwargs)


# --- what a handler has: looked up once per handler object ----------------------------------

_HOOK_NAMES = (
    "HELO",
    "EHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "AUTH",
    "STARTTLS",
    "PROXY",
)


class _Handler:
    """A handler's hooks, found once (aiosmtpd looks them up for every connection)."""

    __slots__ = (
        "auth_methods",
        "auth_route",
        "ehlo_old",
        "exception",
        "handler",
        "hooks",
        "inline",
        "process_message",
    )

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.hooks: dict[str, Callable[..., Any]] = {}
        for name in _HOOK_NAMES:
            hook = getattr(handler, "handle_" + name, None)
            if hook is not None:
                self.hooks[name] = hook
        self.exception: Callable[[Exception], Any] | None = getattr(
            handler, "handle_exception", None
        )
        self.process_message: Callable[..., Any] | None = (
            None if "DATA" in self.hooks else getattr(handler, "process_message", None)
        )
        self.ehlo_old = False
        ehlo = self.hooks.get("EHLO")
        if ehlo is not None:
            count = len(inspect.signature(ehlo).parameters)
            if count not in (4, 5):
                raise RuntimeError("Unsupported EHLO Hook")
            self.ehlo_old = count == 4
            if self.ehlo_old:
                warnings.warn(
                    "Use the 5-argument handle_EHLO() hook instead of the 4-argument "
                    "handle_EHLO() hook; support for the 4-argument handle_EHLO() hook will "
                    "be removed in version 2.0",
                    DeprecationWarning,
                    stacklevel=2,
                )
        self.auth_methods = _auth_methods(handler)
        # handle_AUTH or mechanisms of the handler's own: AUTH runs in the layer, as in
        # aiosmtpd (SMTP._on_auth_command); else alephsmtp's session runs LOGIN and PLAIN.
        self.auth_route = "AUTH" in self.hooks or bool(self.auth_methods)
        # The hooks that are coroutine functions with no await in them: they run to the end on
        # their first step, so they are run inline, like plain functions (no task, and the
        # session need not stop reading while they run).
        self.inline = frozenset(name for name, hook in self.hooks.items() if _never_suspends(hook))


# What a coroutine's code needs in order to suspend: an await, async for or async with
# (CPython compiles each into one of these); a coroutine whose code (and nested code) has none
# of them returns on its first step.
_SUSPENDING_OPS = frozenset(
    {"GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "SEND", "YIELD_VALUE"}
)


def _never_suspends(function: Any) -> bool:
    if not inspect.iscoroutinefunction(function):
        return False
    code = getattr(inspect.unwrap(getattr(function, "__func__", function)), "__code__", None)
    return code is not None and _await_free(code)


def _await_free(code: Any) -> bool:
    if any(op.opname in _SUSPENDING_OPS for op in dis.get_instructions(code)):
        return False
    return all(_await_free(const) for const in code.co_consts if inspect.iscode(const))


def _inline(coroutine: Any) -> Any:
    """The value of a coroutine that cannot suspend (see ``_never_suspends``)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()  # pragma: no cover - excluded by _never_suspends
    raise RuntimeError("an await-free coroutine suspended")


_HANDLERS: dict[int, _Handler] = {}
_HANDLERS_MAX = 64


def _handler_info(handler: Any) -> _Handler:
    # Keyed by identity and checked by identity: a handler that died and whose id was reused
    # is looked up afresh. Bounded, so many short-lived handlers cannot grow it.
    info = _HANDLERS.get(id(handler))
    if info is None or info.handler is not handler:
        info = _Handler(handler)
        if len(_HANDLERS) >= _HANDLERS_MAX:
            _HANDLERS.clear()
        _HANDLERS[id(handler)] = info
    return info


def _auth_methods(obj: Any) -> dict[str, str]:
    """The SASL mechanisms the ``auth_XXX`` methods of ``obj`` implement: mechanism name ->
    attribute. aiosmtpd's naming: ``auth_`` removed, a double underscore stands for a dash,
    or ``@auth_mechanism`` names it; uppercased here (RFC 4954 4: the client may send it in
    any case). A name no client could send (RFC 4422 3.1: 1-20 of A-Z, 0-9, ``-``, ``_``) is
    not offered: a helper method that happens to start with ``auth_``, say."""
    names: dict[str, str] = {}
    for attribute in dir(obj):
        if not attribute.startswith("auth_"):
            continue
        method = getattr(obj, attribute, None)
        if not callable(method):
            continue
        name = getattr(
            method, "__auth_mechanism_name__", attribute.replace("auth_", "").replace("__", "-")
        ).upper()
        if _SASL_NAME.match(name):
            names[name] = attribute
        else:
            log.warning("%s: %r is not a SASL mechanism name; not offered", attribute, name)
    return names


# RFC 4422 3.1: what the session accepts as a mechanism name in AUTH and in its configuration.
_SASL_NAME = re.compile(r"[A-Z0-9_-]{1,20}\Z")
# What a subclass may override that changes how the built-in LOGIN and PLAIN run (then they
# run as aiosmtpd runs them, in the layer, instead of in alephsmtp's session).
_AUTH_INTERNALS = ("challenge_auth", "_authenticate")
_LOGIN_CHALLENGES = ("AuthLoginUsernameChallenge", "AuthLoginPasswordChallenge")
# aiosmtpd's built-in mechanisms, sorted as its EHLO lists them.
_BUILTIN_MECHANISMS: tuple[str, ...] = ("LOGIN", "PLAIN")


# The commands alephsmtp serves itself; a subclass may add others (``smtp_XXX`` methods) but
# not replace these.
_BUILTIN_VERBS = frozenset(
    {"HELO", "EHLO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT"}
    | {"VRFY", "EXPN", "HELP", "STARTTLS", "AUTH"}
)
# HELP's text per command (verb -> syntax, ESMTP addition, SMTP attribute it depends on).
_SMTP_SYNTAX: dict[str, tuple[str, str | None, str | None]] = {
    "AUTH": ("AUTH <mechanism>", None, None),
    "DATA": ("DATA", None, None),
    "EHLO": ("EHLO hostname", None, None),
    "HELO": ("HELO hostname", None, None),
    "HELP": ("HELP [command]", None, None),
    "MAIL": ("MAIL FROM: <address>", " [SP <mail-parameters>]", None),
    "NOOP": ("NOOP [ignored]", None, None),
    "QUIT": ("QUIT", None, None),
    "RCPT": ("RCPT TO: <address>", " [SP <mail-parameters>]", None),
    "RSET": ("RSET", None, None),
    "STARTTLS": ("STARTTLS", None, "tls_context"),
    "VRFY": ("VRFY <address>", None, None),
}
_LMTP_SYNTAX = {
    **{verb: entry for verb, entry in _SMTP_SYNTAX.items() if verb not in ("HELO", "EHLO")},
    "LHLO": ("LHLO hostname", None, None),
}


class _Class:
    """What an SMTP (sub)class adds: command methods and their HELP text; found once."""

    __slots__ = ("auth_custom", "auth_methods", "commands", "syntax")

    def __init__(self, cls: type[SMTP]) -> None:
        self.commands: dict[str, str] = {}
        self.syntax = dict(_LMTP_SYNTAX if cls._lmtp else _SMTP_SYNTAX)
        for attribute in dir(cls):
            if not attribute.startswith("smtp_"):
                continue
            verb = attribute[5:]
            if verb in _BUILTIN_VERBS:
                raise NotImplementedError(
                    f"{cls.__name__}.{attribute}: the aiosmtpd layer serves {verb} itself; "
                    "subclasses may add commands but not replace the built-in ones"
                )
            method = getattr(cls, attribute)
            self.commands[verb] = attribute
            text = getattr(method, "__smtp_syntax__", None)
            if text is not None:
                extended = getattr(method, "__smtp_syntax_extended__", None)
                self.syntax[verb] = (text, extended, getattr(method, "__smtp_syntax_when__", None))
        self.auth_methods = _auth_methods(cls)
        # The mechanisms whose exchange this class changes: new ones, overridden auth_LOGIN /
        # auth_PLAIN, or what they use (challenge_auth, _authenticate, LOGIN's prompts).
        custom = {
            name
            for name, attribute in self.auth_methods.items()
            if getattr(cls, attribute) is not getattr(SMTP, attribute, None)
        }
        if any(getattr(cls, name) is not getattr(SMTP, name) for name in _AUTH_INTERNALS):
            custom.update(self.auth_methods)
        elif any(getattr(cls, name) != getattr(SMTP, name) for name in _LOGIN_CHALLENGES):
            custom.add("LOGIN")
        self.auth_custom = frozenset(custom)


_CLASSES: dict[type, _Class] = {}


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    # socket.getfqdn() may ask the resolver: once per process, not once per connection.
    return socket.getfqdn()


# --- fixed replies, written as aiosmtpd writes them ------------------------------------------

_R_OK = verbatim_reply("250 OK")
_R_HELO_FIRST = verbatim_reply("503 Error: send HELO first")
_R_NESTED_MAIL = verbatim_reply("503 Error: nested MAIL command")
_R_NEED_MAIL = verbatim_reply("503 Error: need MAIL command")
_R_NEED_RCPT = verbatim_reply("503 Error: need RCPT command")
_R_AUTH_REQUIRED = verbatim_reply("530 5.7.0 Authentication required")
_R_STARTTLS_FIRST = verbatim_reply("530 Must issue a STARTTLS command first")
_R_INSECURE = verbatim_reply("554 Command refused due to lack of security")
_R_EXPN = verbatim_reply("502 EXPN not implemented")
_R_STRICT_ASCII = verbatim_reply("500 Error: strict ASCII mode")
_R_AUTH_INVALID = verbatim_reply("535 5.7.8 Authentication credentials invalid")
_R_AUTH_TWICE = verbatim_reply("503 Already authenticated")
_R_AUTH_MECHANISM = verbatim_reply("504 5.5.4 Unrecognized authentication type")
# What challenge_auth() pushes when the client's answer ends the exchange (RFC 4954 4).
_AUTH_ABORTED = "501 5.7.0 Auth aborted"
_AUTH_NOT_BASE64 = "501 5.5.2 Can't decode base64"
_AUTH_NOT_SPLIT = "501 5.5.2 Can't split auth value"
_AUTH_SUCCESS = "235 2.7.0 Authentication successful"
_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# aiosmtpd's auth_required refuses these until session.authenticated is true.
_AUTH_GATED = frozenset({"MAIL", "RCPT", "DATA"})
# A fault on the server's side is temporary (RFC 5321 4.2.5: the client keeps the message and
# retries); the exception's text stays in the log (aiosmtpd sends it with a 500).
_R_FAULT = verbatim_reply("451 4.3.0 Error: local error in processing")

# PROXY protocol: aiosmtpd takes a header from any peer and lets handle_PROXY judge it.
_ANY_NETWORK = ("0.0.0.0/0", "::/0")

Missing = Callable[[], Reply | None] | None


def _final(text: str) -> bool:
    """Whether pushed ``text`` ends with a reply's final line (``"501 ..."``, not
    ``"250-..."``: RFC 5321 4.2.1)."""
    return _LINE_BREAK.split(text.rstrip("\r\n"))[-1][3:4] != "-"


def _challenge_bytes(text: bytes) -> bytes:
    """``challenge_auth(..., encode_to_b64=False)``: the bytes whose base64 is ``text``.

    alephsmtp's session writes every challenge in base64 (RFC 4954 4: ``334`` and base64),
    so text that is base64 already goes out exactly as given. Text that is not (aiosmtpd would
    send it raw, which no client can decode) is sent base64-encoded.
    """
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        data = None
    if data is not None and base64.b64encode(data) == text:
        return data
    log.warning("challenge_auth(encode_to_b64=False) with text that is not base64: encoded")
    return text


def _keywords_from(reply: Any, keywords: list[str]) -> Any:
    """An EHLO hook's multi-line reply: its lines after the first are the keyword lines."""
    if isinstance(reply, Reply) and reply.code // 100 == 2:
        keywords[:] = list(reply.lines[1:])
    return reply


class SMTP(asyncio.BufferedProtocol):
    """aiosmtpd's ``SMTP``: the handler and the parameters of one connection.

    The keyword parameters are aiosmtpd 1.4's. They become the alephsmtp
    [`SessionConfig`][alephsmtp.config.SessionConfig] (size, TLS, AUTH, timeouts) or are applied by
    this adapter (``ident``, ``decode_data``, ``auth_required`` for HELP/VRFY,
    ``command_call_limit``, ``require_starttls`` for the commands alephsmtp does not gate itself).

    AUTH: with no AUTH hooks of the program's own, alephsmtp's session runs LOGIN and PLAIN and the
    ``authenticator`` (or ``auth_callback``) judges the credentials. A ``handle_AUTH`` hook,
    ``auth_XXX`` methods on the handler or on a subclass (or a subclass that changes
    ``challenge_auth``, ``_authenticate`` or LOGIN's prompts) make the whole AUTH command run as
    aiosmtpd runs it, in `_on_auth_command()`: the hook, then the mechanism's method (aiosmtpd's own
    [`auth_LOGIN()`][alephsmtp.compat.aiosmtpd.smtp.SMTP.auth_LOGIN] and
    [`auth_PLAIN()`][alephsmtp.compat.aiosmtpd.smtp.SMTP.auth_PLAIN] included), which talks to the
    client through [`challenge_auth()`][alephsmtp.compat.aiosmtpd.smtp.SMTP.challenge_auth].

    Not served (``NotImplementedError`` when the object is made): subclasses that replace a
    built-in ``smtp_XXX`` command (adding new commands works).
    """

    command_size_limit = 512
    line_length_limit = 1001  # RFC 5321 4.5.3.1.6: 998 octets, CRLF and a transparency dot
    local_part_limit = 0
    AuthLoginUsernameChallenge = "User Name\x00"
    AuthLoginPasswordChallenge = "Password\x00"
    _lmtp = False

    def __init__(
        self,
        handler: Any,
        *,
        data_size_limit: int | None = DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        decode_data: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        timeout: float = 300,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        auth_exclude_mechanism: Iterable[str] | None = None,
        auth_callback: AuthCallbackType | None = None,
        command_call_limit: int | dict[str, int] | None = None,
        authenticator: AuthenticatorType | None = None,
        proxy_protocol_timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.__ident__ = ident or __ident__
        self.loop = loop
        self.event_handler = handler
        if data_size_limit is not None and not isinstance(data_size_limit, int):
            raise TypeError("data_size_limit must be an int or None")
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.hostname = hostname or _fqdn()
        self.tls_context = tls_context
        # As aiosmtpd has it: the context (or None) when falsy, else the flag.
        self.require_starttls: Any = tls_context and require_starttls
        self._timeout_duration = timeout
        self._auth_require_tls = auth_require_tls
        self._auth_required = auth_required
        if proxy_protocol_timeout is not None and proxy_protocol_timeout <= 0:
            raise ValueError("proxy_protocol_timeout must be > 0")
        self._proxy_timeout = proxy_protocol_timeout
        self._authenticator = authenticator
        self._auth_callback = (
            None if authenticator is not None else (auth_callback or login_always_fail)
        )
        self._call_limit_base: dict[str, int] | None = None
        self._call_limit_default = CALL_LIMIT_DEFAULT
        if command_call_limit is not None:
            if isinstance(command_call_limit, int):
                self._call_limit_base = {}
                self._call_limit_default = command_call_limit
            elif isinstance(command_call_limit, dict):
                if not all(isinstance(value, int) for value in command_call_limit.values()):
                    raise TypeError("All command_call_limit values must be int")
                self._call_limit_base = command_call_limit
                self._call_limit_default = command_call_limit.get("*", CALL_LIMIT_DEFAULT)
            else:
                raise TypeError("command_call_limit must be int or Dict[str, int]")

        info = _handler_info(handler)
        cls_info = _CLASSES.get(type(self))
        if cls_info is None:
            cls_info = _CLASSES[type(self)] = _Class(type(self))
        self._class = cls_info
        # The mechanisms offered, sorted as aiosmtpd's EHLO lists them; _auth_table (mechanism
        # -> (on the handler?, attribute)) only when AUTH runs in the layer.
        self._auth_table: dict[str, tuple[bool, str]] | None = None
        if auth_exclude_mechanism is None and not info.auth_route and not cls_info.auth_custom:
            self._mechanisms = _BUILTIN_MECHANISMS
        else:
            self._auth_setup(info, cls_info, auth_exclude_mechanism or ())
        # aiosmtpd's auth_required looks at session.authenticated, which an AUTH hook sets
        # itself (or not): checked by the layer too, then.
        self._auth_gate = self._auth_table is not None and auth_required
        self._handle_hooks = info.hooks
        self._info = info
        self._inline = info.inline
        self._data_inline = "DATA" in info.inline
        hooks = info.hooks
        self._hook_data = hooks.get("DATA")
        self._mail_hooked = "MAIL" in hooks
        self._rcpt_hooked = "RCPT" in hooks
        # Checks that apply to (nearly) every command: run only when one of them is in use.
        self._guarded = (
            command_call_limit is not None
            or tls_context is not None
            or "STARTTLS" in hooks
            or self.require_starttls
            or self._auth_gate
        )
        # Per-connection state, set by attach().
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self.transport: Any = None
        self._session: SmtpSession | None = None
        self._protocol: asyncio.BaseProtocol | None = None
        self._txn: SmtpEnvelope | None = None
        self._pushed: list[str] = []
        self._tls_seen = False
        self._tls_okay = True
        self._call_limit: MutableMapping[str, int] | None = None
        self._in_auth = False  # an AUTH command is being answered by the hooks
        self._auth_over = False  # challenge_auth() ended the exchange with a reply of its own

    def _auth_setup(self, info: _Handler, cls_info: _Class, exclude: Iterable[str]) -> None:
        # aiosmtpd's table: the SMTP (sub)class's methods, then the handler's, which override
        # them; then the exclusions.
        table = {name: (False, attribute) for name, attribute in cls_info.auth_methods.items()}
        table.update((name, (True, attribute)) for name, attribute in info.auth_methods.items())
        for name in exclude:
            table.pop(name.upper(), None)
        self._mechanisms = tuple(sorted(table))
        if "AUTH" in info.hooks or any(
            on_handler or name in cls_info.auth_custom for name, (on_handler, _) in table.items()
        ):
            self._auth_table = table

    # --- what subclasses of aiosmtpd's SMTP may override ------------------------------------

    def _create_session(self) -> Session:
        return Session(self.loop)

    def _create_envelope(self) -> Envelope:
        return Envelope()

    def _set_post_data_state(self) -> None:
        """A new envelope (after a message, and on every reset)."""
        self.envelope = self._create_envelope()
        self._txn = None

    def _set_rset_state(self) -> None:
        """A new envelope (RSET, HELO/EHLO, STARTTLS)."""
        self._set_post_data_state()

    async def push(self, status: str | bytes) -> None:
        """Add a line to the reply of the command being answered (aiosmtpd writes it at once;
        here it goes out with the reply, in order, so pipelined replies keep their order)."""
        self._pushed.append(
            status.decode("utf-8", "surrogateescape") if isinstance(status, bytes) else status
        )

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> bytes | _Missing:
        """Send ``challenge`` as a ``334`` (RFC 4954 4) and return the client's answer,
        base64-decoded; or ``MISSING`` when the answer ends the exchange: ``*`` (the client
        cancels) or text that is not base64, each answered as aiosmtpd answers it (``501``,
        pushed: the AUTH command's reply unless more is pushed before a final line).

        ``challenge``: text (UTF-8) or bytes, base64-encoded here unless ``encode_to_b64`` is
        false (then it should be base64 already: see docs/aiosmtpd.md). For ``auth_XXX``
        methods and ``handle_AUTH`` while they answer an AUTH command.
        """
        session = self._session
        aio = self.session
        if session is None or aio is None or not self._in_auth:
            raise RuntimeError(
                "challenge_auth() is for handle_AUTH and auth_XXX methods answering AUTH"
            )
        if self._auth_over:
            # The exchange already got its reply (the client cancelled, or sent what is not
            # base64): the client reads no more challenges.
            return MISSING
        data = challenge.encode() if isinstance(challenge, str) else challenge
        if not encode_to_b64:
            data = _challenge_bytes(data)
        log.debug("%r << challenge: %r", aio.peer, data)
        try:
            line = await session.sasl_challenge(data)
        except AuthCancelled:
            log.warning("%r aborted AUTH with '*'", aio.peer)
            return self._auth_ends(_AUTH_ABORTED)
        except SmtpError as error:  # a response line over RFC 4954's 12,288 octets
            return self._auth_ends(f"{error.code} {error.enhanced} {error.text}")
        except ConnectionError:
            # The client is gone: end the hook as aiosmtpd does (its task is cancelled).
            raise asyncio.CancelledError() from None
        if log_client_response:
            warnings.warn("AUTH interaction logging is enabled!", stacklevel=2)
            warnings.warn("Sensitive information might be leaked!", stacklevel=2)
            log.debug("%r >> %r", aio.peer, line)
        try:
            return base64.b64decode(line.strip(), validate=True)
        except ValueError:  # binascii.Error, or text that is not ASCII
            log.debug("%r can't decode base64: %r", aio.peer, line)
            return self._auth_ends(_AUTH_NOT_BASE64)

    def _auth_ends(self, status: str) -> _Missing:
        self._pushed.append(status)
        self._auth_over = True
        return MISSING

    def _authenticate(self, mechanism: str, auth_data: Any) -> Any:
        """The verdict on credentials a mechanism gathered: the ``authenticator``'s (an
        [`AuthResult`][alephsmtp.compat.aiosmtpd.smtp.AuthResult], or an awaitable of one), else the
        ``auth_callback``'s, as an [`AuthResult`][alephsmtp.compat.aiosmtpd.smtp.AuthResult]."""
        if self._authenticator is not None:
            assert self.session is not None and self.envelope is not None
            return self._authenticator(self, self.session, self.envelope, mechanism, auth_data)
        assert self._auth_callback is not None
        login, password = auth_data
        if self._auth_callback(mechanism, login, password):
            return AuthResult(success=True, handled=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> Any:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``, in the AUTH command or after an
        empty challenge; judged by `_authenticate()`."""
        if len(args) == 1:
            response = await self.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False)
        else:
            try:
                response = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push(_AUTH_NOT_BASE64)
                return AuthResult(success=False, handled=True)
        assert isinstance(response, bytes)
        parts = response.split(b"\x00")
        if len(parts) != 3:
            await self.push(_AUTH_NOT_SPLIT)
            return AuthResult(success=False, handled=True)
        _, login, password = parts  # the authorization identity is not used (as aiosmtpd)
        return self._authenticate("PLAIN", LoginPassword(login, password))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> Any:
        """draft-murchison-sasl-login: the user name (in the AUTH command, or asked with
        `AuthLoginUsernameChallenge`), then the password; judged by
        `_authenticate()`."""
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push(_AUTH_NOT_BASE64)
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return self._authenticate("LOGIN", LoginPassword(login, password))

    # --- the alephsmtp side -----------------------------------------------------------------

    def session_config(self, implicit_tls: ssl.SSLContext | None = None) -> SessionConfig:
        """The alephsmtp configuration these parameters make (shared by equal parameters).

        ``implicit_tls``: the context of a listener that is TLS from the first byte (a
        controller's ``ssl_context``); STARTTLS is then not offered.
        """
        key = (
            self.hostname,
            self.data_size_limit,
            self.line_length_limit,
            self._timeout_duration,
            self._decode_data,
            self.enable_SMTPUTF8,
            self._lmtp,
            implicit_tls or self.tls_context,
            self.require_starttls,
            self._mechanisms,
            self._auth_required,
            self._auth_require_tls,
        )
        config = _CONFIGS.get(key)
        if config is None:
            timeout = float(self._timeout_duration or 0)
            config = SessionConfig(
                hostname=self.hostname,
                max_message_size=self.data_size_limit or 0,
                max_text_line_length=self.line_length_limit,
                idle_timeout=timeout,
                data_timeout=timeout,
                # Hooks' replies go out as written, and nothing is added to them: aiosmtpd
                # does not offer ENHANCEDSTATUSCODES either (RFC 2034 then asks for none).
                enhanced_status_codes=False,
                # decode_data: aiosmtpd reads the message as text and offers no 8BITMIME.
                eightbitmime=not self._decode_data,
                smtputf8=self.enable_SMTPUTF8,
                lmtp=self._lmtp,
                tls_context=implicit_tls or self.tls_context,
                require_tls=bool(self.require_starttls),
                auth_mechanisms=self._mechanisms,
                auth_require=self._auth_required,
                auth_over_plaintext=not self._auth_require_tls,
            )
            if len(_CONFIGS) >= _CONFIGS_MAX:
                _CONFIGS.clear()
            _CONFIGS[key] = config
        return config

    def attach(self, session: SmtpSession) -> Awaitable[None] | None:
        """Serve ``session`` with this object's handler: an alephsmtp ``on_session``."""
        self._session = session
        self.loop = asyncio.get_running_loop()
        transport = session.transport
        self.transport = transport
        self.session = aio = self._create_session()
        # aiosmtpd's session.peer is the socket's peer: behind a proxy the proxy's (the client
        # the header names is in session.proxy_data), on a Unix socket its peer name ("").
        aio.peer = transport.get_extra_info("peername") if transport is not None else session.peer
        self._set_rset_state()
        self._tls_seen = session.tls is not None
        self._tls_okay = True
        if self._tls_seen:
            aio.ssl = ssl_details(transport)  # implicit TLS (RFC 8314)
        if self._call_limit_base is not None:
            default = self._call_limit_default
            self._call_limit = collections.defaultdict(lambda: default, self._call_limit_base)
        self._connect(session)
        if self._proxy_timeout is not None:
            return self._proxy_handshake(session)
        session.start_transaction(verbatim_reply(f"220 {self.hostname} {self.__ident__}"))
        return None

    def _connect(self, session: SmtpSession) -> None:
        hooks = self._handle_hooks
        any_hook = bool(hooks) or self._info.process_message is not None
        guarded = self._guarded
        session.helo += self._on_helo
        if self._lmtp:
            session.lhlo += self._on_ehlo
        else:
            session.ehlo += self._on_ehlo
        hello_hooked = "HELO" in hooks or "EHLO" in hooks
        if self._mail_hooked or hello_hooked or guarded:
            session.mail += self._on_mail
        if self._mail_hooked or self._rcpt_hooked or guarded:
            # With handle_MAIL the envelope is the hooks' alone: these see each transaction
            # begin (and catch up with one that ended without a reply of ours).
            session.rcpt += self._on_rcpt
            session.data += self._on_data
            session.bdat += self._on_data
        session.message_received += self._on_message
        if any_hook or guarded:
            session.rset += self._on_rset
        if "NOOP" in hooks or guarded:
            session.noop += self._on_noop
        if "QUIT" in hooks or guarded:
            session.quit += self._on_quit
        session.vrfy += self._on_vrfy
        session.expn += self._on_expn
        session.help += self._on_help
        session.unhandled_command += self._on_unknown
        if self._mechanisms:
            session.auth += self._on_auth
            if self._auth_table is not None:
                session.auth_command += self._on_auth_command

    def _proxy_handshake(self, session: SmtpSession) -> Awaitable[None] | None:
        header = session.proxy
        aio = self.session
        assert aio is not None
        hook = self._handle_hooks.get("PROXY")
        if header is None or hook is None:
            # aiosmtpd: without a handle_PROXY hook every connection is refused.
            log.info("%r rejected: no handle_PROXY hook", aio.peer)
            session.close()
            return None
        aio.proxy_data = data = proxy_data(header)
        try:
            result = hook(self, aio, self.envelope, data)
        except Exception:
            log.exception("%r handle_PROXY failed", aio.peer)
            session.close()
            return None
        if inspect.isawaitable(result):
            return self._proxy_decide_later(session, result)
        self._proxy_decide(session, result)
        return None

    async def _proxy_decide_later(self, session: SmtpSession, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Exception:
            log.exception("handle_PROXY failed")
            result = False
        self._proxy_decide(session, result)

    def _proxy_decide(self, session: SmtpSession, status: Any) -> None:
        if status is MISSING or not status:
            # Closed without a greeting, as aiosmtpd does.
            log.info("rejected by handle_PROXY")
            session.close()
            return
        session.start_transaction(verbatim_reply(f"220 {self.hostname} {self.__ident__}"))

    # --- as an asyncio protocol (loop.create_server(lambda: SMTP(handler), ...)) -------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = _bare_server(self.session_config(), self._proxy_timeout)
        # A session of that server (or first its PROXY receiver) takes the transport over:
        # the transport calls it directly from now on.
        protocol = server.protocol_factory(self.attach)()
        self._protocol = protocol
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:  # pragma: no cover - after set_protocol
        assert isinstance(self._protocol, asyncio.BufferedProtocol)
        return self._protocol.get_buffer(sizehint)  # type: ignore[return-value]

    def buffer_updated(self, nbytes: int) -> None:  # pragma: no cover - after set_protocol
        assert isinstance(self._protocol, asyncio.BufferedProtocol)
        self._protocol.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:  # pragma: no cover - after set_protocol
        assert isinstance(self._protocol, asyncio.BufferedProtocol)
        return self._protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:  # pragma: no cover
        if self._protocol is not None:
            self._protocol.connection_lost(exc)

    # --- running hooks ----------------------------------------------------------------------

    def _reply(self, status: Any) -> Reply:
        """A hook's status as the reply (after the lines it pushed), or a fault."""
        pushed = self._pushed
        try:
            if isinstance(status, (list, tuple)):  # handle_EHLO's list of lines
                status = "\r\n".join(status)
            if pushed:
                # Lines the hook pushed come first; a command method that only pushed
                # (returning None) has its reply in them.
                status = "\r\n".join(pushed if status is None else [*pushed, status])
                pushed.clear()
            return verbatim_reply(status)
        except (TypeError, ValueError) as error:
            pushed.clear()
            log.error("a hook answered %r, which is not a reply: %s", status, error)
            return _R_FAULT

    def _settle(self, status: Any, missing: Missing) -> Reply | None:
        if status is MISSING:
            self._pushed.clear()
            return missing() if missing is not None else None
        return self._reply(status)

    def _run(
        self, hook: Callable[..., Any], args: tuple[Any, ...], missing: Missing, inline: bool
    ) -> Any:
        """Call a hook; its reply, or an awaitable of it. ``missing()`` gives the default
        (and does the default's work) when the hook returns ``MISSING``; ``inline``: the hook
        is a coroutine function that cannot suspend."""
        try:
            result = _inline(hook(*args)) if inline else hook(*args)
        except Exception as error:
            return self._failure(error)
        if isinstance(result, str):
            return self._reply(result)
        if inspect.isawaitable(result):
            return self._run_async(result, missing)
        return self._settle(result, missing)

    async def _run_async(self, pending: Awaitable[Any], missing: Missing) -> Reply | None:
        try:
            status = await pending
        except Exception as error:
            failure = self._failure(error)
            return await failure if inspect.isawaitable(failure) else failure
        return self._settle(status, missing)

    def _failure(self, error: Exception) -> Reply | Awaitable[Reply]:
        """A hook raised: ``handle_exception``'s reply if the handler has one, else 451."""
        self._pushed.clear()
        hook = self._info.exception
        peer = self.session.peer if self.session is not None else None
        if hook is None:
            log.error("%r SMTP session exception", peer, exc_info=error)
            return _R_FAULT
        try:
            status = hook(error)
        except Exception:
            log.exception("%r exception in handle_exception()", peer)
            return _R_FAULT
        if inspect.isawaitable(status):
            return self._failure_later(status)
        return self._fault_reply(status)

    async def _failure_later(self, pending: Awaitable[Any]) -> Reply:
        try:
            status = await pending
        except Exception:
            log.exception("exception in handle_exception()")
            return _R_FAULT
        return self._fault_reply(status)

    def _fault_reply(self, status: Any) -> Reply:
        if status is None or status is MISSING:
            log.error("handle_exception() returned no status")
            return _R_FAULT
        return self._reply(status)

    def _guard(self, verb: str) -> Reply | None:
        """What applies to every command: the STARTTLS hook's verdict, require_starttls,
        command_call_limit. ``None`` when the command may be served."""
        session = self._session
        assert session is not None
        if session.tls is not None and not self._tls_seen:
            self._after_tls(session)
        if not self._tls_okay and verb != "QUIT":
            return _R_INSECURE
        if self.require_starttls and session.tls is None and verb not in ALLOWED_BEFORE_STARTTLS:
            return _R_STARTTLS_FIRST
        limits = self._call_limit
        if limits is not None:
            budget = limits[verb]
            if budget < 1:
                log.warning("%r over limit for %s", session.peer, verb)
                # RFC 5321 3.8: 421, then the connection closes (once the reply is out).
                asyncio.get_running_loop().call_soon(session.close)
                return Reply(421, "", f"4.7.0 {verb} sent too many times")
            limits[verb] = budget - 1
        if self._auth_gate and verb in _AUTH_GATED:
            aio = self.session
            if aio is not None and not aio.authenticated:
                return _R_AUTH_REQUIRED
        return None

    def _after_tls(self, session: SmtpSession) -> None:
        """The first command over TLS: a new Session (RFC 3207 4.2), then handle_STARTTLS."""
        self._tls_seen = True
        self.transport = session.transport
        previous = self.session
        self.session = aio = self._create_session()
        aio.peer = previous.peer if previous is not None else session.peer
        aio.ssl = ssl_details(session.transport)
        self._set_rset_state()
        hook = self._handle_hooks.get("STARTTLS")
        if hook is not None:
            try:
                self._tls_okay = bool(hook(self, aio, self.envelope))
            except Exception:
                log.exception("%r handle_STARTTLS failed", aio.peer)
                self._tls_okay = False

    def _envelope_of(self, transaction: SmtpEnvelope | None) -> Envelope:
        """The envelope of alephsmtp's current transaction, with what no hook keeps filled in
        from alephsmtp's own (aiosmtpd's defaults give the same values)."""
        if self._txn is not transaction:
            if self._txn is not None:
                # A transaction ended without a reply of ours (a refused message): aiosmtpd
                # starts a new envelope then too.
                self._set_post_data_state()
            self._txn = transaction
        envelope = self.envelope
        assert envelope is not None
        if transaction is not None:
            if not self._mail_hooked and envelope.mail_from is None:
                path = transaction.return_path
                envelope.mail_from = str(path) if path else "<>"
                envelope.mail_options = word_options(transaction.mail_parameters)
                envelope.smtp_utf8 = transaction.smtputf8
            if not self._rcpt_hooked:
                envelope.rcpt_tos = [str(address) for address in transaction.recipients]
                envelope.rcpt_options = [
                    option
                    for parameters in transaction.rcpt_parameters
                    for option in word_options(parameters)
                ]
        return envelope

    # --- the events -------------------------------------------------------------------------

    def _on_helo(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("HELO")) is not None:
            return refusal
        hostname = e.command.parameter
        self._set_rset_state()
        aio = self.session
        assert aio is not None
        aio.extended_smtp = False
        hook = self._handle_hooks.get("HELO")
        if hook is None:
            aio.host_name = hostname
            return None  # alephsmtp's "250 <hostname>", as aiosmtpd's

        def missing() -> None:
            aio.host_name = hostname

        return self._run(
            hook, (self, aio, self.envelope, hostname), missing, "HELO" in self._inline
        )

    def _on_ehlo(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        command = e.command
        if self._guarded and (refusal := self._guard(command.verb)) is not None:
            return refusal
        hostname = command.parameter
        self._set_rset_state()
        aio = self.session
        assert aio is not None
        aio.extended_smtp = True
        hook = self._handle_hooks.get("EHLO")
        if hook is None:
            aio.host_name = hostname
            return None  # alephsmtp's EHLO reply: the keywords of what it serves
        keywords: list[str] = getattr(e, "keywords", [])
        responses = [f"250-{self.hostname}", *(f"250-{keyword}" for keyword in keywords)]
        responses[-1] = "250 " + responses[-1][4:]
        if self._info.ehlo_old:
            # The deprecated 4-argument hook: the planned lines, then the hook's last one.
            self._pushed.extend(responses[:-1])
            return self._run(
                hook, (self, aio, self.envelope, hostname), None, "EHLO" in self._inline
            )
        # The hook returns the lines to send; the session lists ``e.keywords`` after the
        # first line (RFC 5321 4.1.1.1), so the hook's lines 2..n become those keywords.
        result = self._run(
            hook,
            (self, aio, self.envelope, hostname, responses),
            None,
            "EHLO" in self._inline,
        )
        if inspect.isawaitable(result):
            return self._keywords_later(result, keywords)
        return _keywords_from(result, keywords)

    async def _keywords_later(self, pending: Awaitable[Any], keywords: list[str]) -> Any:
        return _keywords_from(await pending, keywords)

    def _on_mail(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("MAIL")) is not None:
            return refusal
        aio = self.session
        assert aio is not None
        if not aio.host_name:
            return _R_HELO_FIRST  # a HELO/EHLO hook did not set session.host_name
        if self._txn is not None:
            self._set_post_data_state()  # the last transaction ended without a reply of ours
        envelope = self.envelope
        assert envelope is not None
        if envelope.mail_from:
            return _R_NESTED_MAIL  # handle_MAIL set mail_from but refused the command
        command = e.command
        path = command.return_path
        address = str(path) if path else "<>"
        options = word_options(command.parameters)
        envelope.smtp_utf8 = command.smtputf8
        hook = self._handle_hooks.get("MAIL")
        if hook is None:
            if self._mail_hooked:  # pragma: no cover - a hook set on the handler later
                envelope.mail_from = address
                envelope.mail_options.extend(options)
            return None

        def missing() -> None:
            envelope.mail_from = address
            envelope.mail_options.extend(options)

        return self._run(
            hook, (self, aio, envelope, address, options), missing, "MAIL" in self._inline
        )

    def _on_rcpt(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("RCPT")) is not None:
            return refusal
        aio = self.session
        assert aio is not None
        envelope = self._envelope_of(session.envelope)
        if not envelope.mail_from:
            return _R_NEED_MAIL  # handle_MAIL accepted but did not set envelope.mail_from
        hook = self._handle_hooks.get("RCPT")
        if hook is None:
            return None  # the recipients are alephsmtp's (filled in by _envelope_of)
        command = e.command
        address = str(command.recipient_address)
        options = word_options(command.parameters)

        def missing() -> None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)

        return self._run(
            hook, (self, aio, envelope, address, options), missing, "RCPT" in self._inline
        )

    def _on_data(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard(e.command.verb)) is not None:
            return refusal
        if not self._envelope_of(session.envelope).rcpt_tos:
            return _R_NEED_RCPT  # handle_RCPT accepted but appended no recipient
        return None

    def _on_message(self, session: SmtpSession, e: MessageReceivedEventArgs) -> Any:
        envelope = self._envelope_of(e.envelope)
        data = e.message
        envelope.original_content = data
        if self._decode_data:
            try:
                envelope.content = (
                    data.decode("utf-8", "surrogateescape")
                    if self.enable_SMTPUTF8
                    else data.decode("ascii")
                )
            except UnicodeDecodeError:
                self._set_post_data_state()
                return _R_STRICT_ASCII
        else:
            envelope.content = data
        hook = self._hook_data
        aio = self.session
        assert aio is not None
        legacy = False
        try:
            if hook is not None:
                result = (
                    _inline(hook(self, aio, envelope))
                    if self._data_inline
                    else hook(self, aio, envelope)
                )
            elif self._info.process_message is not None:
                # aiosmtpd's pre-1.0 API, where None means the default reply.
                legacy = True
                result = self._info.process_message(
                    aio.peer, envelope.mail_from, envelope.rcpt_tos, envelope.content
                )
            else:
                self._set_post_data_state()
                return _R_OK
        except Exception as error:
            self._set_post_data_state()
            return self._failure(error)
        if isinstance(result, str):
            self._set_post_data_state()
            return self._reply(result)
        if inspect.isawaitable(result):
            return self._message_later(result, legacy)
        self._set_post_data_state()
        return self._settle(MISSING if legacy and result is None else result, _ok)

    async def _message_later(self, pending: Awaitable[Any], legacy: bool) -> Reply | None:
        try:
            status = await pending
        except Exception as error:
            self._set_post_data_state()
            failure = self._failure(error)
            return await failure if inspect.isawaitable(failure) else failure
        self._set_post_data_state()
        return self._settle(MISSING if legacy and status is None else status, _ok)

    def _on_rset(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("RSET")) is not None:
            return refusal
        self._set_rset_state()
        hook = self._handle_hooks.get("RSET")
        if hook is None:
            return None
        return self._run(hook, (self, self.session, self.envelope), None, "RSET" in self._inline)

    def _on_noop(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("NOOP")) is not None:
            return refusal
        hook = self._handle_hooks.get("NOOP")
        if hook is None:
            return None
        args = (self, self.session, self.envelope, e.command.text or None)
        return self._run(hook, args, None, "NOOP" in self._inline)

    def _on_quit(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("QUIT")) is not None:
            return refusal
        hook = self._handle_hooks.get("QUIT")
        if hook is None:
            return None
        return self._run(hook, (self, self.session, self.envelope), None, "QUIT" in self._inline)

    def _on_vrfy(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("VRFY")) is not None:
            return refusal
        aio = self.session
        assert aio is not None
        if self._auth_required and not aio.authenticated:
            return _R_AUTH_REQUIRED
        argument = e.command.string
        address = _address(argument)
        if address is None:
            return Reply(502, "", f"Could not VRFY {argument}")
        hook = self._handle_hooks.get("VRFY")
        if hook is None:
            return None  # alephsmtp's 252, worded as aiosmtpd's
        return self._run(hook, (self, aio, self.envelope, address), None, "VRFY" in self._inline)

    def _on_expn(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("EXPN")) is not None:
            return refusal
        return _R_EXPN

    def _on_help(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        if self._guarded and (refusal := self._guard("HELP")) is not None:
            return refusal
        aio = self.session
        assert aio is not None
        if self._auth_required and not aio.authenticated:
            return _R_AUTH_REQUIRED
        table = self._class.syntax
        topic = e.command.topic.upper()
        # RFC 5321 4.2.3: 214 is HELP's reply (aiosmtpd answers 250).
        code = 214
        if topic:
            entry = table.get(topic)
            if entry is not None and self._listed(entry):
                text, extended, _ = entry
                if aio.extended_smtp and extended:
                    text += extended
                return Reply(214, "", f"Syntax: {text}")
            code = 501
        names = " ".join(sorted(verb for verb, entry in table.items() if self._listed(entry)))
        return Reply(code, "", f"Supported commands: {names}")

    def _listed(self, entry: tuple[str, str | None, str | None]) -> bool:
        when = entry[2]
        return when is None or bool(getattr(self, when, None))

    def _on_unknown(self, session: SmtpSession, e: CommandEventArgs[Any]) -> Any:
        verb = e.command.verb
        if self._guarded and (refusal := self._guard(verb)) is not None:
            return refusal
        name = self._class.commands.get(verb)
        if name is None:
            return Reply(500, "", f'Error: command "{verb}" not recognized')
        method = getattr(self, name)
        return self._run(method, (e.command.parameter or None,), None, False)

    def _on_auth(self, session: SmtpSession, e: AuthEventArgs) -> Any:
        """LOGIN or PLAIN, run by alephsmtp's session (RFC 4954 4; credentials decoded as
        UTF-8): judged by the authenticator or auth_callback."""
        if self._guarded and (refusal := self._guard("AUTH")) is not None:
            return refusal
        auth_data = LoginPassword(e.username.encode("utf-8"), (e.password or "").encode("utf-8"))
        try:
            result = self._authenticate(e.mechanism, auth_data)
        except Exception as error:
            return self._failure(error)
        if inspect.isawaitable(result):
            return self._auth_later(result)
        return self._auth_reply(self._auth_status(result))

    async def _auth_later(self, pending: Awaitable[Any]) -> Any:
        try:
            result = await pending
        except Exception as error:
            failure = self._failure(error)
            return await failure if inspect.isawaitable(failure) else failure
        return self._auth_reply(self._auth_status(result))

    def _on_auth_command(self, session: SmtpSession, e: AuthCommandEventArgs) -> Any:
        """AUTH as aiosmtpd runs it (``smtp_AUTH``), for programs with AUTH hooks of their
        own. alephsmtp checked the order, the syntax (501), TLS (538), a second AUTH (503) and
        the mechanism (504) before this."""
        if self._guarded and (refusal := self._guard("AUTH")) is not None:
            return refusal
        aio = self.session
        assert aio is not None
        if aio.authenticated:  # a hook set it without a 2xx reply
            return _R_AUTH_TWICE
        return self._auth_exchange(e)

    async def _auth_exchange(self, e: AuthCommandEventArgs) -> Reply:
        # aiosmtpd's args: the words after AUTH, as the client wrote them.
        args = e.command.parameter.split()
        mechanism = e.mechanism
        self._in_auth = True
        self._auth_over = False
        try:
            status: Any = MISSING
            hook = self._handle_hooks.get("AUTH")
            if hook is not None:
                status = hook(self, self.session, self.envelope, args)
                if inspect.isawaitable(status):
                    status = await status
            if status is MISSING:
                self._pushed.clear()  # as after any hook that leaves the default to the server
                assert self._auth_table is not None
                entry = self._auth_table.get(mechanism)
                if entry is None:  # pragma: no cover - the session offers the table's names only
                    return _R_AUTH_MECHANISM
                on_handler, attribute = entry
                method = getattr(self.event_handler if on_handler else self, attribute)
                result = method(self, args)
                # An awaitable result twice over: a built-in mechanism hands back what an
                # async authenticator returned, unawaited (aiosmtpd would take the
                # coroutine itself for a success).
                while inspect.isawaitable(result):
                    result = await result
                status = self._auth_status(result)
            reply = self._auth_reply(status)
        except Exception as error:
            failure = self._failure(error)
            return await failure if inspect.isawaitable(failure) else failure
        finally:
            self._in_auth = self._auth_over = False
        if reply.code // 100 == 2:
            # alephsmtp's session needs an identity to accept (session.authenticated_as).
            e.identity = self._identity(mechanism)
        return reply

    def _auth_status(self, result: Any) -> Any:
        """What aiosmtpd's smtp_AUTH makes of a mechanism's result: the status to send
        (``None``: the mechanism sent its own), with the session's fields set."""
        aio = self.session
        assert aio is not None
        if isinstance(result, AuthResult):
            if result.success:
                aio.authenticated = True
                aio.auth_data = result.auth_data
                aio._login_data = getattr(result.auth_data, "login", None)
                return result.message or _AUTH_SUCCESS
            if result.handled:
                return None
            return result.message or _AUTH_INVALID
        # aiosmtpd's older convention (a tri-state): None, the method answered; MISSING or
        # False, refused; anything else is who logged in. aiosmtpd leaves
        # session.authenticated unset then; the layer sets it, as the 235 says.
        if result is None:
            return None
        if result is MISSING or result is False:
            return _AUTH_INVALID
        aio.authenticated = True
        aio._login_data = result
        return _AUTH_SUCCESS

    def _auth_reply(self, status: Any) -> Reply:
        """The AUTH command's one reply: what was pushed, then the status."""
        pushed = self._pushed
        if status is None:
            if not pushed:
                # aiosmtpd sends nothing here and the client waits forever: every command
                # gets a reply (RFC 5321 4.2).
                return _R_AUTH_INVALID
            return self._reply(None)
        if pushed and _final(pushed[-1]):
            # What was pushed is a whole reply already (challenge_auth's 501 after "*"):
            # aiosmtpd would send the status as a second reply, which the client would take
            # for the answer to its next command.
            log.warning("AUTH answered %r after %r; not sent", status, pushed[-1])
            return self._reply(None)
        return self._reply(status)

    def _identity(self, mechanism: str) -> str:
        """Who logged in, for alephsmtp's session (``authenticated_as``): the login the
        hooks kept, else the mechanism's name (never the credentials themselves)."""
        aio = self.session
        assert aio is not None
        for value in (getattr(aio.auth_data, "login", None), aio._login_data):
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value is not None and str(value):
                return str(value)
        return mechanism


def _ok() -> Reply:
    return _R_OK


_CONFIGS: dict[tuple[Any, ...], SessionConfig] = {}
_CONFIGS_MAX = 32

# The servers of the bare asyncio path, never started: per event loop (a server's pools and
# sets are one loop's) and per configuration and PROXY timeout; the config is held with its
# server, so that its id is not reused while the entry lives.
_BareKey = tuple[int, float | None]
_BARE_SERVERS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[_BareKey, tuple[SessionConfig, SmtpServer]]
] = weakref.WeakKeyDictionary()


def _bare_server(config: SessionConfig, proxy_timeout: float | None) -> SmtpServer:
    """The server whose sessions serve ``loop.create_server(lambda: SMTP(handler))``."""
    loop = asyncio.get_running_loop()
    servers = _BARE_SERVERS.get(loop)
    if servers is None:
        servers = _BARE_SERVERS[loop] = {}
    key = (id(config), proxy_timeout)
    entry = servers.get(key)
    if entry is None:
        if len(servers) >= _CONFIGS_MAX:
            servers.clear()  # their sessions keep their server; new ones get a new one
        server = SmtpServer(
            config=config,
            proxy_protocol=proxy_timeout is not None,
            proxy_header_timeout=proxy_timeout or 10.0,
            proxy_trusted_networks=_ANY_NETWORK,
        )
        entry = servers[key] = (config, server)
    return entry[1]


def _address(argument: str) -> str | None:
    """VRFY's argument as aiosmtpd reads it: an addr-spec, bracketed or not; ``None`` when it
    does not parse."""
    address: Any
    try:
        if argument.lstrip().startswith("<"):
            address, _ = _header_parser.get_angle_addr(argument)
        else:
            address, _ = _header_parser.get_addr_spec(argument)
    except HeaderParseError:
        return None
    return str(address.addr_spec)
