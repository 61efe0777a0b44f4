"""One SMTP connection: an ``asyncio.BufferedProtocol`` that raises an event per command.

The session is the one I/O class; what it stands on has none. Bytes arrive in a pooled buffer
(``get_buffer`` / ``buffer_updated``) and go, in one call per read, to the reader of the mode the
session is in: the parsing core's ``LineReader`` for commands, its ``DataReader`` or ``BdatReader``
for a message. Each command line then takes one straight path, as go-smtp's ``handleRcpt`` does: the
protocol table (`_protocol`) says whether it may come now, the command is parsed
([`commands`][alephsmtp.commands]), its parameters checked ([`extensions`][alephsmtp.extensions]),
its event's handlers run ([`events.run_chain()`][alephsmtp.events.run_chain]), and the reply
written. A command with no handler takes its default reply without any event arguments being made.

Handlers may be plain functions (run inline, no task) or coroutines (the rest of the chain runs
in a task while reading pauses, so replies keep their order and memory stays bounded).

State is kept by lifetime: [`SessionConfig`][alephsmtp.config.SessionConfig] (shared by every
session of a server, with the rendered replies and buffer pools in ``_Pools``), the connection
(transport, peer, greeting exchange, TLS, AUTH, the input not yet answered) and the mail transaction
(`Transaction`, one assignment to start or drop).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import itertools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, final, overload

from . import _protocol as P
from . import replies as R
from ._auth_turn import AuthTurn
from ._protocol import RULES, UNKNOWN, Rule, State, advance
from .auth import MAX_RESPONSE_LENGTH, mechanism_known
from .commands import (
    UNAVAILABLE_VALUES as _UNAVAILABLE,
)
from .commands import (
    BdatCommand,
    DataCommand,
    EhloCommand,
    ExpnCommand,
    HeloCommand,
    HelpCommand,
    LhloCommand,
    MailCommand,
    NoopCommand,
    QuitCommand,
    RcptCommand,
    RsetCommand,
    SmtpCommand,
    StarttlsCommand,
    VrfyCommand,
    XclientCommand,
    XforwardCommand,
    parse_argument,
    parse_mail,
    parse_rcpt,
    xclient_address,
)
from .config import SessionConfig
from .deadlines import LazyTimer
from .envelope import SmtpEnvelope
from .errors import (
    BareCarriageReturn,
    BareLineFeed,
    CommandSyntaxError,
    LineTooLong,
    MessageTooLarge,
    SmtpError,
)
from .events import (
    DEFERRED,
    AuthCommandEventArgs,
    AuthEventArgs,
    CommandEventArgs,
    ConnectionLostEventArgs,
    EhloEventArgs,
    Event,
    EventArgs,
    HandlerErrorEventArgs,
    MessageChunkEventArgs,
    MessageDiscardedEventArgs,
    MessageReceivedEventArgs,
    Pending,
    run_all,
    run_chain,
)
from .extensions import check_mail_parameters, check_rcpt_parameters, ehlo_keywords
from .metrics import Metrics
from .parser import BdatReader, BufferPool, DataReader, LineReader, split_command
from .proxy import ProxyHeader, address_in_networks
from .replies import Reply, WireReplies, coerce_reply, default_enhanced_code
from .spool import MessageSpool
from .tls import HANDSHAKE_ERRORS, TlsInfo, describe, looks_like_tls, upgrade
from .tls import where as _where
from .transaction import Transaction

if TYPE_CHECKING:
    from .tracing import SessionTracer

__all__ = [
    "OnSession",
    "SessionConfig",
    "SessionKey",
    "SessionLogger",
    "SmtpSession",
    "State",
    "TlsInfo",
]

log = logging.getLogger("alephsmtp.session")
# The command/reply trace (DEBUG): every line each way, AUTH payloads redacted. Its own logger,
# so that it can be turned on alone.
trace_log = logging.getLogger("alephsmtp.trace")

OnSession = Callable[["SmtpSession"], Awaitable[None] | None]
ArgsT = TypeVar("ArgsT", bound=EventArgs)
T = TypeVar("T")
# What a command's "act" half takes: its context (the command, the envelope) and the reply
# (None: the default one).
Done = Callable[[Any, Any], None]

_session_ids = itertools.count(1)
_ANSWERS_MAX = 512  # handler answers kept rendered per server (their texts may vary)
_RATE_CHECK_PERIOD = 5.0  # seconds between data-rate checks while a message streams in
_LINGER = 2.0  # seconds a closed session reads (and drops) what the client still sends
# While a handler runs, what the client sends is read and held, not answered; reading pauses
# only once this much is held. Pausing and resuming costs two system calls per handler on
# asyncio, and most clients send nothing while they wait for a reply.
_HOLD_LIMIT = 64 << 10

_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")  # reply classes, by first digit
# Replies that count towards max_bad_commands: syntax, sequence, unknown (RFC 5321 4.2.2).
_BAD_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 555})
# Commands that move nothing forward: past max_junk_commands each counts as an error.
_JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
# RFC 2920 3.1: commands that must end a pipeline group (the client waits for their reply).
_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "STARTTLS"})

# Rules for what is not a command line: the message (DATA's or BDAT LAST's end), the finished
# SASL exchange. Their event, default, failure reply and timeout are the table's kind of fact.
_MESSAGE = Rule("DATA", "message_received", R.QUEUED, (), failure=R.MESSAGE_HANDLER_FAILED)
# Where MAIL, RCPT and DATA lead when accepted (the table says; read once).
_AFTER_MAIL = cast(State, RULES["MAIL"].next)
_AFTER_RCPT = cast(State, RULES["RCPT"].next)
_AFTER_DATA = cast(State, RULES["DATA"].next)
_AUTH = RULES["AUTH"]
_WAIT = DEFERRED  # a handler runs in a task: its "act" half comes later
_ASYNCIO_TIME = asyncio.BaseEventLoop.time


class _EventAttribute(Generic[ArgsT]):
    """A session's event, made on first use: a session nobody listens to carries none.

    ``session.helo += handler`` reads the event (making it), adds to it and assigns the same
    event back, which is all assignment may do.
    """

    __slots__ = ("name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, session: None, owner: type) -> _EventAttribute[ArgsT]: ...

    @overload
    def __get__(self, session: SmtpSession, owner: type) -> Event[ArgsT]: ...

    def __get__(
        self, session: SmtpSession | None, owner: type
    ) -> Event[ArgsT] | _EventAttribute[ArgsT]:
        if session is None:
            return self
        events = session._events
        event = events.get(self.name)
        if event is None:
            event = events[self.name] = Event(self.name)
        return event

    def __set__(self, session: SmtpSession, value: Event[ArgsT]) -> None:
        if value is not session._events.get(self.name):
            raise AttributeError(f"use += / -= / .connect to change {self.name}'s handlers")


class SessionLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the session's number and peer; adds both as extras.

    Only facts about the connection are logged: never a message body, never a credential.
    """

    def __init__(self, logger: logging.Logger, session: SmtpSession) -> None:
        super().__init__(logger, {})
        self.session = session

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        session = self.session
        where = _where(session.peer)
        kwargs.setdefault("extra", {}).update(smtp_session=session.id, smtp_peer=where)
        return f"session {session.id} [{where}] {msg}", kwargs


@final
class SessionKey(Generic[T]):
    """A typed key for state of your own on a session (the way aiohttp's ``AppKey`` is)::

        QUOTA = SessionKey("quota", int)

        def on_session(session):
            session[QUOTA] = 10          # a type checker checks the value...
            left = session[QUOTA] - 1    # ...and knows this is an int

    Keys are compared by identity: two modules may both name a key "quota" without meeting.
    ``session.get(key, default)``, ``key in session`` and ``del session[key]`` work too.
    """

    __slots__ = ("name", "type")

    def __init__(self, name: str, t: type[T] | None = None) -> None:
        self.name = name
        self.type = t  # for the reader and the repr; not enforced

    def __repr__(self) -> str:
        kind = getattr(self.type, "__qualname__", None) or repr(self.type)
        return f"<SessionKey {self.name!r}: {kind}>"


class _Pools:
    """What a server's sessions share: the buffer pools (small for commands, large for a
    message), the fixed replies as written, the handlers' answers as written, the metrics,
    the OpenTelemetry tracer ([`alephsmtp.tracing`][alephsmtp.tracing]; None: no tracing)."""

    __slots__ = (
        "answers",
        "command",
        "data",
        "ehlo",
        "hello",
        "keywords",
        "metrics",
        "tracer",
        "wire",
        "xclient",
        "xforward",
    )

    def __init__(self, config: SessionConfig, metrics: Metrics | None = None) -> None:
        self.command = BufferPool(config.command_buffer_size, 64)
        self.data = BufferPool(config.data_buffer_size, 16)
        self.wire = WireReplies(config.enhanced_status_codes)
        self.hello = Reply(250, "", config.hostname)  # HELO/EHLO's default first line
        # (verb, a handler's answer) -> the Reply sent; EHLO replies by what they list.
        self.answers: dict[tuple[str, object], Reply] = {}
        self.ehlo: dict[tuple[str, ...], bytes] = {}
        self.keywords: dict[tuple[bool, tuple[str, ...], bool, bool], tuple[str, ...]] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        # The clients that may send XCLIENT / XFORWARD (none: the commands are unknown).
        self.xclient = [ipaddress.ip_network(n, strict=False) for n in config.xclient_networks]
        self.xforward = [ipaddress.ip_network(n, strict=False) for n in config.xforward_networks]
        self.tracer: SessionTracer | None = None


def _message_error_reply(error: SmtpError) -> Reply:
    """The reply to a message refused while it was read (after its end, so in sync)."""
    if isinstance(error, MessageTooLarge):
        return R.TOO_BIG
    if isinstance(error, (BareLineFeed, BareCarriageReturn)):
        return R.DATA_BARE
    if isinstance(error, LineTooLong):
        return R.DATA_LINE
    return _error_reply(error)


_error_reply = R.from_error  # an error carries its reply (code, enhanced code, text)


class SmtpSession(asyncio.BufferedProtocol):
    """One client connection, with one [`Event`][alephsmtp.events.Event] per command.

    ``session.helo += handler``; a handler ``handler(session, e)`` returns the reply (see
    [`alephsmtp.events`][alephsmtp.events]). ``start_transaction(greeting)`` sends the greeting and
    starts reading; if the server's ``on_session`` returns without calling it, the session starts
    with the configured greeting.

    Events (each an [`Event`][alephsmtp.events.Event]): one per command — ``helo``, ``ehlo``,
    ``lhlo``, ``mail``, ``rcpt``, ``data``, ``bdat``, ``rset``, ``noop``, ``quit``, ``vrfy``,
    ``expn``, ``help``, ``starttls``, ``auth`` (and ``auth_command``), ``xclient``,
    ``xforward``, ``unhandled_command`` (any other verb) — and per moment:
    ``message_chunk``, ``message_received``, ``message_discarded``, ``close_requested``,
    ``disconnected``, ``handler_error``.

    Attributes: ``id``, ``peer`` (the client, or the one a PROXY header or XCLIENT named),
    ``proxy`` (the PROXY header), ``xclient_attributes`` (what XCLIENT said), ``config``,
    ``state``, ``helo_name``, ``esmtp``, ``tls`` ([`TlsInfo`][alephsmtp.tls.TlsInfo] once TLS is
    up), ``authenticated_as`` and ``auth_mechanism`` (after AUTH), ``envelope`` (the open
    transaction's), ``log``; state of your own under a [`SessionKey`][alephsmtp.session.SessionKey]
    (``session[key]``), or any attribute (``session.user = ...``).
    """

    # --- events (made on first use; see _EventAttribute) ------------------------------------
    helo = _EventAttribute[CommandEventArgs[HeloCommand]]()
    ehlo = _EventAttribute[EhloEventArgs[EhloCommand]]()
    lhlo = _EventAttribute[EhloEventArgs[LhloCommand]]()
    mail = _EventAttribute[CommandEventArgs[MailCommand]]()
    rcpt = _EventAttribute[CommandEventArgs[RcptCommand]]()
    data = _EventAttribute[CommandEventArgs[DataCommand]]()
    bdat = _EventAttribute[CommandEventArgs[BdatCommand]]()
    rset = _EventAttribute[CommandEventArgs[RsetCommand]]()
    noop = _EventAttribute[CommandEventArgs[NoopCommand]]()
    quit = _EventAttribute[CommandEventArgs[QuitCommand]]()
    vrfy = _EventAttribute[CommandEventArgs[VrfyCommand]]()
    expn = _EventAttribute[CommandEventArgs[ExpnCommand]]()
    help = _EventAttribute[CommandEventArgs[HelpCommand]]()
    starttls = _EventAttribute[CommandEventArgs[StarttlsCommand]]()
    auth = _EventAttribute[AuthEventArgs]()
    auth_command = _EventAttribute[AuthCommandEventArgs]()
    message_chunk = _EventAttribute[MessageChunkEventArgs]()
    message_received = _EventAttribute[MessageReceivedEventArgs]()
    message_discarded = _EventAttribute[MessageDiscardedEventArgs]()
    close_requested = _EventAttribute[EventArgs]()
    unhandled_command = _EventAttribute[CommandEventArgs[SmtpCommand]]()
    disconnected = _EventAttribute[ConnectionLostEventArgs]()
    handler_error = _EventAttribute[HandlerErrorEventArgs]()
    xclient = _EventAttribute[CommandEventArgs[XclientCommand]]()
    xforward = _EventAttribute[CommandEventArgs[XforwardCommand]]()

    __slots__ = (
        "__dict__",  # for attributes of your own (made only when you set one)
        "_admit",
        "_auth_failures",
        "_auth_turn",
        "_bad_commands",
        "_buffer",
        "_buffer_owner",
        "_busy",
        "_chunk",
        "_chunk_refusal",
        "_clock",
        "_closing",
        "_command_limit",
        "_commands",
        "_ended",
        "_events",
        "_greeting",
        "_handler_deadline",
        "_handler_task",
        "_handler_timed_out",
        "_held",
        "_input",
        "_junk_commands",
        "_last_activity",
        "_limit_reply",
        "_line",
        "_lines",
        "_linger_timer",
        "_log",
        "_log_outcomes",
        "_loop",
        "_next",
        "_on_close",
        "_on_session",
        "_origin",
        "_out",
        "_peer_override",
        "_pools",
        "_reader",
        "_reading",
        "_repoint",
        "_started",
        "_state",
        "_tasks",
        "_timer",
        "_trace",
        "_transactions",
        "_transport",
        "_tx",
        "_verb",
        "_view",
        "_wire",
        "_write_paused",
        "_write_timer",
        "_xforward",
        "auth_mechanism",
        "authenticated_as",
        "config",
        "esmtp",
        "helo_name",
        "id",
        "peer",
        "proxy",
        "state",
        "tls",
        "xclient_attributes",
    )

    def __init__(
        self,
        config: SessionConfig,
        on_session: OnSession | None = None,
        *,
        pools: _Pools | None = None,
        on_close: Callable[[SmtpSession], None] | None = None,
        admit: Callable[[SmtpSession], Reply | None] | None = None,
        repoint: Callable[[SmtpSession], Reply | None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        peer: Any = None,
        proxy: ProxyHeader | None = None,
    ) -> None:
        self.config = config
        self._pools = pools = pools if pools is not None else _Pools(config)
        self._wire = pools.wire
        self._admit = admit
        self._repoint = repoint  # the server's per-address count, told of XCLIENT's client
        self._on_session = on_session
        self._on_close = on_close
        self.id = next(_session_ids)
        self._events: dict[str, Event[Any]] = {}
        # the connection
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = loop  # tests pass a fake clock
        # The client: the socket's peer, or the one a PROXY protocol header named.
        self.peer: Any = peer
        self._peer_override = peer is not None
        self._origin: Any = peer  # the peer at connect: what XCLIENT/XFORWARD trust is of
        #: What a trusted proxy said of the client with XCLIENT (NAME, ADDR, ...), if it did.
        self.xclient_attributes: dict[str, str] = {}
        self._xforward: dict[str, str] = {}  # XFORWARD's attributes for the next transaction
        self._greeting: Reply | None = None  # the 220 sent (and sent again after XCLIENT)
        self.proxy = proxy  # the PROXY protocol header (with its TLVs), if any
        self._log: SessionLogger | None = None
        self.state = State.GREETING
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls: TlsInfo | None = None  # set once TLS is up (STARTTLS or implicit)
        self.authenticated_as: str | None = None  # the AUTH identity, once accepted
        self.auth_mechanism: str | None = None  # the SASL mechanism it was accepted with
        # input
        self._buffer: bytearray | None = None
        self._view: memoryview | None = None
        self._buffer_owner: BufferPool = pools.command
        # The reader's limit is the longest line any state may take (an AUTH exchange's,
        # RFC 4954 4, when AUTH may be offered); command lines are held to their own limit
        # below. A limit that changed with the state would apply to lines already scanned,
        # and so depend on how the client's bytes happened to be split.
        self._command_limit = config.command_line_limit
        self._reader = LineReader(
            max(self._command_limit, MAX_RESPONSE_LENGTH)
            if config.auth_mechanisms
            else self._command_limit,
            config.bare_newline,
        )
        # The inbox: lines scanned and not answered yet (from _next on), and bytes not scanned
        # yet (read while a handler runs or before the greeting, left after a message or a
        # chunk, or after DATA/BDAT/STARTTLS, which change how what follows is read). The
        # LineReader itself only ever holds the start of a line still incomplete.
        self._lines: list[bytes | SmtpError] = []
        self._next = 0
        self._held = bytearray()
        #: The reader of a message or a chunk while one is read (None: command lines).
        self._input: DataReader | BdatReader | None = None
        self._chunk: BdatCommand | None = None  # the BDAT chunk being read ...
        self._chunk_refusal: Reply | None = None  # ... and its reply, if it is dropped
        self._auth_turn: AuthTurn | None = None  # an AUTH command, until its reply
        # output and flow
        self._out: list[bytes] = []
        self._busy = False  # a handler (or the TLS handshake) runs: nothing more is read
        self._write_paused = False
        self._reading = True
        self._started = False
        self._closing = False  # graceful shutdown asked for
        self._ended = False  # the connection is gone and everything released
        self._tasks: set[asyncio.Task[None]] | None = None
        # clocks (see _on_timer)
        self._timer: LazyTimer | None = None
        self._clock: Callable[[], float] = time.monotonic  # the loop's (connection_made)
        self._last_activity = 0.0
        self._handler_task: asyncio.Task[None] | None = None
        self._handler_deadline = 0.0  # 0: no handler runs on a clock
        self._handler_timed_out = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        # counters and limits
        self._bad_commands = 0
        self._junk_commands = 0
        self._auth_failures = 0
        self._commands = 0
        self._transactions = 0
        self._limit_reply: Reply | None = None  # a limit was passed: say it and close
        self._tx: Transaction | None = None
        self._verb = ""  # the command being answered (for the metrics); "" for none
        self._line = b""  # the command line being answered (for the log of a refusal)
        # What the log wants, asked once per connection (a level change applies to the next):
        # the trace of every line, the INFO line per message.
        self._trace: SessionLogger | None = None
        self._log_outcomes = False
        self._state: dict[SessionKey[Any], Any] | None = None  # session[key], made on first use

    def __repr__(self) -> str:
        return f"<SmtpSession #{self.id} {self.peer!r} {self.state.name.lower()}>"

    @property
    def log(self) -> SessionLogger:
        """This session's logger: every record names the session and the peer."""
        if self._log is None:
            self._log = SessionLogger(log, self)
        return self._log

    def _handlers(self, name: str) -> tuple[Any, ...]:
        event = self._events.get(name)
        return event.handlers if event is not None else ()

    # --- the public surface ------------------------------------------------------------------

    def __getitem__(self, key: SessionKey[T]) -> T:
        """Your state under ``key`` (a [`SessionKey`][alephsmtp.session.SessionKey]); ``KeyError``
        when none was set."""
        if self._state is None:
            raise KeyError(key)
        return cast(T, self._state[key])

    def __setitem__(self, key: SessionKey[T], value: T) -> None:
        if self._state is None:
            self._state = {}
        self._state[key] = value

    def __delitem__(self, key: SessionKey[Any]) -> None:
        if self._state is None:
            raise KeyError(key)
        del self._state[key]

    def __contains__(self, key: object) -> bool:
        return self._state is not None and key in self._state

    def get(self, key: SessionKey[T], default: T | None = None) -> T | None:
        """Your state under ``key``, or ``default``."""
        if self._state is None:
            return default
        return cast("T | None", self._state.get(key, default))

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport (``None`` once closed)."""
        return self._transport

    @property
    def envelope(self) -> SmtpEnvelope | None:
        """The open transaction's envelope (from an accepted MAIL to the reply to its
        message), else ``None``."""
        tx = self._tx
        return tx.envelope if tx is not None else None

    @property
    def lmtp(self) -> bool:
        """Whether this session speaks LMTP (RFC 2033)."""
        return self.config.lmtp

    @property
    def is_idle(self) -> bool:
        """No transaction open and no handler running."""
        return not self._busy and self.state <= State.READY

    def start_transaction(self, greeting: Reply | str | None = None) -> None:
        """Send the greeting (RFC 5321 4.3.1: 220) and start reading commands.

        Any other greeting (``554 ...``, RFC 5321 3.1) refuses the session: it is sent and the
        connection closes.
        """
        if self._started or self._transport is None:
            return
        self._started = True
        if greeting is None:
            greeting = self.config.greeting or f"220 {self.config.hostname} ESMTP alephsmtp"
        reply = coerce_reply(greeting) if isinstance(greeting, str) else greeting
        self._write(reply)  # an enhanced code only if the greeting's author wrote one
        self._flush()
        if reply.code != 220:
            self.close()
            return
        self.state = advance(self.state, P.GREETED)
        self._greeting = reply
        self._arm_idle_timer()
        self._update_reading()
        if self._held:  # sent before the greeting (after a TLS handshake): read now
            self._run()

    def close(self) -> None:
        """Close the connection once what was written has been sent (the seed's Dispose).

        When the client sent more than was answered, the close lingers: our side of the
        connection is shut (FIN) and what the client still sends is read and dropped for a
        moment, so that a client that pipelined more commands still reads its last reply (a
        close with unread input resets the connection, and a reset discards the reply from
        the client's buffer). A client that does not read what is left gets
        ``write_timeout`` seconds to take it; then the connection is aborted.
        """
        self.state = advance(self.state, P.CLOSED)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        unread = self._next < len(self._lines) or self._held or self._reader.pending
        if (
            unread
            and self._linger_timer is None
            and _can_write_eof(transport)
            and self._loop is not None
        ):
            try:
                transport.write_eof()
            except OSError:  # the client is gone already (reset): nothing to linger for
                transport.close()
                return
            self._linger_timer = self._loop.call_later(_LINGER, self._end_linger)
            self._reading = True  # what comes now is read and dropped (_receive)
            transport.resume_reading()
        else:
            transport.close()
        if transport.get_write_buffer_size():
            self._start_write_clock()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self.state = advance(self.state, P.CLOSED)
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """Ask the session to end for a server shutdown (421 4.3.2, RFC 5321 3.8).

        A session between transactions is told and closed now; one in the middle of a
        transaction finishes it (the client gets its reply to DATA) and is closed after it.
        """
        self._closing = True
        if self.is_idle:
            self._send_and_close(R.SHUTDOWN)

    # --- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._timer = LazyTimer(loop, self._on_timer)
        # The loop's clock; asyncio's own loop.time() is time.monotonic() behind a Python call.
        self._clock = time.monotonic if type(loop).time is _ASYNCIO_TIME else loop.time
        if not self._peer_override:
            # A Unix-domain client has no name (""): the socket it came in on names it.
            self.peer = self._origin = transport.get_extra_info(
                "peername"
            ) or transport.get_extra_info("sockname")
        if transport.get_extra_info("ssl_object") is not None:
            self.tls = TlsInfo.of(transport)  # implicit TLS (RFC 8314)
            self._pools.metrics.tls_sessions[self.tls.version or "unknown"] += 1
        self._last_activity = loop.time()
        # Nothing is read before the greeting (RFC 5321 3.1). A greeting sent from here, the
        # usual case, comes before the transport's first read; only an asynchronous
        # ``on_session`` needs reading paused (which costs a system call or two on asyncio).
        if trace_log.isEnabledFor(logging.DEBUG):
            self._trace = SessionLogger(trace_log, self)
        self._log_outcomes = log.isEnabledFor(logging.INFO)
        if log.isEnabledFor(logging.DEBUG):  # the session's logger is made on first use
            self.log.debug("connected")
        self._pools.metrics.connection_opened()
        if self._pools.tracer is not None:  # a span per session (alephsmtp.tracing)
            self._pools.tracer.session_started(self)
        refusal = self._admit(self) if self._admit is not None else None
        if refusal is not None:
            # Over a connection limit: say so before the greeting and close (RFC 5321 3.1).
            self.log.info("refused: %s", refusal)
            self._started = True
            self._send_and_close(refusal)
            return
        on_session = self._on_session
        if on_session is None:
            self.start_transaction()
            return
        try:
            result = on_session(self)
        except Exception:
            self.log.exception("on_session handler failed")
            self._send_and_close(R.UNAVAILABLE)
            return
        if inspect.isawaitable(result):
            self._set_reading(False)
            self._spawn(self._start_after(result))
        else:
            self.start_transaction()

    async def _start_after(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            self.log.exception("on_session handler failed")
            self._send_and_close(R.UNAVAILABLE)
            return
        self.start_transaction()

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._view
        if view is None:
            # Small buffers for commands, large ones while a message streams in.
            self._buffer_owner = (
                self._pools.data if self._input is not None else self._pools.command
            )
            self._buffer = self._buffer_owner.acquire()
            # A memoryview, not the bytearray: asyncio's TLS layer fills the buffer in
            # several reads through slices of it, and a bytearray slice would be a copy.
            view = self._view = memoryview(self._buffer)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """One read: to the reader of the mode, then answer what it completed."""
        view, buffer, owner = self._view, self._buffer, self._buffer_owner
        assert view is not None and buffer is not None
        # The buffer goes back to the pool right after this read: an idle session holds no
        # read buffer at all, only the few bytes of an incomplete line. It is taken out of
        # the session first: closing from inside may make the TLS layer ask for a new one.
        self._view = self._buffer = None
        # Only the slice is released here: uvloop still holds an export of ``view`` until
        # this method returns (releasing it would raise BufferError there).
        try:
            with view[:nbytes] as data:
                if self._busy or not self._started or self.state is State.CLOSED:
                    # Held while a handler (or TLS) runs, and before the greeting: read
                    # then (bounded: reading pauses past _HOLD_LIMIT). After the close
                    # (lingering), dropped.
                    if self.state is not State.CLOSED:
                        self._held += data
                        if len(self._held) > _HOLD_LIMIT:
                            self._set_reading(False)
                    return
                reader = self._input
                if reader is None:
                    lines = self._reader.feed(data)
                    if lines:
                        if self._next < len(self._lines):
                            self._lines.extend(lines)
                        else:
                            self._lines = lines
                            self._next = 0
                        self._run()
                    return
                # In a message the data timeout runs between reads (RFC 5321 4.5.3.2.5);
                # a command line must be whole within idle_timeout of when it was awaited.
                assert self._loop is not None
                self._last_activity = self._loop.time()
                tx = self._tx
                if tx is not None:
                    tx.bytes_read += len(data)
                if type(reader) is DataReader:
                    self._feed_message(reader, data)
                else:
                    self._feed_chunk(cast(BdatReader, reader), data)
                if self._input is not None and tx is not None and not tx.clocked:
                    self._arm_message_timer(tx)  # longer than a read: its clocks run
                self._run()
        finally:
            owner.release(buffer)

    def eof_received(self) -> bool | None:
        if self._linger_timer is not None:  # lingering after our close: the client is done
            self._linger_timer.cancel()
            self._linger_timer = None
        self._release_buffer()
        # A half-closed client reads no more replies; a partial message is dropped (never
        # delivered), and the connection closes.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        """The connection is gone: release what the session holds, tell the handlers and the
        server. Runs once, from ``connection_lost`` or from a failed TLS upgrade (whose
        connection never reaches ``connection_lost``: the TLS layer never adopted us)."""
        if self._ended:
            return
        self._ended = True
        self._release_buffer()
        self._pools.metrics.connection_closed()
        if self._pools.tracer is not None:  # ends its spans (the transaction's, if open)
            self._pools.tracer.session_ended(self)
        if self._timer is not None:
            self._timer.cancel()
        self._stop_write_clock()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        tx = self._tx
        partial = self._input is not None or self.state is State.BDAT
        self.state = advance(self.state, P.CLOSED)
        self._transport = None
        self._input = None
        if self._auth_turn is not None:
            self._auth_turn.cancel()
            self._auth_turn = None
        self._tx = None
        self._lines = []
        self._next = 0
        self._reader.take_pending()
        self._held.clear()
        if tx is not None:
            tx.discard()
        if partial:
            self.log.info("connection lost during a message; discarded")
            self._pools.metrics.messages_discarded += 1
            if tx is not None and self._handlers("message_chunk"):
                self._notify("message_discarded", MessageDiscardedEventArgs(tx.envelope, None))
        if log.isEnabledFor(logging.DEBUG):
            self.log.debug("connection lost (%s)", exc or "closed")
        if self._handlers("disconnected"):
            self._notify("disconnected", ConnectionLostEventArgs(exc))
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands until it does, and
        # give it write_timeout seconds to start again.
        self._write_paused = True
        self._update_reading()
        self._start_write_clock()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._stop_write_clock()
        self._update_reading()

    # --- reading ----------------------------------------------------------------------------

    def _release_buffer(self) -> None:
        self._view = None  # not released: the event loop may still hold an export of it
        if self._buffer is not None:
            self._buffer_owner.release(self._buffer)
            self._buffer = None

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading or self._transport is None:
            return
        self._reading = reading
        if self._transport.is_closing():
            return
        if reading:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()

    def _update_reading(self) -> None:
        self._set_reading(
            self._started
            and not self._busy
            and not self._write_paused
            and self.state is not State.CLOSED
        )

    def _consume(self, data: bytes) -> None:
        """Bytes from the inbox: to the reader of the mode (nothing is answered here)."""
        reader = self._input
        if reader is None:
            self._lines.extend(self._reader.feed(data))
        elif type(reader) is DataReader:
            if self._tx is not None:
                self._tx.bytes_read += len(data)
            self._feed_message(reader, data)
        else:
            if self._tx is not None:
                self._tx.bytes_read += len(data)
            self._feed_chunk(cast(BdatReader, reader), data)

    def _requeue(self, data: bytes) -> None:
        """What followed a message or a chunk: commands, answered after its reply."""
        if self._busy:
            self._held += data
        else:
            self._lines.extend(self._reader.feed(data))

    def _run(self) -> None:
        """Answer every command line of the inbox, in order, until one must wait.

        The read loop: each line takes one straight path (order, parse, handlers, reply) in
        the method the protocol table names for its verb.
        """
        assert self._loop is not None
        while not self._busy and self.state is not State.CLOSED:
            if self._limit_reply is not None:
                self.log.info("closing: %s", self._limit_reply)
                if self._limit_reply is R.TOO_MANY_ERRORS:
                    self._pools.metrics.closed_for_errors += 1
                self._send_and_close(self._limit_reply)
                break
            lines = self._lines
            index = self._next
            if index < len(lines):
                line = lines[index]
                self._next = index + 1
                self._last_activity = self._clock()  # the next line's deadline runs from here
                if self._trace is not None:
                    self._trace_line(line)
                turn = self._auth_turn
                if turn is not None and turn.reading:  # a response to an AUTH challenge
                    turn.line(line)
                    continue
                self._commands += 1
                if self.config.max_commands and self._commands > self.config.max_commands:
                    self._limit_reply = R.TOO_MANY_COMMANDS
                    continue
                if type(line) is not bytes:
                    self._write(_error_reply(cast(SmtpError, line)))
                    continue
                if len(line) + 2 > self._command_limit and line[:5].upper() != b"AUTH ":
                    # RFC 5321 4.5.3.1.4 (an AUTH line may be longer: RFC 4954 4).
                    self._write(R.LINE_TOO_LONG)
                    continue
                if line[:1] == b" ":
                    # RFC 5321 4.1.1: a command line starts with its verb (a leading space
                    # would let a DATA/BDAT slip past the line reader's stop rule).
                    self._write(R.BAD_SYNTAX)
                    continue
                self._line = line
                verb, argument = split_command(line)
                entry = _DISPATCH.get(verb)
                if entry is None:
                    self._verb = "other"
                    self._unknown(verb, argument)
                else:
                    rule, act = entry
                    self._verb = rule.verb
                    if (
                        self.config.forbid_unauth_pipelining
                        and verb in _LAST_IN_GROUP_BYTES
                        and self.authenticated_as is None
                        and (self._next < len(self._lines) or self._reader.pending or self._held)
                    ):
                        self.log.info("%s with more input behind it: closing", rule.verb)
                        self._send_and_close(R.OUT_OF_SYNC)
                        break
                    act(self, rule, argument)
                continue
            if self._held:
                held = bytes(self._held)
                self._held.clear()
                self._consume(held)
                continue
            if (
                self._input is None
                and self._reader.pending
                and (self._auth_turn is None or not self._auth_turn.exchanging)
            ):
                # Scanning stopped after DATA/BDAT/STARTTLS (a command that may change how
                # what follows is read); it was answered without that change, so go on.
                more = self._reader.feed(b"")
                if not more:
                    break
                self._lines = more
                self._next = 0
                continue
            break
        if not self._busy:
            self._verb = ""
        if self._out:
            self._flush()
        if self._closing and self.is_idle and self.state is not State.CLOSED:
            self._send_and_close(R.SHUTDOWN)

    # --- the commands: one "check" and one "act" each ---------------------------------------

    def _parse(self, rule: Rule, verb: bytes, argument: bytes) -> Any:
        """The command, or ``None`` when it got its refusal (out of order: 503 before syntax
        is judged; then syntax)."""
        refusal = rule.order[self.state]
        if refusal is not None:
            self._write(refusal)
            return None
        if not argument:
            bare = _BARE_COMMANDS.get(verb)  # DATA, RSET, NOOP, QUIT...: one instance each
            if bare is not None:
                return bare
        try:
            return parse_argument(verb, argument)
        except CommandSyntaxError as error:
            self._write(_error_reply(error))
            return None

    def _decide(
        self, rule: Rule, handlers: tuple[Any, ...], args: Any, done: Done, context: Any
    ) -> Any:
        """Run the handlers of a command; its reply (``None``: the default), or ``_WAIT`` when
        a handler went asynchronous (``done(context, reply)`` follows, from the task).

        With ``measure_latency`` the handlers are timed for the metrics (until their task is
        done, when they went asynchronous).
        """
        started = self._loop.time() if self.config.measure_latency and self._loop else 0.0
        try:
            result = run_chain(handlers, self, args)
            if type(result) is Pending:
                self._await(result, rule, done, context, started=started)
                return _WAIT
            if started:
                self._handlers_took(rule, started)
            if result is None:
                return None
            return self._answer(result, rule)
        except Exception as error:
            answer = self._failure(rule.event, error, rule.failure)
            if type(answer) is Pending:
                self._await(answer, rule, done, context, failed=True)
                return _WAIT
            return self._checked_failure(answer, rule)

    def _handlers_took(self, rule: Rule, started: float) -> None:
        assert self._loop is not None
        self._pools.metrics.handler_done(rule.event, self._loop.time() - started)

    # HELO / EHLO / LHLO (RFC 5321 4.1.1.1; RFC 2033 4.1)

    def _hello(self, rule: Rule, argument: bytes) -> None:
        try:
            command = parse_argument(rule.key, argument)
        except CommandSyntaxError as error:
            self._write(_error_reply(error))
            return
        lhlo = rule.verb == "LHLO"
        # RFC 2033 4.1: an LMTP server answers LHLO, never HELO/EHLO; and the reverse.
        if self.config.lmtp != lhlo:
            self._write(R.NOT_SMTP if lhlo else R.NOT_LMTP)
            return
        esmtp = rule.verb != "HELO"
        keywords = self._keywords() if esmtp else []
        event = self._events.get(rule.event)
        reply = None
        if event is not None and event.handlers:
            args = EhloEventArgs(command, keywords=keywords) if esmtp else CommandEventArgs(command)
            context = (command, keywords)
            reply = self._decide(rule, event.handlers, args, self._hello_done, context)
            if reply is _WAIT:
                return
        self._hello_done((command, keywords), reply)

    def _keywords(self) -> list[str]:
        """The EHLO keywords for what this session serves now (a fresh list: handlers may
        edit it), made once per server for each of the few combinations."""
        starttls = self.config.tls_context is not None and self.tls is None
        mechanisms = self._mechanisms()
        pools = self._pools
        xclient = bool(pools.xclient) and self._trusted(pools.xclient)
        xforward = bool(pools.xforward) and self._trusted(pools.xforward)
        key = (starttls, mechanisms, xclient, xforward)
        known = pools.keywords.get(key)
        if known is None:
            known = pools.keywords[key] = tuple(
                ehlo_keywords(
                    self.config,
                    starttls=starttls,
                    auth=mechanisms,
                    xclient=xclient,
                    xforward=xforward,
                )
            )
        return list(known)

    def _hello_done(self, context: tuple[Any, list[str]], reply: Reply | None) -> None:
        command, keywords = context
        verb = command.verb
        accepted = reply is None or reply.code // 100 == 2
        if accepted:
            # RFC 5321 4.1.4: HELO/EHLO resets the transaction. The EHLO reply lists the
            # keywords (the extensions this session serves, as handlers left them) after the
            # handler's first line, or the hostname (4.1.1.1).
            self._abandon_transaction()
            self._xforward = {}
            self.helo_name = command.client_hostname
            self.esmtp = verb != "HELO"
        self.state = advance(self.state, verb, accepted)
        if not accepted:
            assert reply is not None
            self._write(reply)  # RFC 2034: a refusal has its enhanced code
            return
        if not self.esmtp:
            hello = self._pools.hello if reply is None else Reply(reply.code, "", reply.lines)
            self._out.append(hello.wire(False))
            self._pools.metrics.commands[verb, "2xx"] += 1
            return
        first = (reply if reply is not None else self._pools.hello).lines[0]
        # RFC 2034: enhanced codes come after the client learnt of them.
        key = (first, *keywords)
        data = self._pools.ehlo.get(key)
        if data is None:
            data = Reply(250, "", key).wire(False)
            if len(self._pools.ehlo) < _ANSWERS_MAX:
                self._pools.ehlo[key] = data
        self._out.append(data)
        self._pools.metrics.commands[verb, "2xx"] += 1

    # MAIL (RFC 5321 4.1.1.2)

    def _mail(self, rule: Rule, argument: bytes) -> None:
        config = self.config
        refusal = rule.order[self.state]
        if refusal is not None:
            self._write(refusal)
            return
        if config.max_transactions and self._transactions >= config.max_transactions:
            self._limit_reply = R.TOO_MANY_TRANSACTIONS
            return
        try:
            command = parse_mail(argument)
        except CommandSyntaxError as error:
            self._write(_error_reply(error))
            return
        if config.require_tls and self.tls is None:
            self._write(R.TLS_REQUIRED)
            return
        if config.auth_require and self.authenticated_as is None:
            self._write(R.AUTH_REQUIRED)
            return
        if command.parameters:
            refusal = check_mail_parameters(command, config, auth=self._auth_offered)
            if refusal is not None:
                self._write(refusal)
                return
        envelope = SmtpEnvelope(
            return_path=command.return_path,
            mail_parameters=dict(command.parameters) if command.parameters else {},
            helo_name=self.helo_name,
            peer=self.peer,
            smtputf8=command.smtputf8 and config.smtputf8,
            body_type=command.body,
            dsn_ret=command.ret,
            dsn_envid=command.envid,
            auth_identity=self.authenticated_as,
            auth_submitter=command.auth,
            tls=self.tls is not None,
            xforward=self._xforward,
        )
        if command.extensions:
            envelope.mail_extensions = command.extensions
        event = self._events.get("mail")
        reply = None
        if event is not None and event.handlers:
            args = CommandEventArgs(command, envelope)
            reply = self._decide(rule, event.handlers, args, self._mail_done, envelope)
            if reply is _WAIT:
                return
        self._mail_done(envelope, reply)

    def _mail_done(self, envelope: SmtpEnvelope, reply: Reply | None) -> None:
        if self._xforward and (reply is None or reply.code // 100 == 2):
            self._xforward = {}  # the envelope has them: XFORWARD is for one transaction
        if reply is None or reply.code // 100 == 2:
            self._transactions += 1
            self._tx = Transaction(envelope)
            if self._pools.tracer is not None:  # a span per transaction (alephsmtp.tracing)
                self._pools.tracer.transaction_started(self, envelope)
            self.state = _AFTER_MAIL
        if reply is None:
            self._out.append(self._wire.MAIL_OK)
            self._pools.metrics.commands["MAIL", "2xx"] += 1
        else:
            self._write(reply)

    # RCPT (RFC 5321 4.1.1.3)

    def _rcpt(self, rule: Rule, argument: bytes) -> None:
        refusal = rule.order[self.state]
        if refusal is not None:
            self._write(refusal)
            return
        tx = self._tx
        assert tx is not None  # the order says a transaction is open
        envelope = tx.envelope
        try:
            command = parse_rcpt(argument, envelope.smtputf8)
        except CommandSyntaxError as error:
            self._write(_error_reply(error))
            return
        limit = self.config.max_recipients
        if limit and len(envelope.recipients) >= limit:
            self._write(R.TOO_MANY_RCPTS)
            return
        if command.parameters:
            refusal = check_rcpt_parameters(command, self.config)
            if refusal is not None:
                self._write(refusal)
                return
        event = self._events.get("rcpt")
        reply = None
        if event is not None and event.handlers:
            args = CommandEventArgs(command, envelope)
            reply = self._decide(rule, event.handlers, args, self._rcpt_done, command)
            if reply is _WAIT:
                return
        self._rcpt_done(command, reply)

    def _rcpt_done(self, command: RcptCommand, reply: Reply | None) -> None:
        tx = self._tx
        if (reply is None or reply.code // 100 == 2) and tx is not None:
            envelope = tx.envelope
            envelope.recipients.append(command.recipient_address)
            envelope.rcpt_parameters.append(dict(command.parameters))
            envelope.dsn_notify.append(command.notify)
            envelope.dsn_orcpt.append(command.orcpt)
            if command.extensions or envelope.rcpt_extensions:
                # Aligned with the recipients once any recipient had one.
                extensions = envelope.rcpt_extensions
                extensions.extend({} for _ in range(len(envelope.recipients) - 1 - len(extensions)))
                extensions.append(command.extensions)
            self.state = _AFTER_RCPT
        if reply is None:
            self._out.append(self._wire.RCPT_OK)
            self._pools.metrics.commands["RCPT", "2xx"] += 1
        else:
            self._write(reply)

    # DATA (RFC 5321 4.1.1.4)

    def _data(self, rule: Rule, argument: bytes) -> None:
        command = self._parse(rule, b"DATA", argument)
        if command is None:
            return
        tx = self._tx
        if tx is not None and tx.envelope.body_type == "BINARYMIME":
            self._write(R.BINARYMIME_DATA)  # RFC 3030 3
            return
        event = self._events.get("data")
        reply = None
        if event is not None and event.handlers:
            args = CommandEventArgs(command, tx.envelope if tx is not None else None)
            reply = self._decide(rule, event.handlers, args, self._data_done, command)
            if reply is _WAIT:
                return
        self._data_done(command, reply)

    def _data_done(self, command: DataCommand, reply: Reply | None) -> None:
        if reply is not None:
            self._write(reply)
            if reply.code != 354:
                return
        else:
            self._out.append(self._wire.DATA_GO)
            self._pools.metrics.commands["DATA", "3xx"] += 1
        self._verb = ""  # what is written next answers the message, not a command
        self._flush()
        tx = self._tx
        assert tx is not None and self._loop is not None
        self.state = _AFTER_DATA
        tx.started = now = self._clock()
        tx.bytes_read = 0
        config = self.config
        reader = DataReader(
            config.max_message_size, config.max_text_line_length, config.bare_newline
        )
        self._input = reader
        timer = self._timer
        if timer is not None and config.data_timeout > 0:
            # RFC 5321 4.5.3.2.5: the data timeout runs from the 354 on, before any read (the
            # timer is re-armed only when that is sooner than its wake-up: rarely).
            deadline = now + config.data_timeout
            if deadline < timer.at:
                timer.wake_by(deadline)
        pending = self._reader.take_pending()
        if pending:
            tx.bytes_read += len(pending)
            self._feed_message(reader, pending)
            if self._input is not None and not tx.clocked:
                self._arm_message_timer(tx)

    def _feed_message(self, reader: DataReader, data: memoryview | bytes) -> None:
        chunk = reader.feed(data)
        tx = self._tx
        assert tx is not None
        if reader.error is not None and tx.spool is not None:
            tx.discard()  # refused at its end whatever comes: keep nothing of it
        if chunk and self._keep(tx, chunk):
            return  # an async chunk handler runs; _after_chunk_handlers goes on
        if reader.done:
            self._message_read(reader)

    def _message_read(self, reader: DataReader) -> None:
        """The end mark was read: answer the message, then what was pipelined after it."""
        self._input = None
        trailing = reader.trailing
        error = reader.error
        self._end_of_message(_message_error_reply(error) if error is not None else None)
        if trailing:
            # Pipelined commands after the end of data (RFC 2920): answered after the
            # message's reply, in order.
            self._requeue(trailing)

    def _keep(self, tx: Transaction, chunk: bytes) -> bool:
        """Keep a piece of the message, or stream it to ``message_chunk`` handlers.

        Returns true when an async handler took it: reading pauses until it is done (back-pressure),
        and the message goes on from
        [`_after_chunk_handlers()`][alephsmtp.session.SmtpSession._after_chunk_handlers].
        """
        if tx.refusal is not None:
            return False
        event = self._events.get("message_chunk")
        if event is None or not event.handlers:
            if tx.spool is None and tx.first is None and len(chunk) <= self.config.spool_threshold:
                tx.first = chunk  # a small message in one piece needs no spool
                return False
            spool = tx.spool
            try:
                if spool is None:
                    spool = tx.spool = MessageSpool(
                        self.config.spool_threshold, self.config.spool_directory
                    )
                    first, tx.first = tx.first, None
                    if first is not None:
                        spool.write(first)
                spool.write(chunk)
            except OSError as error:
                # The disk refused (full, read-only): the rest of the message is read and
                # dropped, and the client told to try again later (452 4.3.1).
                self.log.error("cannot spool the message: %s", error)
                tx.discard()
                tx.refusal = R.STORAGE_FAILED
            return False
        args = MessageChunkEventArgs(tx.envelope, chunk, tx.streamed)
        tx.streamed += len(chunk)
        try:
            result = run_all(event.handlers, self, args)
        except Exception as error:
            tx.refusal = self._chunk_failure(error)
            return False
        if type(result) is not Pending:
            return False
        self._busy = True  # reading goes on (what comes is held; see _HOLD_LIMIT)
        self._flush()
        self._handler_task = self._spawn(self._stream(result, tx))
        self._start_handler_clock(self.config.handler_timeout)
        return True

    async def _stream(self, pending: Pending, tx: Transaction) -> None:
        try:
            await pending.coroutine
        except asyncio.CancelledError:
            if not self._handler_timed_out:
                raise
            tx.refusal = R.HANDLER_TIMEOUT
        except Exception as error:
            tx.refusal = self._chunk_failure(error)
        self._stop_handler_clock()
        self._busy = False
        if self.state is State.CLOSED or self._transport is None:
            return
        self._after_chunk_handlers()
        self._update_reading()
        self._run()

    def _after_chunk_handlers(self) -> None:
        """Async chunk handlers are done: the message or chunk goes on where it stopped."""
        reader = self._input
        if reader is None or not reader.done:
            return
        if type(reader) is DataReader:
            self._message_read(reader)
        else:
            self._end_of_chunk(cast(BdatReader, reader))

    # BDAT (RFC 3030)

    def _bdat(self, rule: Rule, argument: bytes) -> None:
        try:
            command = cast(BdatCommand, parse_argument(b"BDAT", argument))
        except CommandSyntaxError as error:
            refusal = rule.order[self.state]  # out of order: 503 before syntax is judged
            self._write(refusal if refusal is not None else _error_reply(error))
            return
        config = self.config
        if command.size > (config.max_message_size or sys.maxsize):
            # A chunk larger than any message may be (or than any size a reader can count,
            # 2**63 - 1): reading it only to drop it could take forever, and not reading it
            # would take its bytes for commands. Said, and closed.
            self.log.info("BDAT chunk of %d octets refused; closing", command.size)
            self._send_and_close(R.TOO_BIG)
            return
        # RFC 3030: the chunk follows whatever the reply; read it (and drop it when refused)
        # so the session stays in sync.
        refusal = rule.order[self.state]
        if refusal is None and not config.chunking:
            refusal = R.NOT_IMPLEMENTED
        tx = self._tx
        if refusal is None and tx is None:  # pragma: no cover - the order says it is open
            refusal = R.HANDLER_FAILED
        self._chunk = command
        self._chunk_refusal = refusal
        reader = BdatReader(command.size, config.max_message_size, tx.size if tx else 0)
        self._input = reader
        if tx is not None and refusal is None and self.state is not State.BDAT:
            assert self._loop is not None
            tx.started = self._loop.time()
            tx.bytes_read = 0
            tx.rate_marks.clear()
        pending = self._reader.take_pending()
        if reader.done:  # BDAT 0
            self._end_of_chunk(reader, pending)
        elif pending:
            if tx is not None:
                tx.bytes_read += len(pending)
            self._feed_chunk(reader, pending)

    def _feed_chunk(self, reader: BdatReader, data: memoryview | bytes) -> None:
        chunk = reader.feed(data)
        tx = self._tx
        if reader.error is not None and tx is not None and tx.spool is not None:
            tx.discard()  # the transaction fails (RFC 3030 2): keep nothing of it
        if chunk and self._chunk_refusal is None and tx is not None and self._keep(tx, chunk):
            return  # an async chunk handler runs; _after_chunk_handlers goes on
        if reader.done:
            self._end_of_chunk(reader)

    def _end_of_chunk(self, reader: BdatReader, trailing: bytes | None = None) -> None:
        self._verb = "BDAT"
        command, refusal = self._chunk, self._chunk_refusal
        assert command is not None
        self._input = None
        self._chunk = None
        self._chunk_refusal = None
        if trailing is None:
            trailing = reader.trailing
        tx = self._tx
        if refusal is not None:
            self._write(refusal)  # the chunk was read and dropped
        elif reader.error is not None:
            # RFC 3030 2: a failed chunk fails the whole transaction.
            self._end_of_message(_message_error_reply(reader.error))
        elif tx is not None:
            tx.size = reader.size
            handlers = self._handlers("bdat")
            reply = None
            if handlers:
                args = CommandEventArgs(command, tx.envelope)
                reply = self._decide(RULES["BDAT"], handlers, args, self._chunk_done, command)
            if reply is not _WAIT:
                self._chunk_done(command, reply)
        if trailing:
            self._requeue(trailing)

    def _chunk_done(self, command: BdatCommand, reply: Reply | None) -> None:
        if reply is not None and reply.code // 100 != 2:
            self._end_of_message(reply)
        elif command.last:
            self.state = advance(self.state, "BDAT")
            self._end_of_message(None)
        else:
            self.state = advance(self.state, "BDAT")
            if reply is None:
                reply = R.chunk_received(command.size)
            self._write(reply)

    # The end of a message, DATA or BDAT LAST

    def _end_of_message(self, refusal: Reply | None) -> None:
        self._verb = ""  # what is written now answers the message, not a command
        tx = self._tx
        if tx is not None and self.config.measure_latency and self._loop is not None:
            tx.ended = self._loop.time()
        events = self._events
        chunk_event = events.get("message_chunk")
        streamed = chunk_event is not None and bool(chunk_event.handlers)
        if refusal is None and tx is not None:
            refusal = tx.refusal
        if refusal is not None or tx is None:
            # Read to its end, so the session is in sync; never delivered.
            reply = refusal if refusal is not None else R.HANDLER_FAILED
            if tx is not None:
                tx.discard()
            if streamed and tx is not None:
                self._notify("message_discarded", MessageDiscardedEventArgs(tx.envelope, reply))
            self._message_done(None, reply)
            return
        envelope = tx.envelope
        if streamed:
            envelope.message = None
            args = MessageReceivedEventArgs(envelope, b"", True, tx.streamed)
            size = tx.streamed
        else:
            # The spool (memory, or its file) goes with the envelope: read when a handler
            # asks, deleted when nothing refers to the message any more.
            spool = tx.spool
            if spool is not None:
                args = MessageReceivedEventArgs(envelope, spool, False, spool.size)
                size = spool.size
            else:
                first = tx.first if tx.first is not None else b""
                args = MessageReceivedEventArgs(envelope, first, False, len(first))
                size = len(first)
        event = events.get("message_received")
        answer = None
        if event is not None and event.handlers:
            answer = self._decide(_MESSAGE, event.handlers, args, self._message_done, args)
            if answer is _WAIT:
                return
        self._message_done(args, answer, size)

    def _message_done(
        self,
        args: MessageReceivedEventArgs | None,
        reply: Reply | list[Reply] | None,
        size: int = -1,
    ) -> None:
        tx = self._tx
        recipients = len(tx.envelope.recipients) if tx is not None else 1
        if tx is not None and tx.ended and self._loop is not None:
            self._pools.metrics.reply_seconds.observe(self._loop.time() - tx.ended)
        self._tx = None
        self.state = advance(self.state, P.END_OF_MESSAGE)
        if self._log_outcomes:
            self._log_outcome(tx, reply, size if size >= 0 else (args.size if args else -1))
        if reply is None:
            accepted = True
            # The default reply (RFC 2033 4.2: one per recipient in LMTP).
            wire = self._wire.QUEUED
            self._out.extend([wire] * recipients if self.config.lmtp else [wire])
        else:
            replies = (
                reply
                if isinstance(reply, list)
                else [reply] * (max(recipients, 1) if self.config.lmtp else 1)
            )
            accepted = any(each.code // 100 == 2 for each in replies)
            for each in replies:
                self._write(each)
            if not accepted:
                self._pools.metrics.message_refused(replies[0].code)
                if args is not None and args.streamed and tx is not None:
                    # A handler refused a message that message_chunk handlers stored as it
                    # came: they are told to drop it, as for the session's own refusals.
                    self._notify(
                        "message_discarded", MessageDiscardedEventArgs(tx.envelope, replies[0])
                    )
        if accepted:
            if size < 0:
                size = args.size if args is not None else 0
            self._pools.metrics.message_accepted(size, recipients)
            self._junk_commands = 0
        if self._pools.tracer is not None:
            self._pools.tracer.transaction_ended(self, reply, args)

    def _log_outcome(
        self, tx: Transaction | None, reply: Reply | list[Reply] | None, size: int
    ) -> None:
        """The one INFO line per message: who sent it to whom, and what the client was told
        (accepted or refused, with the reply; per recipient in LMTP)."""
        if tx is None:
            return
        envelope = tx.envelope
        if size < 0:
            size = tx.bytes_read
        replies = reply if isinstance(reply, list) else [reply if reply is not None else R.QUEUED]
        accepted = sum(1 for each in replies if each.code // 100 == 2)
        if len(replies) > 1:
            verdict = f"{accepted} of {len(replies)} recipients accepted: " + "; ".join(
                str(each) for each in replies
            )
        else:
            verdict = ("accepted: " if accepted else "refused: ") + str(replies[0])
        recipients = envelope.recipients
        shown = ", ".join(f"<{r}>" for r in recipients[:5])
        if len(recipients) > 5:
            shown += f" and {len(recipients) - 5} more"
        self.log.info(
            "message <%s> -> %s, %d octets, %s",
            envelope.return_path or "",
            shown,
            size,
            verdict,
        )

    def _trace_line(self, line: bytes | SmtpError) -> None:
        """A line the client sent, for the trace: AUTH's payloads never (RFC 4954 15)."""
        assert self._trace is not None
        if isinstance(line, SmtpError):
            self._trace.debug("< (%s)", line)
        elif self._auth_turn is not None and self._auth_turn.reading:
            self._trace.debug("< (an AUTH response, %d octets)", len(line))
        elif line[:5].upper() == b"AUTH ":
            words = line.split(b" ", 2)
            shown = b" ".join(words[:2]) + (b" (initial response)" if len(words) > 2 else b"")
            self._trace.debug("< %s", _printable(shown))
        else:
            self._trace.debug("< %s", _printable(line))

    # RSET, NOOP, VRFY, EXPN, HELP, and verbs nobody knows

    def _simple(self, rule: Rule, argument: bytes) -> None:
        command = self._parse(rule, rule.key, argument)
        if command is None:
            return
        if rule.verb in _JUNK_VERBS:
            self._junk_commands += 1
            limit = self.config.max_junk_commands
            if limit and self._junk_commands > limit:
                self._count_error()
        event = self._events.get(rule.event)
        reply = None
        if event is not None and event.handlers:
            args = CommandEventArgs(command)
            reply = self._decide(rule, event.handlers, args, self._simple_done, rule)
            if reply is _WAIT:
                return
        self._simple_done(rule, reply)

    def _simple_done(self, rule: Rule, reply: Reply | None) -> None:
        verb = rule.verb
        accepted = reply is None or reply.code // 100 == 2
        if verb == "RSET" and accepted:
            self._abandon_transaction()
            self._xforward = {}
            self.state = advance(self.state, verb)
        if reply is None and rule.default.code < 400:
            self._out.append(getattr(self._wire, rule.default_name))
            self._pools.metrics.commands[verb or "other", _CLASSES[rule.default.code // 100]] += 1
        else:
            self._write(reply if reply is not None else rule.default)

    def _unknown(self, verb: bytes, argument: bytes) -> None:
        # A plain SmtpCommand (never a syntax error): XCLIENT and XFORWARD come here too when
        # the server does not serve them.
        command = SmtpCommand(
            verb.decode("utf-8", "surrogateescape"),
            parameter=argument.decode("utf-8", "surrogateescape"),
        )
        handlers = self._handlers("unhandled_command")
        reply = None
        if handlers:
            rule = UNKNOWN
            reply = self._decide(rule, handlers, CommandEventArgs(command), self._simple_done, rule)
            if reply is _WAIT:
                return
        self._simple_done(UNKNOWN, reply)

    # QUIT (RFC 5321 4.1.1.10)

    def _quit(self, rule: Rule, argument: bytes) -> None:
        command = self._parse(rule, b"QUIT", argument)
        if command is None:
            return
        handlers = self._handlers("quit")
        reply = None
        if handlers:
            reply = self._decide(
                rule, handlers, CommandEventArgs(command), self._quit_done, command
            )
            if reply is _WAIT:
                return
        self._quit_done(command, reply)

    def _quit_done(self, command: QuitCommand, reply: Reply | None) -> None:
        # RFC 5321 4.1.1.10: the server MUST send an OK reply and then close.
        self._write(reply if reply is not None else R.BYE)
        self._flush()
        self.state = advance(self.state, "QUIT")
        if self._handlers("close_requested"):
            self._notify("close_requested", EventArgs())
        self.close()

    # STARTTLS (RFC 3207)

    @property
    def _starttls_offered(self) -> bool:
        return self.config.tls_context is not None and self.tls is None

    def _starttls(self, rule: Rule, argument: bytes) -> None:
        command = self._parse(rule, b"STARTTLS", argument)
        if command is None:
            return
        if self.tls is not None:
            self._write(R.TLS_ACTIVE)
            return
        if not self._starttls_offered:
            self._write(R.NOT_IMPLEMENTED)
            return
        handlers = self._handlers("starttls")
        reply = None
        if handlers:
            args = CommandEventArgs(command)
            reply = self._decide(rule, handlers, args, self._starttls_done, command)
            if reply is _WAIT:
                return
        self._starttls_done(command, reply)

    def _starttls_done(self, command: StarttlsCommand, reply: Reply | None) -> None:
        self._write(reply if reply is not None else R.TLS_GO)
        if reply is not None and reply.code != 220:
            return
        self._flush()
        # RFC 3207 5 / CVE-2011-0411: nothing the client sent after STARTTLS, before the
        # handshake, may be read as a command; the line reader stopped right after STARTTLS.
        # A client that did not wait for our 220 may have sent its ClientHello with the
        # command: TLS bytes go to the TLS layer, plaintext is dropped.
        early = self._reader.take_pending() + bytes(self._held)
        self._lines = []
        self._next = 0
        self._held.clear()
        if early and not looks_like_tls(early):
            self.log.info("discarded %d bytes sent after STARTTLS", len(early))
            early = b""
        self._busy = True
        self._update_reading()
        self._spawn(self._start_tls(early))

    async def _start_tls(self, early_data: bytes) -> None:
        transport, context = self._transport, self.config.tls_context
        assert transport is not None and context is not None
        try:
            tls_transport = await upgrade(
                transport,
                self,
                context,
                handshake_timeout=self.config.tls_handshake_timeout,
                early_data=early_data,
            )
        except HANDSHAKE_ERRORS as error:
            self.log.info("TLS handshake failed: %s", describe(error))
            self._pools.metrics.tls_failed(timeout=isinstance(error, asyncio.TimeoutError))
            self._busy = False
            self._end(error)
            return
        except BaseException:
            self._busy = False
            self._end(None)
            raise
        if self._ended:  # pragma: no cover - aborted as the handshake finished
            tls_transport.abort()
            return
        self._transport = tls_transport
        self.tls = TlsInfo.of(tls_transport)
        self._pools.metrics.tls_sessions[self.tls.version or "unknown"] += 1
        self.log.debug("TLS up (%s, %s)", self.tls.version, self.tls.cipher)
        # RFC 3207 4.2: forget everything learnt from the client before TLS.
        self._abandon_transaction()
        self.state = advance(self.state, P.TLS_STARTED)
        self.helo_name = None
        self.esmtp = False
        self.authenticated_as = self.auth_mechanism = None
        self._busy = False
        self._reading = False
        self._update_reading()
        self._run()

    # AUTH (RFC 4954)

    @property
    def _auth_offered(self) -> bool:
        # RFC 4954 4 / 14: no plaintext passwords over a connection without TLS, unless asked.
        return bool(self._mechanisms())

    def _mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms offered now: those configured, when an ``auth`` (or
        ``auth_command``) handler will judge them, over TLS (unless auth_over_plaintext);
        EXTERNAL only with a verified client certificate."""
        events = self._events
        judged = events.get("auth") or events.get("auth_command")
        config = self.config
        if not judged or not (self.tls is not None or config.auth_over_plaintext):
            return ()
        mechanisms = config.auth_mechanisms
        if "EXTERNAL" in mechanisms and (self.tls is None or not self.tls.peer_certificate):
            mechanisms = tuple(name for name in mechanisms if name != "EXTERNAL")
        if not events.get("auth_command"):  # only a handler can run what is not built in
            mechanisms = tuple(name for name in mechanisms if mechanism_known(name))
        return mechanisms

    def _auth(self, rule: Rule, argument: bytes) -> None:
        command = self._parse(rule, b"AUTH", argument)
        if command is None:
            return
        if self.authenticated_as is not None:
            self._write(R.AUTH_TWICE)
            return
        mechanisms = self._mechanisms()
        if not mechanisms:
            judged = self._handlers("auth") or self._handlers("auth_command")
            if judged and self.tls is None and self._starttls_offered:
                self._write(R.AUTH_ENCRYPTION)
            else:
                self._write(R.AUTH_NOT_ENABLED)
            return
        if command.mechanism not in mechanisms:
            self._write(R.AUTH_MECHANISM)
            return
        self._auth_turn = turn = AuthTurn(self, command)
        turn.begin()

    def sasl_challenge(self, data: bytes) -> Awaitable[str]:
        """For an ``auth_command`` handler running its own SASL exchange: send ``data`` as
        a ``334`` challenge (RFC 4954 4, base64-encoded here) and give the client's answer
        line (base64 text, as sent). ``AuthCancelled`` when the client answers ``*``.

        Only while an ``auth_command`` handler runs (it must be ``async``)."""
        turn = self._auth_turn
        if turn is None or self._loop is None or self._transport is None:
            raise RuntimeError("sasl_challenge() is for auth_command handlers")
        return turn.challenge(data)

    # XCLIENT and XFORWARD (Postfix's XCLIENT_README and XFORWARD_README)

    def _trusted(self, networks: list[Any]) -> bool:
        """Whether the client at connect (not one XCLIENT named since) is in ``networks``."""
        origin = self._origin
        return (
            isinstance(origin, tuple)
            and bool(origin)
            and address_in_networks(str(origin[0]), networks)
        )

    def _proxy_command(self, rule: Rule, argument: bytes) -> None:
        """XCLIENT or XFORWARD, from a client of the networks that may send it; a server that
        serves neither treats them as any verb it does not know."""
        xclient = rule.verb == "XCLIENT"
        networks = self._pools.xclient if xclient else self._pools.xforward
        if not networks:
            self._unknown(rule.key, argument)
            return
        refusal = rule.order[self.state]
        if refusal is None and not self._trusted(networks):
            refusal = R.NOT_AUTHORIZED
        if refusal is not None:
            self._write(refusal)
            return
        try:
            command = parse_argument(rule.key, argument)
        except CommandSyntaxError as error:
            self._write(_error_reply(error))
            return
        done: Done = self._xclient_done if xclient else self._xforward_done
        event = self._events.get(rule.event)
        reply = None
        if event is not None and event.handlers:
            args = CommandEventArgs(command)
            reply = self._decide(rule, event.handlers, args, done, command)
            if reply is _WAIT:
                return
        done(command, reply)

    def _xclient_done(self, command: XclientCommand, reply: Reply | None) -> None:
        """The session starts over as the client the proxy named: its address, HELO name and
        login as given (what is not given is kept, but the greeting exchange and the login
        start over), and the greeting again, to which the proxy says EHLO for it."""
        if reply is not None and reply.code // 100 != 2:
            self._write(reply)
            return
        attributes = command.attributes
        self.xclient_attributes.update(attributes)
        origin = self.peer
        if "ADDR" in attributes or "PORT" in attributes:
            self.peer = self._xclient_peer(attributes)
            # Per-address limits count the client now (the proxy's count is given back).
            refusal = self._repoint(self) if self._repoint is not None else None
            if refusal is not None:
                self.log.info("XCLIENT named %s: %s", _where(self.peer), refusal)
                self._send_and_close(refusal)
                return
        self._abandon_transaction()
        self._xforward = {}
        helo = attributes.get("HELO")
        self.helo_name = helo if helo and helo not in _UNAVAILABLE else None
        self.esmtp = False
        login = attributes.get("LOGIN")
        self.authenticated_as = login if login and login not in _UNAVAILABLE else None
        self.auth_mechanism = None
        self.state = advance(self.state, "XCLIENT")
        self.log.info("XCLIENT from %s: the client is %s", _where(origin), _where(self.peer))
        self._write(self._greeting if self._greeting is not None else R.OK)

    def _xclient_peer(self, attributes: Mapping[str, str]) -> Any:
        """The peer XCLIENT names: (address, port); ``None`` when the address is unknown."""
        old = self.peer if isinstance(self.peer, tuple) and len(self.peer) >= 2 else None
        addr = attributes.get("ADDR")
        host = (
            (xclient_address(addr) if addr not in _UNAVAILABLE else None)
            if addr is not None
            else (old[0] if old else None)
        )
        if host is None:
            return None
        port = attributes.get("PORT")
        if port is not None:
            number = int(port) if port not in _UNAVAILABLE else 0
        else:
            number = int(old[1]) if old and addr is None else 0
        return (host, number)

    def _xforward_done(self, command: XforwardCommand, reply: Reply | None) -> None:
        # The attributes add up until the next MAIL takes them (RSET and HELO drop them).
        if reply is None or reply.code // 100 == 2:
            self._xforward = {**self._xforward, **command.attributes}
        self._write(reply if reply is not None else R.XFORWARD_OK)

    def _abandon_transaction(self) -> None:
        """RSET, a new HELO/EHLO or TLS ends an open transaction: what was streamed of its
        message (BDAT chunks) is discarded, and its handlers are told so."""
        tx = self._tx
        if tx is None:
            return
        self._tx = None
        tx.discard()
        if self._pools.tracer is not None:
            self._pools.tracer.transaction_abandoned(self)
        if tx.streamed and self._handlers("message_chunk"):
            self._pools.metrics.messages_discarded += 1
            self._notify("message_discarded", MessageDiscardedEventArgs(tx.envelope, None))

    # --- handlers ---------------------------------------------------------------------------

    def _await(
        self,
        pending: Pending,
        rule: Rule,
        done: Done,
        context: Any,
        failed: bool = False,
        started: float = 0.0,
    ) -> None:
        """A handler went asynchronous: the rest runs in a task while what the client sends is
        held, not answered, so replies stay in order (RFC 2920 3.1); ``done(context, reply)``
        follows."""
        self._busy = True
        self._flush()
        self._handler_task = self._spawn(
            self._finish(pending, rule, done, context, failed, started)
        )
        self._start_handler_clock(
            self.config.message_handler_timeout if rule is _MESSAGE else self.config.handler_timeout
        )

    async def _finish(
        self, pending: Pending, rule: Rule, done: Done, context: Any, failed: bool, started: float
    ) -> None:
        reply: Any
        try:
            result = await pending.coroutine
            reply = self._checked_failure(result, rule) if failed else self._answer(result, rule)
        except asyncio.CancelledError:
            if not self._handler_timed_out:
                raise  # the session is going away
            reply = self._answer(R.HANDLER_TIMEOUT, rule)
        except Exception as error:
            answer = self._failure(rule.event, error, rule.failure)
            if type(answer) is Pending:
                try:
                    answer = await answer.coroutine
                except Exception:
                    self.log.exception("handler_error handler failed")
                    answer = None
            reply = self._checked_failure(answer, rule)
        if started:
            self._handlers_took(rule, started)
        self._stop_handler_clock()
        self._busy = False
        if self.state is State.CLOSED or self._transport is None:
            return
        done(context, reply)
        self._update_reading()
        self._run()

    def _answer(self, result: object, rule: Rule) -> Any:
        """A handler's answer as the reply (``None`` for the default); ``TypeError`` or
        ``ValueError`` for an answer that is not a valid reply to this command."""
        if result is None:
            return None
        if rule is _AUTH:
            if result is True:
                return R.AUTH_OK
            if result is False:
                return None
        elif rule is _MESSAGE and self.config.lmtp and isinstance(result, (list, tuple)):
            return self._recipient_replies(result)
        key = (rule.verb, result) if isinstance(result, str) else None
        if key is not None:
            reply = self._pools.answers.get(key)
            if reply is not None:
                return reply
        reply = self._valid_reply(result, rule)
        if key is not None and len(self._pools.answers) < _ANSWERS_MAX:
            self._pools.answers[key] = reply
        return reply

    def _valid_reply(self, result: object, rule: Rule) -> Reply:
        verb = rule.verb
        if not isinstance(result, (Reply, str)):
            raise TypeError(f"{verb} handler returned {type(result).__name__}, not a reply")
        reply = coerce_reply(result)
        # RFC 5321 4.2 / 4.3.2: 354 is DATA's go-ahead and the only 3xx any of these commands
        # may get; DATA itself gets 354 or a refusal, never a 2xx.
        if rule.default.code == 354:
            if reply.code != 354 and reply.code < 400:
                raise ValueError(f"{verb} handler answered {reply.code}, not 354 or an error")
        elif reply.code // 100 == 3:
            raise ValueError(f"{verb} handler answered {reply.code}, an intermediate reply")
        if reply.enhanced is None and self.config.enhanced_status_codes:
            reply = reply.with_enhanced(default_enhanced_code(verb, reply.code))
        return reply

    def _recipient_replies(self, result: list[Any] | tuple[Any, ...]) -> list[Reply]:
        """LMTP (RFC 2033 4.2): one reply per accepted recipient, in order."""
        tx = self._tx
        count = len(tx.envelope.recipients) if tx is not None else 1
        if len(result) != count:
            raise ValueError(f"LMTP handler gave {len(result)} replies for {count} recipients")
        return [
            each if each is not None else R.QUEUED
            for each in (self._answer(item, _MESSAGE) for item in result)
        ]

    def _failure(self, event: str, error: Exception, failure: Reply) -> object:
        """The answer to a handler that raised ``error``.

        An [`SmtpError`][alephsmtp.errors.SmtpError] is the handler's own answer: its reply, 5xx
        included. Anything else is a fault on our side, logged with its traceback: a
        ``handler_error`` handler may choose the reply (or return an awaitable of it), else
        ``failure``, a temporary error (451 4.3.0) so the client retries: a fault is never a
        bounce. The exception's text never reaches the client.
        """
        if isinstance(error, SmtpError):
            return _error_reply(error)
        self.log.error("%s handler failed", event, exc_info=error)
        hooks = self._handlers("handler_error")
        if hooks:
            try:
                answer = run_chain(hooks, self, HandlerErrorEventArgs(event, error, failure))
            except Exception:
                self.log.exception("handler_error handler failed")
                return failure
            if answer is not None:
                return answer
        return failure

    def _checked_failure(self, answer: object, rule: Rule) -> Any:
        """``answer`` (of a handler_error handler) as a reply, or the rule's failure reply
        when it is none or not a valid one."""
        try:
            reply = self._answer(answer, rule)
        except (TypeError, ValueError):
            self.log.exception("handler_error handler gave no valid reply")
            reply = None
        return reply if reply is not None else self._answer(rule.failure, rule)

    def _chunk_failure(self, error: Exception) -> Reply:
        """The reply a message gets when a ``message_chunk`` handler raised: its own
        (an SmtpError), else a temporary failure."""
        if isinstance(error, SmtpError):
            return _error_reply(error)
        self.log.error("message_chunk handler failed", exc_info=error)
        return R.MESSAGE_HANDLER_FAILED

    def _notify(self, event: str, args: EventArgs) -> None:
        """Raise an event whose handlers' results are not replies (close, disconnect)."""
        try:
            pending = run_all(self._handlers(event), self, args)
        except Exception:
            self.log.exception("%s handler failed", event)
            return
        if type(pending) is Pending:
            self._spawn(_ignore_result(pending.coroutine, self.log, event))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        # Held here: the loop keeps only weak references to tasks.
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- writing ----------------------------------------------------------------------------

    def _write(self, reply: Reply) -> None:
        code = reply.code
        if self._verb:
            self._pools.metrics.commands[self._verb, _CLASSES[code // 100]] += 1
        if code >= 400:
            self._pools.metrics.rejected(code)
            if self._verb in _REFUSALS_LOGGED and self._log_outcomes:
                self.log.info("%s refused: %s", _printable(self._line, 200), reply)
            if code in _BAD_COMMAND_CODES:
                self._count_error()
            elif code == 421 and self._limit_reply is None and self._started:
                # RFC 5321 3.8: after a 421 the server closes; nothing after it is answered.
                self._limit_reply = R.ALREADY_SAID
        self._out.append(reply.wire(self.config.enhanced_status_codes))

    def _count_error(self) -> None:
        """One more error; at max_bad_commands the session is told so and closed."""
        self._bad_commands += 1
        limit = self.config.max_bad_commands
        if limit and self._bad_commands >= limit and self._limit_reply is None:
            self._limit_reply = R.TOO_MANY_ERRORS

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        if self._trace is not None:
            for line in data.split(b"\r\n")[:-1]:
                self._trace.debug("> %s", _printable(line))
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _send_and_close(self, reply: Reply) -> None:
        if reply is not R.ALREADY_SAID:
            self._write(reply)
        self._flush()
        self.close()

    # --- clocks -----------------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        if self._timer is not None and self.config.idle_timeout > 0:
            self._timer.wake_by(self._last_activity + self.config.idle_timeout)

    def _arm_message_timer(self, tx: Transaction) -> None:
        """A message longer than one read: the data timeout and rate checks apply."""
        assert self._loop is not None and self._timer is not None
        tx.clocked = True
        config = self.config
        when = self._loop.time() + config.data_timeout
        if config.min_data_rate:
            when = min(when, tx.started + _RATE_CHECK_PERIOD)
        self._timer.wake_by(when)

    def _start_handler_clock(self, timeout: float) -> None:
        if timeout > 0 and self._loop is not None and self._timer is not None:
            self._handler_deadline = self._loop.time() + timeout
            self._timer.wake_by(self._handler_deadline)

    def _stop_handler_clock(self) -> None:
        self._handler_task = None
        self._handler_deadline = 0.0
        self._handler_timed_out = False
        if self._loop is not None:
            self._last_activity = self._loop.time()

    def _on_timer(self) -> None:
        """The timer fired: whatever is due is done, and it is asked for the next time."""
        loop, config = self._loop, self.config
        if self.state is State.CLOSED or loop is None or self._timer is None:
            return
        now = loop.time()
        tx = self._tx
        if self._busy:
            if self._handler_deadline and now >= self._handler_deadline:
                self._expire_handler()
                return  # the handler's task ends (cancelled) and the session goes on
            self._last_activity = now  # the client waits for us, not we for it
            if self._handler_deadline:
                self._timer.wake_by(self._handler_deadline)
                return
        if self._input is not None:
            if now - self._last_activity >= config.data_timeout:
                self.log.info("timeout while reading a message")
                self._pools.metrics.timeouts["data"] += 1
                self._send_and_close(R.TIMEOUT)
                return
            if config.min_data_rate and tx is not None and self._rate_too_low(tx, now):
                self._pools.metrics.timeouts["rate"] += 1
                self._send_and_close(R.SLOW)
                return
            wake = self._last_activity + config.data_timeout
            if config.min_data_rate:
                wake = min(wake, now + _RATE_CHECK_PERIOD)
        elif config.idle_timeout > 0:
            if now - self._last_activity >= config.idle_timeout:
                self.log.info("idle timeout")
                self._pools.metrics.timeouts["idle"] += 1
                self._send_and_close(R.TIMEOUT)
                return
            wake = self._last_activity + config.idle_timeout
        else:
            return
        self._timer.wake_by(wake)

    def _rate_too_low(self, tx: Transaction, now: float) -> bool:
        """A slowloris client: bytes trickle in just often enough to beat the data timeout.

        The rate is judged over the last ``data_rate_grace`` seconds (from the mark taken at
        a check at least that long ago), not over the whole message, so a fast start buys
        nothing: 33 MiB at once, then a byte every 25 s, is cut as soon as a window holds it.
        """
        marks = tx.rate_marks
        if not marks:
            marks.append((tx.started, 0))
        window = self.config.data_rate_grace
        while len(marks) > 1 and marks[1][0] <= now - window:
            marks.popleft()
        since, before = marks[0]
        marks.append((now, tx.bytes_read))
        span = now - since
        received = tx.bytes_read - before
        if span >= window and received < self.config.min_data_rate * span:
            self.log.info("data rate too low: %d bytes in the last %.0f s", received, span)
            return True
        return False

    def _expire_handler(self) -> None:
        """A handler took longer than its timeout: it is cancelled, the client gets 451."""
        task = self._handler_task
        self._handler_deadline = 0.0
        if task is not None and not task.done():
            self.log.warning("handler timed out; cancelled")
            self._pools.metrics.timeouts["handler"] += 1
            self._handler_timed_out = True
            task.cancel()

    def _start_write_clock(self) -> None:
        if self._write_timer is None and self._loop is not None and self.config.write_timeout > 0:
            self._write_timer = self._loop.call_later(
                self.config.write_timeout, self._write_timed_out
            )

    def _stop_write_clock(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if self._transport is not None:
            self.log.info("client took no replies for %g s; aborted", self.config.write_timeout)
            self._pools.metrics.timeouts["write"] += 1
            self.abort()

    def _end_linger(self) -> None:
        self._linger_timer = None
        if self._transport is not None:
            self._transport.close()


def _printable(line: bytes, limit: int = 1000) -> str:
    """A line from the wire as a log may show it: control characters escaped, cut at
    ``limit`` characters."""
    text = line[:limit].decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text + ("..." if len(line) > limit else "")


def _can_write_eof(transport: asyncio.Transport) -> bool:
    try:
        return transport.can_write_eof()
    except NotImplementedError:  # a transport without half-close
        return False


async def _ignore_result(awaitable: Awaitable[Any], logger: SessionLogger, name: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("%s handler failed", name)


# verb (as split_command gives it) -> (its rule, the session method that answers it)
_DISPATCH: dict[bytes, tuple[Rule, Callable[[SmtpSession, Rule, bytes], None]]] = {
    verb.encode(): (RULES[verb], method)
    for verb, method in (
        ("HELO", SmtpSession._hello),
        ("EHLO", SmtpSession._hello),
        ("LHLO", SmtpSession._hello),
        ("MAIL", SmtpSession._mail),
        ("RCPT", SmtpSession._rcpt),
        ("DATA", SmtpSession._data),
        ("BDAT", SmtpSession._bdat),
        ("RSET", SmtpSession._simple),
        ("NOOP", SmtpSession._simple),
        ("VRFY", SmtpSession._simple),
        ("EXPN", SmtpSession._simple),
        ("HELP", SmtpSession._simple),
        ("QUIT", SmtpSession._quit),
        ("STARTTLS", SmtpSession._starttls),
        ("AUTH", SmtpSession._auth),
        ("XCLIENT", SmtpSession._proxy_command),
        ("XFORWARD", SmtpSession._proxy_command),
    )
}
# Refusals logged at INFO (with the command line): who was turned away, and why.
_REFUSALS_LOGGED = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})
_LAST_IN_GROUP_BYTES = frozenset(verb.encode() for verb in _LAST_IN_GROUP)
# The commands a verb alone makes, one frozen instance each (parsed once, here).
_BARE_COMMANDS: dict[bytes, SmtpCommand] = {
    verb: parse_argument(verb, b"") for verb in (b"DATA", b"RSET", b"NOOP", b"QUIT", b"HELP")
}
