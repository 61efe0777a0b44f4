"""One SMTP connection: an ``asyncio.BufferedProtocol`` that raises an event per command.

The session is thin on purpose. Bytes arrive in a pooled buffer (``get_buffer`` /
``buffer_updated``), the parsing core turns a whole read into lines or message bytes in one
call, :mod:`._state` says whether a command may come now, :mod:`.commands` parses it,
:mod:`.extensions` checks its parameters, and the command's :class:`~alephsmtp.events.Event`
lets the user's handlers choose the reply. Handlers may be plain functions (run inline, no
task) or coroutines (run in a task while reading pauses, so replies keep their order and memory
stays bounded).

Lifetimes are kept apart: :class:`SessionConfig` (shared by every session of a server), the
connection (transport, peer, greeting exchange, TLS, AUTH) and the transaction (envelope,
message).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import inspect
import itertools
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar, cast, overload

from . import _state
from ._state import State
from .auth import MAX_RESPONSE_LENGTH, SaslExchange
from .commands import (
    AuthCommand,
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
    parse_command,
)
from .config import SessionConfig
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
    AuthEventArgs,
    CommandEventArgs,
    ConnectionLostEventArgs,
    Event,
    EventArgs,
    HandlerErrorEventArgs,
    HandlerResult,
    MessageChunkEventArgs,
    MessageDiscardedEventArgs,
    MessageReceivedEventArgs,
)
from .extensions import R_TOO_BIG, check_mail_parameters, check_rcpt_parameters, ehlo_keywords
from .metrics import Metrics
from .parser import BdatReader, BufferPool, DataReader, LineReader
from .proxy import ProxyHeader
from .replies import Reply, coerce_reply, default_enhanced_code
from .spool import MessageSpool
from .tls import HANDSHAKE_ERRORS, TlsInfo, looks_like_tls, upgrade

__all__ = ["OnSession", "SessionConfig", "SessionLogger", "SmtpSession", "TlsInfo"]

log = logging.getLogger("alephsmtp.session")

OnSession = Callable[["SmtpSession"], Awaitable[None] | None]
ArgsT = TypeVar("ArgsT", bound=EventArgs)
Finish = Callable[[str, Any], None]
Coerce = Callable[[object, str, Reply], Any]

_session_ids = itertools.count(1)
_REPLY_CACHE_SIZE = 512  # replies kept written per server (handlers' texts may vary)
_RATE_CHECK_PERIOD = 5.0  # seconds between data-rate checks while a message streams in
_LINGER = 2.0  # seconds a closed session reads (and drops) what the client still sends


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
        peer = session.peer
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        kwargs.setdefault("extra", {}).update(smtp_session=session.id, smtp_peer=where)
        return f"session {session.id} [{where}] {msg}", kwargs


class _Pools:
    """What a server's sessions share: the buffer pools (small for commands, large for
    DATA) and the written form of the replies they send."""

    __slots__ = ("command", "data", "metrics", "replies")

    def __init__(self, config: SessionConfig, metrics: Metrics | None = None) -> None:
        self.command = BufferPool(config.command_buffer_size, 64)
        self.data = BufferPool(config.data_buffer_size, 16)
        self.replies: dict[Reply, bytes] = {}
        self.metrics = metrics if metrics is not None else Metrics()


# Replies the session sends on its own. Handlers may send any reply instead.
_R_OK = Reply(250, "2.0.0", "OK")
_R_MAIL_OK = Reply(250, "2.1.0", "OK")
_R_RCPT_OK = Reply(250, "2.1.5", "OK")
_R_DATA_GO = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
_R_QUEUED = Reply(250, "2.0.0", "OK: queued")
_R_BYE = Reply(221, "2.0.0", "Bye")
_R_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
_R_EXPN = Reply(502, "5.5.1", "EXPN not available")
_R_HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")
_R_UNKNOWN = Reply(500, "5.5.1", "Error: command not recognized")
_R_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
_R_HANDLER_FAILED = Reply(451, "4.3.0", "Error: local error in processing")
# A fault on our side is never a bounce (RFC 5321 4.2.1): 4xx, the client keeps the message.
_R_MESSAGE_HANDLER_FAILED = Reply(451, "4.3.0", "Error: message could not be processed now")
_R_AUTH_HANDLER_FAILED = Reply(454, "4.7.0", "Temporary authentication failure")
_R_STORAGE_FAILED = Reply(452, "4.3.1", "Error: insufficient system storage")
_R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
_R_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
_R_SLOW = Reply(421, "4.4.2", "Error: data rate too low")
_R_HANDLER_TIMEOUT = Reply(451, "4.3.0", "Error: timeout while processing, try again later")
_R_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
_R_TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Error: too many authentication failures")
_R_TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Error: too many commands in this session")
_R_TOO_MANY_TRANSACTIONS = Reply(421, "4.7.0", "Error: too many transactions in this session")
# Replies that count towards max_bad_commands: syntax, sequence, unknown (RFC 5321 4.2.2).
_BAD_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 555})
# RFC 2920 3.1: commands that must end a pipeline group (the client waits for their reply).
_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "STARTTLS"})
_R_OUT_OF_SYNC = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
# Commands that move nothing forward: past max_junk_commands each counts as an error.
_JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
_R_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
_R_UNAVAILABLE = Reply(421, "4.3.0", "Service not available, closing connection")
_R_DATA_BARE = Reply(554, "5.5.2", "Error: message contains bare <CR> or <LF>")
_R_LINE_TOO_LONG = Reply(LineTooLong.code, LineTooLong.enhanced, LineTooLong.text)
_R_DATA_LINE = Reply(500, "5.5.6", "Error: message line too long")
_R_TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
_R_TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
_R_TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_R_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
_R_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
_R_AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
_R_AUTH_ENCRYPTION = Reply(538, "5.7.11", "Encryption required for requested authentication")
_R_AUTH_TWICE = Reply(503, "5.5.1", "Error: already authenticated")
_R_AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
_R_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
_R_AUTH_LINE = Reply(500, "5.5.6", "Authentication exchange line is too long")
_R_BINARYMIME_DATA = Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT, not DATA")
_R_NOT_LMTP = Reply(500, "5.5.1", "Error: this is an LMTP server; use LHLO")
_R_NOT_SMTP = Reply(500, "5.5.1", "Error: this is an SMTP server; use EHLO")


def _error_reply(error: SmtpError) -> Reply:
    return Reply(error.code, error.enhanced, error.text)


def _message_error_reply(error: SmtpError) -> Reply:
    """The reply to a message refused while it was read (after its end, so in sync)."""
    if isinstance(error, MessageTooLarge):
        return R_TOO_BIG
    if isinstance(error, (BareLineFeed, BareCarriageReturn)):
        return _R_DATA_BARE
    if isinstance(error, LineTooLong):
        return _R_DATA_LINE
    return _error_reply(error)


class SmtpSession(asyncio.BufferedProtocol):
    """One client connection, with one :class:`~alephsmtp.events.Event` per command.

    ``session.helo += handler``; a handler ``handler(session, e)`` returns the reply (see
    :mod:`alephsmtp.events`). ``start_transaction(greeting)`` sends the greeting and starts
    reading; if the server's ``on_session`` returns without calling it, the session starts with
    the configured greeting.
    """

    # --- events (made on first use; see _EventAttribute) ------------------------------------
    helo = _EventAttribute[CommandEventArgs[HeloCommand]]()
    ehlo = _EventAttribute[CommandEventArgs[EhloCommand]]()
    lhlo = _EventAttribute[CommandEventArgs[LhloCommand]]()
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
    message_chunk = _EventAttribute[MessageChunkEventArgs]()
    message_received = _EventAttribute[MessageReceivedEventArgs]()
    message_discarded = _EventAttribute[MessageDiscardedEventArgs]()
    close_requested = _EventAttribute[EventArgs]()
    unhandled_command = _EventAttribute[CommandEventArgs[SmtpCommand]]()
    disconnected = _EventAttribute[ConnectionLostEventArgs]()
    handler_error = _EventAttribute[HandlerErrorEventArgs]()

    __slots__ = (
        "__dict__",  # for attributes of your own (made only when you set one)
        "_admit",
        "_auth_failures",
        "_bad_commands",
        "_bdat_command",
        "_bdat_reader",
        "_bdat_refusal",
        "_buffer",
        "_buffer_owner",
        "_busy",
        "_closing",
        "_command_limit",
        "_commands",
        "_data_reader",
        "_ended",
        "_events",
        "_handler_deadline",
        "_handler_task",
        "_handler_timed_out",
        "_held",
        "_junk_commands",
        "_last_activity",
        "_limit_reply",
        "_line_reader",
        "_lines",
        "_linger_timer",
        "_log",
        "_loop",
        "_message_bytes",
        "_message_size",
        "_message_started",
        "_next_line",
        "_on_close",
        "_on_session",
        "_out",
        "_peer_override",
        "_pools",
        "_rate_marks",
        "_reading",
        "_sasl",
        "_sasl_command",
        "_spool",
        "_started",
        "_stream_refusal",
        "_streamed",
        "_tasks",
        "_timer",
        "_transactions",
        "_transport",
        "_view",
        "_write_paused",
        "_write_timer",
        "authenticated_as",
        "config",
        "envelope",
        "esmtp",
        "helo_name",
        "id",
        "peer",
        "proxy",
        "state",
        "tls",
    )  # fmt: skip

    def __init__(
        self,
        config: SessionConfig,
        on_session: OnSession | None = None,
        *,
        pools: _Pools | None = None,
        on_close: Callable[[SmtpSession], None] | None = None,
        admit: Callable[[SmtpSession], Reply | None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        peer: Any = None,
        proxy: ProxyHeader | None = None,
    ) -> None:
        self.config = config
        self._admit = admit
        self.id = next(_session_ids)
        self._on_session = on_session
        self._on_close = on_close
        self._pools = pools if pools is not None else _Pools(config)
        self._events: dict[str, Event[Any]] = {}
        # connection
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = loop  # tests pass a fake clock
        # The client: the socket's peer, or the one a PROXY protocol header named.
        self.peer: Any = peer
        self._peer_override = peer is not None
        self.proxy = proxy  # the PROXY protocol header (with its TLVs), if any
        self._log: SessionLogger | None = None
        self.state = State.GREETING
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls: TlsInfo | None = None  # set once TLS is up (STARTTLS or implicit)
        self.authenticated_as: str | None = None  # the AUTH identity, once accepted
        self._sasl: SaslExchange | None = None
        self._sasl_command: AuthCommand | None = None
        self._buffer: bytearray | None = None
        self._view: memoryview | None = None
        self._buffer_owner: BufferPool = self._pools.command
        self._lines: list[bytes | SmtpError] = []  # scanned, not yet answered ...
        self._next_line = 0  # ... from this index on
        # The reader's limit is the longest line any state may take (an AUTH exchange's,
        # RFC 4954 4, when AUTH may be offered); command lines are held to their own limit
        # in _handle_line. A limit that changed with the state would apply to lines already
        # scanned, and so depend on how the client's bytes happened to be split.
        self._command_limit = config.command_line_limit
        self._line_reader = LineReader(
            max(self._command_limit, MAX_RESPONSE_LENGTH)
            if config.auth_mechanisms
            else self._command_limit,
            config.bare_newline,
        )
        self._held = bytearray()  # bytes read while a handler runs, not yet scanned
        self._out: list[bytes] = []
        self._busy = False  # an async handler (or the TLS handshake) is running
        self._write_paused = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._reading = True
        self._closing = False  # graceful shutdown asked for
        self._ended = False  # the connection is gone and everything released
        self._started = False
        self._tasks: set[asyncio.Task[None]] | None = None
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._handler_task: asyncio.Task[None] | None = None
        self._handler_deadline: float | None = None
        self._handler_timed_out = False
        self._bad_commands = 0
        self._junk_commands = 0
        self._auth_failures = 0
        self._commands = 0
        self._transactions = 0
        self._limit_reply: Reply | None = None  # a limit was passed: say it and close
        # transaction
        self.envelope: SmtpEnvelope | None = None
        self._data_reader: DataReader | None = None
        self._bdat_reader: BdatReader | None = None
        self._bdat_command: BdatCommand | None = None
        self._bdat_refusal: Reply | None = None
        self._spool: MessageSpool | None = None  # the message as it arrives
        self._message_size = 0  # BDAT: what earlier chunks of this message added up to
        self._message_started = 0.0  # when DATA's 354 or the first BDAT came
        self._message_bytes = 0  # bytes read for this message (for min_data_rate)
        self._rate_marks: collections.deque[tuple[float, int]] = collections.deque()
        self._streamed = 0  # bytes handed to message_chunk handlers
        self._stream_refusal: Reply | None = None  # the stream failed: the message's reply

    def __repr__(self) -> str:
        return f"<SmtpSession #{self.id} {self.peer!r} {self.state.value}>"

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

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport (``None`` once closed)."""
        return self._transport

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
        self.state = State.NEED_HELO
        self._arm_timer()
        self._update_reading()
        if self._held:  # sent before the greeting (after a TLS handshake): read now
            self._pump()

    def close(self) -> None:
        """Close the connection once what was written has been sent (the seed's Dispose).

        When the client sent more than was answered, the close lingers: our side of the
        connection is shut (FIN) and what the client still sends is read and dropped for a
        moment, so that a client that pipelined more commands still reads its last reply (a
        close with unread input resets the connection, and a reset discards the reply from
        the client's buffer). A client that
        does not read what is left gets ``write_timeout`` seconds to take it; then the
        connection is aborted.
        """
        self.state = State.CLOSED
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        unread = self._next_line < len(self._lines) or self._held or self._line_reader.pending
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

    def _end_linger(self) -> None:
        self._linger_timer = None
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self.state = State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """Ask the session to end for a server shutdown (421 4.3.2, RFC 5321 3.8).

        A session between transactions is told and closed now; one in the middle of a
        transaction finishes it (the client gets its reply to DATA) and is closed after it.
        """
        self._closing = True
        if self.is_idle:
            self._send_and_close(_R_SHUTDOWN)

    @property
    def is_idle(self) -> bool:
        """No transaction open and no handler running."""
        return not self._busy and self.state in (State.GREETING, State.NEED_HELO, State.READY)

    @property
    def lmtp(self) -> bool:
        """Whether this session speaks LMTP (RFC 2033)."""
        return self.config.lmtp

    # --- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if not self._peer_override:
            self.peer = transport.get_extra_info("peername")
        if transport.get_extra_info("ssl_object") is not None:
            self.tls = TlsInfo.of(transport)  # implicit TLS (RFC 8314)
        self._last_activity = self._loop.time()
        # Nothing is read before the greeting (RFC 5321 3.1). A greeting sent from here, the
        # usual case, comes before the transport's first read; only an asynchronous
        # ``on_session`` needs reading paused (which costs a system call or two on asyncio).
        self._reading = True
        if log.isEnabledFor(logging.DEBUG):  # the session's logger is made on first use
            self.log.debug("connected")
        self._pools.metrics.connection_opened()
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
            self._send_and_close(_R_UNAVAILABLE)
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
            self._send_and_close(_R_UNAVAILABLE)
            return
        self.start_transaction()

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._view
        if view is None:
            # Small buffers for commands, large ones while a message streams in.
            streaming = self._data_reader is not None or self._bdat_reader is not None
            self._buffer_owner = self._pools.data if streaming else self._pools.command
            self._buffer = self._buffer_owner.acquire()
            # A memoryview, not the bytearray: asyncio's TLS layer fills the buffer in
            # several reads through slices of it, and a bytearray slice would be a copy.
            view = self._view = memoryview(self._buffer)
        return view

    def buffer_updated(self, nbytes: int) -> None:
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
                self._receive(data)
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_write_clock()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        partial = self._data_reader is not None or self._bdat_reader is not None
        partial = partial or self.state is State.BDAT
        self.state = State.CLOSED
        self._transport = None
        self._data_reader = None
        self._bdat_reader = None
        self._sasl = None
        self._discard_spool()
        self._lines.clear()
        self._next_line = 0
        self._line_reader.take_pending()
        self._held.clear()
        if partial:
            self.log.info("connection lost during a message; discarded")
            if self._handlers("message_chunk") and self.envelope is not None:
                self._notify("message_discarded", MessageDiscardedEventArgs(self.envelope, None))
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
            self.abort()

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

    def _receive(self, data: memoryview | bytes) -> None:
        assert self._loop is not None
        if self._data_reader is not None or self._bdat_reader is not None:
            # In a message the data timeout runs between reads (RFC 5321 4.5.3.2.5); a
            # command line must be whole within idle_timeout of when the session began
            # waiting for it, however its bytes trickle in (Postfix's per-record deadline).
            self._last_activity = self._loop.time()
        if self._busy or not self._started or self.state is State.CLOSED:
            # Held while a handler (or TLS) runs, and before the greeting: read then.
            if self.state is not State.CLOSED:
                self._held += data
            return
        self._consume(data)
        self._pump()

    def _consume(self, data: memoryview | bytes) -> None:
        """Hand a read to whichever reader the session is in: message, chunk or commands."""
        if self._data_reader is not None:
            self._message_bytes += len(data)
            self._feed_message(self._data_reader, data)
        elif self._bdat_reader is not None:
            self._message_bytes += len(data)
            self._feed_chunk(self._bdat_reader, data)
        else:
            self._lines.extend(self._line_reader.feed(data))

    def _pump(self) -> None:
        """Answer every complete command line, in order, until one needs to wait."""
        lines = self._lines
        while not self._busy and self.state is not State.CLOSED:
            if self._limit_reply is not None:
                self.log.info("closing: %s", self._limit_reply)
                self._send_and_close(self._limit_reply)
                break
            if self._next_line < len(lines):
                line = lines[self._next_line]
                self._next_line += 1
                if self._next_line == len(lines):
                    lines.clear()
                    self._next_line = 0
                self._handle_line(line)
            elif self._held:
                held = bytes(self._held)
                self._held.clear()
                self._consume(held)
            elif (
                self._data_reader is None
                and self._bdat_reader is None
                and self._line_reader.pending
            ):
                # Scanning stopped after DATA/BDAT/STARTTLS (a command that may change how
                # what follows is read); the command was answered, so go on.
                more = self._line_reader.feed(b"")
                if not more:
                    break
                lines.extend(more)
            else:
                break
        self._flush()
        if self._closing and self.is_idle and self.state is not State.CLOSED:
            self._send_and_close(_R_SHUTDOWN)

    # --- commands ---------------------------------------------------------------------------

    def _handle_line(self, line: bytes | SmtpError) -> None:
        assert self._loop is not None
        self._last_activity = self._loop.time()  # the next line's deadline runs from here
        if self._sasl is not None:
            self._auth_response(line)
            return
        self._commands += 1
        if self.config.max_commands and self._commands > self.config.max_commands:
            self._limit_reply = _R_TOO_MANY_COMMANDS
            return
        if not isinstance(line, bytes):
            self._write(_error_reply(line))
            return
        if len(line) + 2 > self._command_limit and line[:5].upper() != b"AUTH ":
            # RFC 5321 4.5.3.1.4 (an AUTH line may be longer: RFC 4954 4).
            self._write(_R_LINE_TOO_LONG)
            return
        try:
            command = parse_command(line, smtputf8=self._smtputf8_transaction)
        except CommandSyntaxError as error:
            verb = line.partition(b" ")[0].upper()
            # A command out of order is told so before its syntax is judged (503 over 501).
            refusal = _state.check(self.state, verb.decode("ascii", "replace"))
            self._write(refusal if refusal is not None else _error_reply(error))
            return
        refusal = _state.check(self.state, command.verb)
        if (
            self.config.forbid_unauth_pipelining
            and command.verb in _LAST_IN_GROUP
            and self.authenticated_as is None
            and (self._next_line < len(self._lines) or self._line_reader.pending or self._held)
        ):
            self.log.info("%s with more input behind it: closing", command.verb)
            self._send_and_close(_R_OUT_OF_SYNC)
            return
        if isinstance(command, BdatCommand):
            # RFC 3030: the chunk follows whatever the reply; read it (discarding it when
            # refused) so the session stays in sync.
            self._start_chunk(command, refusal)
            return
        if refusal is not None:
            self._write(refusal)
            return
        if command.verb in _JUNK_VERBS:
            self._junk_commands += 1
            limit = self.config.max_junk_commands
            if limit and self._junk_commands > limit:
                self._count_error()
        method = _COMMAND_METHODS.get(command.verb)
        if method is None:
            self._dispatch(
                "unhandled_command",
                CommandEventArgs(command),
                command.verb,
                _R_UNKNOWN,
                self._finish_simple,
            )
        else:
            method(self, command)

    @property
    def _smtputf8_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.smtputf8

    @property
    def _starttls_offered(self) -> bool:
        return self.config.tls_context is not None and self.tls is None

    @property
    def _auth_offered(self) -> bool:
        # RFC 4954 4 / 14: no plaintext passwords over a connection without TLS, unless asked.
        return (
            bool(self._handlers("auth"))
            and bool(self.config.auth_mechanisms)
            and (self.tls is not None or self.config.auth_over_plaintext)
        )

    # HELO / EHLO / LHLO

    def _on_helo(self, command: HeloCommand) -> None:
        self._hello("helo", command, esmtp=False)

    def _on_ehlo(self, command: EhloCommand) -> None:
        self._hello("ehlo", command, esmtp=True)

    def _on_lhlo(self, command: LhloCommand) -> None:
        self._hello("lhlo", command, esmtp=True)

    def _hello(
        self,
        event: str,
        command: HeloCommand | EhloCommand | LhloCommand,
        *,
        esmtp: bool,
    ) -> None:
        # RFC 2033 4.1: an LMTP server answers LHLO, never HELO/EHLO; and the reverse.
        if self.config.lmtp != isinstance(command, LhloCommand):
            self._write(_R_NOT_SMTP if isinstance(command, LhloCommand) else _R_NOT_LMTP)
            return
        self._dispatch(
            event,
            CommandEventArgs(command),
            command.verb,
            Reply(250, "", self.config.hostname),
            lambda verb, reply: self._finish_hello(command, reply, esmtp),
        )

    def _finish_hello(
        self, command: HeloCommand | EhloCommand | LhloCommand, reply: Reply, esmtp: bool
    ) -> None:
        accepted = reply.code // 100 == 2
        if accepted:
            # RFC 5321 4.1.4: HELO/EHLO resets the transaction. The EHLO reply lists exactly
            # the extensions this session serves, whatever the handler's text (4.1.1.1).
            self._abandon_transaction()
            self.helo_name = command.client_hostname
            self.esmtp = esmtp
            lines: tuple[str, ...] = reply.lines
            if esmtp:
                keywords = ehlo_keywords(
                    self.config, starttls=self._starttls_offered, auth=self._auth_offered
                )
                lines = (lines[0], *keywords)
            reply = Reply(reply.code, "", lines)
        self.state = _state.advance(self.state, command.verb, accepted)
        # RFC 2034: enhanced codes come after the client learnt of them; a refusal has one.
        self._write(reply, enhanced=not accepted)

    # MAIL / RCPT

    def _on_mail(self, command: MailCommand) -> None:
        config = self.config
        if config.max_transactions and self._transactions >= config.max_transactions:
            self._limit_reply = _R_TOO_MANY_TRANSACTIONS
            return
        if config.require_tls and self.tls is None:
            self._write(_R_TLS_REQUIRED)
            return
        if config.auth_require and self.authenticated_as is None:
            self._write(_R_AUTH_REQUIRED)
            return
        refusal = check_mail_parameters(command, config, auth=self._auth_offered)
        if refusal is not None:
            self._write(refusal)
            return
        self._dispatch(
            "mail",
            CommandEventArgs(command),
            "MAIL",
            _R_MAIL_OK,
            lambda verb, reply: self._finish_mail(command, reply),
        )

    def _finish_mail(self, command: MailCommand, reply: Reply) -> None:
        accepted = reply.code // 100 == 2
        if accepted:
            self._transactions += 1
            self.envelope = SmtpEnvelope(
                return_path=command.return_path,
                mail_parameters=dict(command.parameters),
                helo_name=self.helo_name,
                peer=self.peer,
                smtputf8=command.smtputf8 and self.config.smtputf8,
                body_type=command.body,
                dsn_ret=command.ret,
                dsn_envid=command.envid,
                auth_identity=self.authenticated_as,
                auth_submitter=command.auth,
                tls=self.tls is not None,
            )
        self.state = _state.advance(self.state, "MAIL", accepted)
        self._write(reply)

    def _on_rcpt(self, command: RcptCommand) -> None:
        envelope = self.envelope
        assert envelope is not None
        limit = self.config.max_recipients
        if limit and len(envelope.recipients) >= limit:
            self._write(_R_TOO_MANY_RCPTS)
            return
        refusal = check_rcpt_parameters(command, self.config)
        if refusal is not None:
            self._write(refusal)
            return
        self._dispatch(
            "rcpt",
            CommandEventArgs(command),
            "RCPT",
            _R_RCPT_OK,
            lambda verb, reply: self._finish_rcpt(command, reply),
        )

    def _finish_rcpt(self, command: RcptCommand, reply: Reply) -> None:
        accepted = reply.code // 100 == 2
        if accepted and self.envelope is not None:
            self.envelope.recipients.append(command.recipient_address)
            self.envelope.rcpt_parameters.append(dict(command.parameters))
            self.envelope.dsn_notify.append(command.notify)
            self.envelope.dsn_orcpt.append(command.orcpt)
        self.state = _state.advance(self.state, "RCPT", accepted)
        self._write(reply)

    # DATA

    def _on_data(self, command: DataCommand) -> None:
        if self.envelope is not None and self.envelope.body_type == "BINARYMIME":
            self._write(_R_BINARYMIME_DATA)  # RFC 3030 3
            return
        self._dispatch("data", CommandEventArgs(command), "DATA", _R_DATA_GO, self._finish_data)

    def _finish_data(self, verb: str, reply: Reply) -> None:
        self._write(reply)
        if reply.code != 354:
            return
        self._flush()
        self.state = State.DATA
        self._start_message_clock()
        config = self.config
        self._data_reader = reader = DataReader(
            config.max_message_size, config.max_text_line_length, config.bare_newline
        )
        pending = self._line_reader.take_pending()
        if pending:
            self._feed_message(reader, pending)

    def _feed_message(self, reader: DataReader, data: memoryview | bytes) -> None:
        chunk = reader.feed(data)
        if reader.error is not None and self._spool is not None:
            self._discard_spool()  # refused at its end whatever comes: keep nothing of it
        then = (lambda: self._message_read(reader)) if reader.done else None
        if chunk and self._take_chunk(chunk, then):
            return  # an async chunk handler runs; ``then`` follows it
        if then is not None:
            then()

    def _message_read(self, reader: DataReader) -> None:
        """The end mark was read: answer the message, then what was pipelined after it."""
        self._data_reader = None
        trailing = reader.trailing
        error = reader.error
        self._end_of_message(_message_error_reply(error) if error is not None else None)
        if trailing:
            # Pipelined commands after the end of data (RFC 2920): answered after the
            # message's reply, in order.
            self._requeue(trailing)

    def _start_message_clock(self) -> None:
        assert self._loop is not None
        self._message_started = self._loop.time()
        self._message_bytes = 0
        self._rate_marks.clear()
        self._rearm_timer()  # the data timeout and rate checks apply from now on

    def _take_chunk(self, chunk: bytes, then: Callable[[], None] | None) -> bool:
        """Keep a piece of the message, or stream it to ``message_chunk`` handlers.

        Returns true when an async handler took it: reading pauses until it is done
        (back-pressure), and ``then`` runs after it.
        """
        handlers = self._handlers("message_chunk")
        if not handlers:
            if self._stream_refusal is not None:
                return False
            spool = self._spool
            if spool is None:
                spool = self._spool = MessageSpool(
                    self.config.spool_threshold, self.config.spool_directory
                )
            try:
                spool.write(chunk)
            except OSError as error:
                # The disk refused (full, read-only): the rest of the message is read and
                # dropped, and the client told to try again later (452 4.3.1).
                self.log.error("cannot spool the message: %s", error)
                self._discard_spool()
                self._stream_refusal = _R_STORAGE_FAILED
            return False
        envelope = self.envelope
        if envelope is None or self._stream_refusal is not None:
            return False
        args = MessageChunkEventArgs(envelope, chunk, self._streamed)
        self._streamed += len(chunk)
        for index, handler in enumerate(handlers):
            try:
                result = handler(self, args)
            except Exception as error:
                self._stream_refusal = self._chunk_failure(error)
                return False
            if inspect.isawaitable(result):
                self._busy = True
                self._flush()
                self._update_reading()
                self._handler_task = self._spawn(
                    self._stream_async(result, handlers[index + 1 :], args, then)
                )
                self._start_handler_clock(self.config.handler_timeout)
                return True
        return False

    async def _stream_async(
        self,
        pending: Awaitable[Any],
        rest: tuple[Callable[[Any, MessageChunkEventArgs], HandlerResult], ...],
        args: MessageChunkEventArgs,
        then: Callable[[], None] | None,
    ) -> None:
        try:
            await pending
            for handler in rest:
                result = handler(self, args)
                if inspect.isawaitable(result):
                    await result
        except asyncio.CancelledError:
            if not self._handler_timed_out:
                raise
            self._stream_refusal = _R_HANDLER_TIMEOUT
        except Exception as error:
            self._stream_refusal = self._chunk_failure(error)
        self._stop_handler_clock()
        self._busy = False
        if self.state is State.CLOSED or self._transport is None:
            return
        if then is not None:
            then()
        self._update_reading()
        self._pump()

    def _requeue(self, data: bytes) -> None:
        if self._busy:
            self._held += data
        else:
            self._lines.extend(self._line_reader.feed(data))

    # BDAT (RFC 3030)

    def _start_chunk(self, command: BdatCommand, refusal: Reply | None) -> None:
        config = self.config
        if command.size > (config.max_message_size or sys.maxsize):
            # A chunk larger than any message may be (or than any size a reader can count,
            # 2**63 - 1): reading it only to discard it could take forever, and not reading
            # it would take its bytes for commands. Said, and closed.
            self.log.info("BDAT chunk of %d octets refused; closing", command.size)
            self._send_and_close(R_TOO_BIG)
            return
        if refusal is None and not config.chunking:
            refusal = _R_NOT_IMPLEMENTED
        if refusal is None and self.envelope is None:  # pragma: no cover - state says so
            refusal = _R_HANDLER_FAILED
        self._bdat_command = command
        self._bdat_refusal = refusal
        self._bdat_reader = reader = BdatReader(
            command.size, config.max_message_size, self._message_size
        )
        if self.state is not State.BDAT:
            self._start_message_clock()
        pending = self._line_reader.take_pending()
        if reader.done:  # BDAT 0
            self._end_of_chunk(reader, pending)
        elif pending:
            self._feed_chunk(reader, pending)

    def _feed_chunk(self, reader: BdatReader, data: memoryview | bytes) -> None:
        chunk = reader.feed(data)
        if reader.error is not None and self._spool is not None:
            self._discard_spool()  # the transaction fails (RFC 3030 2): keep nothing of it
        then = (lambda: self._end_of_chunk(reader, reader.trailing)) if reader.done else None
        if chunk and self._bdat_refusal is None and self._take_chunk(chunk, then):
            return  # an async chunk handler runs; ``then`` follows it
        if then is not None:
            then()

    def _end_of_chunk(self, reader: BdatReader, trailing: bytes) -> None:
        command, refusal = self._bdat_command, self._bdat_refusal
        assert command is not None
        self._bdat_reader = None
        self._bdat_command = None
        if refusal is not None:
            self._write(refusal)  # the chunk was read and dropped
        elif reader.error is not None:
            # RFC 3030 2: a failed chunk fails the whole transaction.
            self._end_of_message(_message_error_reply(reader.error))
        else:
            self._message_size = reader.size
            self._dispatch(
                "bdat",
                CommandEventArgs(command),
                "BDAT",
                Reply(250, "2.0.0", f"{command.size} octets received"),
                lambda verb, reply: self._finish_chunk(command, reply),
            )
        if trailing:
            self._requeue(trailing)

    def _finish_chunk(self, command: BdatCommand, reply: Reply) -> None:
        if reply.code // 100 != 2:
            self._end_of_message(reply)
        elif command.last:
            self.state = State.BDAT
            self._end_of_message(None)
        else:
            self.state = _state.advance(self.state, "BDAT", True)
            self._write(reply)

    # The end of a message, DATA or BDAT LAST

    def _end_of_message(self, refusal: Reply | None) -> None:
        spool, self._spool = self._spool, None
        envelope = self.envelope
        streamed = bool(self._handlers("message_chunk"))
        if refusal is None and self._stream_refusal is not None:
            refusal = self._stream_refusal
        if refusal is not None or envelope is None:
            # Read to its end, so the session is in sync; never delivered.
            reply = refusal if refusal is not None else _R_HANDLER_FAILED
            if spool is not None:
                spool.discard()
            self.log.info("message refused: %s", reply)
            if streamed and envelope is not None:
                self._notify("message_discarded", MessageDiscardedEventArgs(envelope, reply))
            self._finish_message("DATA", reply)
            return
        if streamed:
            envelope.message = None
            size = self._streamed
            args = MessageReceivedEventArgs(envelope, b"", True, size)
        else:
            # The spool (memory, or its file) goes with the envelope: read when a handler
            # asks, deleted when nothing refers to the message any more.
            size = spool.size if spool is not None else 0
            args = MessageReceivedEventArgs(envelope, spool if spool is not None else b"")
        self._dispatch(
            "message_received",
            args,
            "DATA",
            _R_QUEUED,
            lambda verb, reply: self._finish_message(verb, reply, size),
            failure=_R_MESSAGE_HANDLER_FAILED,
            # RFC 2033 4.2: in LMTP, one reply per accepted recipient, in order.
            coerce=self._to_recipient_replies if self.config.lmtp else None,
        )

    def _finish_message(self, verb: str, reply: Reply | list[Reply], size: int = 0) -> None:
        recipients = len(self.envelope.recipients) if self.envelope is not None else 1
        self._reset_transaction()
        self.state = _state.end_of_message(self.state)
        replies = (
            reply
            if isinstance(reply, list)
            else [reply] * (max(recipients, 1) if self.config.lmtp else 1)
        )
        if any(each.code // 100 == 2 for each in replies):
            self._pools.metrics.message_accepted(size)
            self._junk_commands = 0
        for each in replies:
            self._write(each)

    def _to_recipient_replies(self, result: object, verb: str, default: Reply) -> list[Reply]:
        envelope = self.envelope
        count = len(envelope.recipients) if envelope is not None else 1
        if isinstance(result, (list, tuple)):
            if len(result) != count:
                raise ValueError(f"LMTP handler gave {len(result)} replies for {count} recipients")
            return [self._to_reply(each, verb, default) for each in result]
        return [self._to_reply(result, verb, default)] * count

    # RSET, NOOP, VRFY, EXPN, HELP, QUIT

    def _on_rset(self, command: RsetCommand) -> None:
        self._dispatch("rset", CommandEventArgs(command), "RSET", _R_OK, self._finish_rset)

    def _finish_rset(self, verb: str, reply: Reply) -> None:
        accepted = reply.code // 100 == 2
        if accepted:
            self._abandon_transaction()
        self.state = _state.advance(self.state, "RSET", accepted)
        self._write(reply)

    def _on_noop(self, command: NoopCommand) -> None:
        self._dispatch("noop", CommandEventArgs(command), "NOOP", _R_OK, self._finish_simple)

    def _on_vrfy(self, command: VrfyCommand) -> None:
        self._dispatch("vrfy", CommandEventArgs(command), "VRFY", _R_VRFY, self._finish_simple)

    def _on_expn(self, command: ExpnCommand) -> None:
        self._dispatch("expn", CommandEventArgs(command), "EXPN", _R_EXPN, self._finish_simple)

    def _on_help(self, command: HelpCommand) -> None:
        self._dispatch("help", CommandEventArgs(command), "HELP", _R_HELP, self._finish_simple)

    def _on_quit(self, command: QuitCommand) -> None:
        self._dispatch("quit", CommandEventArgs(command), "QUIT", _R_BYE, self._finish_quit)

    def _finish_quit(self, verb: str, reply: Reply) -> None:
        # RFC 5321 4.1.1.10: the server MUST send an OK reply and then close.
        self._write(reply)
        self._flush()
        self.state = State.CLOSED
        if self._handlers("close_requested"):
            self._notify("close_requested", EventArgs())
        self.close()

    def _finish_simple(self, verb: str, reply: Reply) -> None:
        self._write(reply)

    def _abandon_transaction(self) -> None:
        """RSET, a new HELO/EHLO or TLS ends an open transaction: what was streamed of its
        message (BDAT chunks) is discarded, and its handlers are told so."""
        envelope = self.envelope
        if envelope is not None and self._streamed and self._handlers("message_chunk"):
            self._notify("message_discarded", MessageDiscardedEventArgs(envelope, None))
        self._reset_transaction()

    def _discard_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.discard()

    def _reset_transaction(self) -> None:
        self.envelope = None
        self._discard_spool()
        self._message_size = 0
        self._streamed = 0
        self._stream_refusal = None

    # STARTTLS (RFC 3207)

    def _on_starttls(self, command: StarttlsCommand) -> None:
        if self.tls is not None:
            self._write(_R_TLS_ACTIVE)
            return
        if not self._starttls_offered:
            self._write(_R_NOT_IMPLEMENTED)
            return
        self._dispatch(
            "starttls", CommandEventArgs(command), "STARTTLS", _R_TLS_GO, self._finish_starttls
        )

    def _finish_starttls(self, verb: str, reply: Reply) -> None:
        self._write(reply)
        if reply.code != 220:
            return
        self._flush()
        # RFC 3207 5 / CVE-2011-0411: nothing the client sent after STARTTLS, before the
        # handshake, may be read as a command; the line reader stopped right after STARTTLS.
        # A client that did not wait for our 220 may have sent its ClientHello with the
        # command: TLS bytes go to the TLS layer, plaintext is dropped.
        early = self._line_reader.take_pending() + bytes(self._held)
        self._lines.clear()
        self._next_line = 0
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
            self.log.info("TLS handshake failed: %s", str(error) or type(error).__name__)
            self._busy = False
            self.state = State.CLOSED
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
        self.log.debug("TLS up (%s, %s)", self.tls.version, self.tls.cipher)
        # RFC 3207 4.2: forget everything learnt from the client before TLS.
        self._abandon_transaction()
        self.state = State.NEED_HELO
        self.helo_name = None
        self.esmtp = False
        self.authenticated_as = None
        self._busy = False
        self._reading = False
        self._update_reading()
        self._pump()

    # AUTH (RFC 4954)

    def _on_auth(self, command: AuthCommand) -> None:
        if self.authenticated_as is not None:
            self._write(_R_AUTH_TWICE)
            return
        if not self._auth_offered:
            if self._handlers("auth") and self.tls is None and self._starttls_offered:
                self._write(_R_AUTH_ENCRYPTION)
            else:
                self._write(_R_AUTH_NOT_ENABLED)
            return
        if command.mechanism not in self.config.auth_mechanisms:
            self._write(_R_AUTH_MECHANISM)
            return
        self._sasl = SaslExchange(command.mechanism, self.config.hostname)
        self._sasl_command = command
        self._auth_step(command.initial_response)

    def _auth_response(self, line: bytes | SmtpError) -> None:
        if isinstance(line, SmtpError):
            self._end_sasl()
            self._write(_R_AUTH_LINE if isinstance(line, LineTooLong) else _error_reply(line))
            return
        self._auth_step(line.decode("ascii", "replace").strip(" "))

    def _auth_step(self, response: str | None) -> None:
        sasl, command = self._sasl, self._sasl_command
        assert sasl is not None and command is not None
        try:
            result = sasl.step(response)
        except SmtpError as error:
            self._end_sasl()
            self._write(_error_reply(error))
            return
        if isinstance(result, bytes):
            # A challenge: the next line is the client's answer.
            self._write(Reply(334, "", base64.b64encode(result).decode("ascii")))
            return
        self._end_sasl()
        # Never log credentials: the mechanism and the identity only.
        self._dispatch(
            "auth",
            AuthEventArgs(command, result),
            "AUTH",
            _R_AUTH_FAILED,
            lambda verb, reply: self._finish_auth(result.username, reply),
            failure=_R_AUTH_HANDLER_FAILED,
            coerce=self._to_auth_reply,
        )

    def _end_sasl(self) -> None:
        self._sasl = None
        self._sasl_command = None

    def _to_auth_reply(self, result: object, verb: str, default: Reply) -> Reply:
        if result is True:
            return _R_AUTH_OK
        if result is False or result is None:
            return _R_AUTH_FAILED
        return self._to_reply(result, verb, default)

    def _finish_auth(self, username: str, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.authenticated_as = username
            self.log.info("authenticated as %r", username)
            self._write(reply)
            return
        if reply.code // 100 != 5:  # our own trouble (454 4.7.0): not the client's failure
            self._write(reply)
            return
        # Password guessing: every failure counts as an error, from the second on the reply
        # waits (Postfix's smtpd_error_sleep_time), and max_auth_failures ends the session.
        self.log.info("authentication failed for %r", username)
        self._auth_failures += 1
        self._count_error()
        limit = self.config.max_auth_failures
        if limit and self._auth_failures >= limit and self._limit_reply is None:
            self._limit_reply = _R_TOO_MANY_AUTH_FAILURES
        delay = self.config.auth_failure_delay
        if self._auth_failures > 1 and delay > 0 and self._loop is not None:
            self._busy = True
            self._flush()
            self._update_reading()
            self._loop.call_later(delay, self._end_auth_delay, reply)
            return
        self._write(reply)

    def _end_auth_delay(self, reply: Reply) -> None:
        self._busy = False
        if self.state is State.CLOSED or self._transport is None:
            return
        self._write(reply)
        self._update_reading()
        self._pump()

    # --- handlers ---------------------------------------------------------------------------

    def _dispatch(
        self,
        event: str,
        args: ArgsT,
        verb: str,
        default: Reply,
        finish: Finish,
        failure: Reply = _R_HANDLER_FAILED,
        coerce: Coerce | None = None,
    ) -> None:
        """Run the handlers of the event named ``event``; ``finish(verb, reply)`` with theirs.

        Synchronous handlers run inline. The first awaitable moves the rest into a task; the
        session stops reading until it is done, so replies stay in order (RFC 2920 3.1).
        A handler that raises, or answers something that is not a valid reply, is logged with
        its traceback and the client gets ``failure`` (451 4.3.0; 554 5.3.0 after DATA).
        """
        to_reply = coerce if coerce is not None else self._to_reply
        handlers = self._handlers(event)
        if not handlers:
            finish(verb, to_reply(None, verb, default))
            return
        try:
            for index, handler in enumerate(handlers):
                result = handler(self, args)
                if inspect.isawaitable(result):
                    self._busy = True
                    self._flush()
                    self._update_reading()
                    rest = handlers[index + 1 :]
                    self._handler_task = self._spawn(
                        self._dispatch_async(
                            result, rest, args, verb, default, finish, failure, to_reply
                        )
                    )
                    self._start_handler_clock(
                        self.config.message_handler_timeout
                        if isinstance(args, MessageReceivedEventArgs)
                        else self.config.handler_timeout
                    )
                    return
                if result is not None:
                    break
            else:
                result = None
            reply = to_reply(result, verb, default)
        except Exception as error:
            answer = self._failure(event, error, failure)
            if inspect.isawaitable(answer):  # an async handler_error hook
                self._busy = True
                self._flush()
                self._update_reading()
                self._handler_task = self._spawn(
                    self._dispatch_async(answer, (), args, verb, failure, finish, failure, to_reply)
                )
                self._start_handler_clock(self.config.handler_timeout)
                return
            reply = self._checked_failure(answer, verb, failure, to_reply)
        finish(verb, reply)

    async def _dispatch_async(
        self,
        pending: Awaitable[Any],
        rest: tuple[Callable[[Any, ArgsT], HandlerResult], ...],
        args: ArgsT,
        verb: str,
        default: Reply,
        finish: Finish,
        failure: Reply,
        to_reply: Coerce,
    ) -> None:
        try:
            result: Any = await pending
            for handler in rest:
                if result is not None:
                    break
                result = handler(self, args)
                if inspect.isawaitable(result):
                    result = await result
            reply = to_reply(result, verb, default)
        except asyncio.CancelledError:
            if not self._handler_timed_out:
                raise  # the session is going away
            reply = to_reply(_R_HANDLER_TIMEOUT, verb, _R_HANDLER_TIMEOUT)
        except Exception as error:
            answer = self._failure(verb.lower(), error, failure)
            if inspect.isawaitable(answer):
                try:
                    answer = await answer
                except Exception:
                    self.log.exception("handler_error hook failed")
                    answer = None
            reply = self._checked_failure(answer, verb, failure, to_reply)
        self._stop_handler_clock()
        self._busy = False
        if self.state is State.CLOSED or self._transport is None:
            return
        finish(verb, reply)
        self._update_reading()
        self._pump()

    def _failure(self, event: str, error: Exception, failure: Reply) -> object:
        """The answer to a handler that raised ``error``.

        An :class:`~alephsmtp.errors.SmtpError` is the handler's own answer: its reply, 5xx
        included. Anything else is a fault on our side, logged with its traceback: a
        ``handler_error`` hook may choose the reply (or an awaitable of it), else ``failure``,
        a temporary error (451 4.3.0) so the client retries: a fault is never a bounce. The
        exception's text never reaches the client.
        """
        if isinstance(error, SmtpError):
            return _error_reply(error)
        self.log.error("%s handler failed", event, exc_info=error)
        hooks = self._handlers("handler_error")
        if hooks:
            args = HandlerErrorEventArgs(event, error, failure)
            for hook in hooks:
                try:
                    answer = hook(self, args)
                except Exception:
                    self.log.exception("handler_error hook failed")
                    continue
                if answer is not None:
                    return answer
        return failure

    def _checked_failure(
        self, answer: object, verb: str, failure: Reply, to_reply: Coerce
    ) -> Reply | list[Reply]:
        """``answer`` as a reply, or ``failure`` when it is not a valid one."""
        try:
            result: Reply | list[Reply] = to_reply(answer, verb, failure)
        except (TypeError, ValueError):
            self.log.exception("handler_error hook gave no valid reply")
            result = to_reply(failure, verb, failure)
        return result

    def _chunk_failure(self, error: Exception) -> Reply:
        """The reply a message gets when a ``message_chunk`` handler raised: its own
        (an SmtpError), else a temporary failure."""
        if isinstance(error, SmtpError):
            return _error_reply(error)
        self.log.error("message_chunk handler failed", exc_info=error)
        return _R_MESSAGE_HANDLER_FAILED

    def _to_reply(self, result: object, verb: str, default: Reply) -> Reply:
        if result is None:
            return default
        if not isinstance(result, (Reply, str)):
            raise TypeError(f"{verb} handler returned {type(result).__name__}, not a reply")
        reply = coerce_reply(result)
        # RFC 5321 4.2 / 4.3.2: 354 is DATA's go-ahead and the only 3xx any of these commands
        # may get; DATA itself gets 354 or a refusal, never a 2xx.
        if default.code == 354:
            if reply.code != 354 and reply.code < 400:
                raise ValueError(f"{verb} handler answered {reply.code}, not 354 or an error")
        elif reply.code // 100 == 3:
            raise ValueError(f"{verb} handler answered {reply.code}, an intermediate reply")
        if reply.enhanced is None and self.config.enhanced_status_codes:
            reply = reply.with_enhanced(default_enhanced_code(verb, reply.code))
        return reply

    def _notify(self, event: str, args: EventArgs) -> None:
        """Raise an event whose handlers' results are not replies (close, disconnect)."""
        for handler in self._handlers(event):
            try:
                result = handler(self, args)
                if inspect.isawaitable(result):
                    self._spawn(_ignore_result(result, self.log, event))
            except Exception:
                self.log.exception("%s handler failed", event)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        # Held here: the loop keeps only weak references to tasks.
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_handler_clock(self, timeout: float) -> None:
        if timeout > 0 and self._loop is not None:
            self._handler_deadline = self._loop.time() + timeout
            self._rearm_timer()

    def _stop_handler_clock(self) -> None:
        self._handler_task = None
        self._handler_deadline = None
        self._handler_timed_out = False
        if self._loop is not None:
            self._last_activity = self._loop.time()
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._arm_timer()

    # --- writing ----------------------------------------------------------------------------

    def _write(self, reply: Reply, enhanced: bool = True) -> None:
        if reply.code >= 400:
            self._pools.metrics.rejected(reply.code)
        if reply.code in _BAD_COMMAND_CODES:
            self._count_error()
        key = reply if enhanced else Reply(reply.code, "", reply.text)
        # The written form of a reply is kept for all the server's sessions: most replies are
        # the same few, and rendering one is far dearer than a lookup.
        cache = self._pools.replies
        try:
            data = cache.get(key)
        except TypeError:  # unhashable text (a list): not cached
            data = None
        if data is None:
            data = key.to_bytes(self.config.enhanced_status_codes)
            if len(cache) < _REPLY_CACHE_SIZE:
                with contextlib.suppress(TypeError):
                    cache[key] = data
        self._out.append(data)

    def _count_error(self) -> None:
        """One more error; at max_bad_commands the session is told so and closed."""
        self._bad_commands += 1
        limit = self.config.max_bad_commands
        if limit and self._bad_commands >= limit and self._limit_reply is None:
            self._limit_reply = _R_TOO_MANY_ERRORS

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _send_and_close(self, reply: Reply) -> None:
        self._write(reply)
        self._flush()
        self.close()

    # --- timers -----------------------------------------------------------------------------

    @property
    def _in_message(self) -> bool:
        return (
            self._data_reader is not None
            or self._bdat_reader is not None
            or self.state in (State.DATA, State.BDAT)
        )

    def _arm_timer(self) -> None:
        """One timer for the nearest deadline; a read only stamps the time (cheap)."""
        loop, config = self._loop, self.config
        if loop is None or self.state is State.CLOSED:
            return
        now = loop.time()
        if self._busy and self._handler_deadline is not None:
            deadline = self._handler_deadline
        elif self._in_message:
            deadline = self._last_activity + config.data_timeout
            if config.min_data_rate:
                deadline = min(deadline, now + _RATE_CHECK_PERIOD)
        elif config.idle_timeout > 0:
            deadline = self._last_activity + config.idle_timeout
        else:
            return
        self._timer = loop.call_later(max(deadline - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        loop, config = self._loop, self.config
        if self.state is State.CLOSED or loop is None:
            return
        now = loop.time()
        if self._busy:
            if self._handler_deadline is not None and now >= self._handler_deadline:
                self._expire_handler()
            else:
                self._last_activity = now  # the client waits for us, not we for it
        elif self._in_message:
            if now - self._last_activity >= config.data_timeout:
                self.log.info("timeout while reading a message")
                self._send_and_close(_R_TIMEOUT)
                return
            if config.min_data_rate and self._rate_too_low(now):
                self._send_and_close(_R_SLOW)
                return
        elif config.idle_timeout > 0 and now - self._last_activity >= config.idle_timeout:
            self.log.info("idle timeout")
            self._send_and_close(_R_TIMEOUT)
            return
        self._arm_timer()

    def _rate_too_low(self, now: float) -> bool:
        """A slowloris client: bytes trickle in just often enough to beat the data timeout.

        The rate is judged over the last ``data_rate_grace`` seconds (from the mark taken at
        a check at least that long ago), not over the whole message, so a fast start buys
        nothing: 33 MiB at once, then a byte every 25 s, is cut as soon as a window holds it.
        """
        marks = self._rate_marks
        if not marks:
            marks.append((self._message_started, 0))
        window = self.config.data_rate_grace
        while len(marks) > 1 and marks[1][0] <= now - window:
            marks.popleft()
        since, before = marks[0]
        marks.append((now, self._message_bytes))
        span = now - since
        received = self._message_bytes - before
        if span >= window and received < self.config.min_data_rate * span:
            self.log.info("data rate too low: %d bytes in the last %.0f s", received, span)
            return True
        return False

    def _expire_handler(self) -> None:
        """A handler took longer than its timeout: it is cancelled, the client gets 451."""
        task = self._handler_task
        self._handler_deadline = None
        if task is not None and not task.done():
            self.log.warning("handler timed out; cancelled")
            self._handler_timed_out = True
            task.cancel()


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


_COMMAND_METHODS: dict[str, Callable[[SmtpSession, Any], None]] = {
    "HELO": SmtpSession._on_helo,
    "EHLO": SmtpSession._on_ehlo,
    "LHLO": SmtpSession._on_lhlo,
    "MAIL": SmtpSession._on_mail,
    "RCPT": SmtpSession._on_rcpt,
    "DATA": SmtpSession._on_data,
    "RSET": SmtpSession._on_rset,
    "NOOP": SmtpSession._on_noop,
    "QUIT": SmtpSession._on_quit,
    "VRFY": SmtpSession._on_vrfy,
    "EXPN": SmtpSession._on_expn,
    "HELP": SmtpSession._on_help,
    "STARTTLS": SmtpSession._on_starttls,
    "AUTH": SmtpSession._on_auth,
}
