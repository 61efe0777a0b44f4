"""One SMTP connection: an ``asyncio.BufferedProtocol`` that raises an event per command.

The session is thin on purpose. Bytes arrive in a pooled buffer (``get_buffer`` /
``buffer_updated``), the parsing core turns a whole read into lines or message bytes in one
call, :mod:`._state` says whether a command may come now, :mod:`.commands` parses it, and the
command's :class:`~alephsmtp.events.Event` lets the user's handlers choose the reply. Handlers
may be plain functions (run inline, no task) or coroutines (run in a task while reading pauses,
so replies keep their order and memory stays bounded).

Lifetimes are kept apart: :class:`SessionConfig` (shared by every session of a server), the
connection (transport, peer, greeting exchange) and the transaction (envelope, message).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _state
from ._state import State
from .commands import (
    DataCommand,
    EhloCommand,
    ExpnCommand,
    HeloCommand,
    HelpCommand,
    MailCommand,
    NoopCommand,
    QuitCommand,
    RcptCommand,
    RsetCommand,
    SmtpCommand,
    VrfyCommand,
    parse_command,
)
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
    CommandEventArgs,
    ConnectionLostEventArgs,
    Event,
    EventArgs,
    HandlerResult,
    MessageReceivedEventArgs,
)
from .parser import BufferPool, DataReader, LineReader, split_command
from .replies import Reply, coerce_reply, default_enhanced_code

__all__ = ["OnSession", "SessionConfig", "SmtpSession"]

log = logging.getLogger("alephsmtp.session")

OnSession = Callable[["SmtpSession"], Awaitable[None] | None]
ArgsT = TypeVar("ArgsT", bound=EventArgs)

_session_ids = itertools.count(1)

# RFC 5321 4.5.3.1.4 gives 512 octets for a command line; each extension that adds to MAIL or
# RCPT adds its own octets: SIZE (RFC 1870 section 4: 26), BODY=8BITMIME (RFC 6152: 15),
# SMTPUTF8 (RFC 6531 3.4: 10).
COMMAND_LINE_BASE = 512
_SIZE_EXTRA = 26
_BODY_EXTRA = 15
_SMTPUTF8_EXTRA = 10


@dataclass(slots=True)
class SessionConfig:
    """What every session of one server shares: names, limits, policies, extensions.

    Every limit has an RFC-sized default; ``0`` turns a size limit off.
    """

    hostname: str = field(default_factory=socket.getfqdn)
    greeting: str | None = None  # default: "<hostname> ESMTP alephsmtp"
    max_message_size: int = 32 << 20  # RFC 1870 SIZE; 552 5.3.4 past it
    max_command_line_length: int = COMMAND_LINE_BASE  # before extension additions
    max_text_line_length: int = 0  # RFC 5321 4.5.3.1.6 says 1000; 0 accepts any (Postfix)
    max_recipients: int = 1000  # RFC 5321 4.5.3.1.8 asks for at least 100; 452 4.5.3 past it
    bare_newline: str = "reject"  # or "normalize" (Postfix smtpd_forbid_bare_newline)
    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: server timeout 5 minutes
    enhanced_status_codes: bool = True  # RFC 2034
    eightbitmime: bool = True  # RFC 6152
    smtputf8: bool = True  # RFC 6531
    pipelining: bool = True  # RFC 2920
    command_buffer_size: int = 16 << 10
    data_buffer_size: int = 256 << 10

    def __post_init__(self) -> None:
        if self.bare_newline not in ("reject", "normalize"):
            raise ValueError("bare_newline must be 'reject' or 'normalize'")
        for name in ("max_message_size", "max_text_line_length", "max_recipients"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_command_line_length < COMMAND_LINE_BASE:
            raise ValueError("max_command_line_length below RFC 5321's 512 octets")

    @property
    def command_line_limit(self) -> int:
        """The command line limit with what the offered extensions add."""
        limit = self.max_command_line_length + _SIZE_EXTRA
        if self.eightbitmime:
            limit += _BODY_EXTRA
        if self.smtputf8:
            limit += _SMTPUTF8_EXTRA
        return limit

    def ehlo_keywords(self) -> list[str]:
        """The EHLO keywords for what is on (RFC 5321 4.1.1.1, one per extension)."""
        keywords = []
        if self.pipelining:
            keywords.append("PIPELINING")
        keywords.append(f"SIZE {self.max_message_size}" if self.max_message_size else "SIZE")
        if self.eightbitmime:
            keywords.append("8BITMIME")
        if self.smtputf8:
            keywords.append("SMTPUTF8")
        if self.enhanced_status_codes:
            keywords.append("ENHANCEDSTATUSCODES")
        keywords.append("HELP")
        return keywords


class _Pools:
    """The two buffer pools a server's sessions share: small for commands, large for DATA."""

    __slots__ = ("command", "data")

    def __init__(self, config: SessionConfig) -> None:
        self.command = BufferPool(config.command_buffer_size, 64)
        self.data = BufferPool(config.data_buffer_size, 16)


# Replies the session sends on its own. Handlers may send any reply instead.
_R_OK = Reply(250, "2.0.0", "OK")
_R_MAIL_OK = Reply(250, "2.1.0", "OK")
_R_RCPT_OK = Reply(250, "2.1.5", "OK")
_R_DATA_GO = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
_R_QUEUED = Reply(250, "2.0.0", "OK: queued")
_R_BYE = Reply(221, "2.0.0", "Bye")
_R_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
_R_EXPN = Reply(502, "5.5.1", "EXPN not available")
_R_HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP")
_R_UNKNOWN = Reply(500, "5.5.1", "Error: command not recognized")
_R_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
_R_HANDLER_FAILED = Reply(451, "4.3.0", "Error: local error in processing")
_R_MESSAGE_HANDLER_FAILED = Reply(554, "5.3.0", "Error: message could not be processed")
_R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
_R_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
_R_UNKNOWN_PARAM = Reply(555, "5.5.4", "Error: parameter not recognized or not implemented")
_R_BAD_BODY = Reply(501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
_R_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
_R_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
_R_UNAVAILABLE = Reply(421, "4.3.0", "Service not available, closing connection")
_R_DATA_BARE = Reply(554, "5.5.2", "Error: message contains bare <CR> or <LF>")
_R_DATA_LINE = Reply(500, "5.5.6", "Error: message line too long")


def _error_reply(error: SmtpError) -> Reply:
    return Reply(error.code, error.enhanced, error.text)


class SmtpSession(asyncio.BufferedProtocol):
    """One client connection, with one :class:`~alephsmtp.events.Event` per command.

    ``session.helo += handler``; a handler ``handler(session, e)`` returns the reply (see
    :mod:`alephsmtp.events`). ``start_transaction(greeting)`` sends the greeting and starts
    reading; if the server's ``on_session`` returns without calling it, the session starts with
    the configured greeting.
    """

    # --- events (instance attributes, created in __init__) ---------------------------------
    helo: Event[CommandEventArgs[HeloCommand]]
    ehlo: Event[CommandEventArgs[EhloCommand]]
    mail: Event[CommandEventArgs[MailCommand]]
    rcpt: Event[CommandEventArgs[RcptCommand]]
    data: Event[CommandEventArgs[DataCommand]]
    rset: Event[CommandEventArgs[RsetCommand]]
    noop: Event[CommandEventArgs[NoopCommand]]
    quit: Event[CommandEventArgs[QuitCommand]]
    vrfy: Event[CommandEventArgs[VrfyCommand]]
    expn: Event[CommandEventArgs[ExpnCommand]]
    help: Event[CommandEventArgs[HelpCommand]]
    message_received: Event[MessageReceivedEventArgs]
    close_requested: Event[EventArgs]
    unhandled_command: Event[CommandEventArgs[SmtpCommand]]
    disconnected: Event[ConnectionLostEventArgs]

    def __init__(
        self,
        config: SessionConfig,
        on_session: OnSession | None = None,
        *,
        pools: _Pools | None = None,
        on_close: Callable[[SmtpSession], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.id = next(_session_ids)
        self._on_session = on_session
        self._on_close = on_close
        self._pools = pools if pools is not None else _Pools(config)
        for name in _EVENT_NAMES:
            setattr(self, name, Event(name))
        # connection
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = loop  # tests pass a fake clock
        self.peer: Any = None
        self.state = State.GREETING
        self.helo_name: str | None = None
        self.esmtp = False
        self._buffer: bytearray | None = None
        self._buffer_owner: BufferPool = self._pools.command
        self._lines: deque[bytes | SmtpError] = deque()
        self._line_reader = LineReader(config.command_line_limit, config.bare_newline)
        self._held = bytearray()  # bytes read while a handler runs, not yet scanned
        self._out: list[bytes] = []
        self._busy = False  # an async handler is running
        self._write_paused = False
        self._reading = True
        self._closing = False  # graceful shutdown asked for
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_activity = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        # transaction
        self.envelope: SmtpEnvelope | None = None
        self._data_reader: DataReader | None = None
        self._chunks: list[bytes] = []
        self._reply_cache: dict[Reply, bytes] = {}

    def __repr__(self) -> str:
        return f"<SmtpSession #{self.id} {self.peer!r} {self.state.value}>"

    # --- the public surface ------------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport (``None`` once closed)."""
        return self._transport

    def start_transaction(self, greeting: Reply | str | None = None) -> None:
        """Send the greeting (RFC 5321 4.3.1: 220) and start reading commands.

        A 554 greeting refuses the session: every command then gets 503 until QUIT
        (RFC 5321 3.1); the session closes after the client's QUIT.
        """
        if self._started or self._transport is None:
            return
        self._started = True
        if greeting is None:
            greeting = self.config.greeting or f"220 {self.config.hostname} ESMTP alephsmtp"
        reply = coerce_reply(greeting) if isinstance(greeting, str) else greeting
        self._write(reply)  # an enhanced code only if the greeting's author wrote one
        self.state = State.NEED_HELO if reply.code == 220 else State.GREETING
        if reply.code != 220:
            self._flush()
            self.close()
            return
        self._flush()
        self._arm_idle_timer()
        self._update_reading()

    def close(self) -> None:
        """Close the connection once what was written has been sent (the seed's Dispose)."""
        self.state = State.CLOSED
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._flush()
            transport.close()

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
        if self.state in (State.GREETING, State.NEED_HELO, State.READY) and not self._busy:
            self._send_and_close(_R_SHUTDOWN)

    @property
    def is_idle(self) -> bool:
        """No transaction open and no handler running."""
        return not self._busy and self.state in (State.GREETING, State.NEED_HELO, State.READY)

    # --- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.peer = transport.get_extra_info("peername")
        self._last_activity = self._loop.time()
        self._reading = True
        self._set_reading(False)  # nothing is read before the greeting (RFC 5321 3.1)
        log.debug("session %d: connected from %s", self.id, self.peer)
        on_session = self._on_session
        if on_session is None:
            self.start_transaction()
            return
        try:
            result = on_session(self)
        except Exception:
            log.exception("session %d: on_session handler failed", self.id)
            self._send_and_close(_R_UNAVAILABLE)
            return
        if inspect.isawaitable(result):
            self._spawn(self._start_after(result))
        else:
            self.start_transaction()

    async def _start_after(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("session %d: on_session handler failed", self.id)
            self._send_and_close(_R_UNAVAILABLE)
            return
        self.start_transaction()

    def get_buffer(self, sizehint: int) -> bytearray:
        buffer = self._buffer
        if buffer is None:
            # Small buffers for commands, large ones while a message streams in.
            self._buffer_owner = (
                self._pools.command if self._data_reader is None else self._pools.data
            )
            buffer = self._buffer = self._buffer_owner.acquire()
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer = self._buffer
        assert buffer is not None
        # The buffer goes back to the pool right after this read: an idle session holds no
        # read buffer at all, only the few bytes of an incomplete line.
        self._buffer = None
        try:
            with memoryview(buffer) as view, view[:nbytes] as data:
                self._receive(data)
        finally:
            self._buffer_owner.release(buffer)

    def eof_received(self) -> bool | None:
        self._release_buffer()
        # A half-closed client gets no more replies it could read; a partial message is
        # dropped (never delivered), and the connection closes.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_buffer()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        partial = self._data_reader is not None
        self.state = State.CLOSED
        self._transport = None
        self._data_reader = None
        self._chunks = []
        self._lines.clear()
        self._line_reader.take_pending()
        self._held.clear()
        if partial:
            log.info("session %d: connection lost during DATA; message discarded", self.id)
        log.debug("session %d: connection lost (%s)", self.id, exc or "closed")
        if self.disconnected:
            self._notify(self.disconnected, ConnectionLostEventArgs(exc))
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands until it does.
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # --- reading ----------------------------------------------------------------------------

    def _release_buffer(self) -> None:
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
        self._last_activity = self._loop.time()
        if self._busy or self.state is State.CLOSED:
            if self.state is not State.CLOSED:
                self._held += data
            return
        reader = self._data_reader
        if reader is not None:
            self._feed_message(reader, data)
        else:
            self._lines.extend(self._line_reader.feed(data))
        self._pump()

    def _pump(self) -> None:
        """Answer every complete command line, in order, until one needs to wait."""
        lines = self._lines
        while not self._busy and self.state is not State.CLOSED:
            if lines:
                self._handle_line(lines.popleft())
            elif self._held:
                held = bytes(self._held)
                self._held.clear()
                if self._data_reader is not None:
                    self._feed_message(self._data_reader, held)
                else:
                    lines.extend(self._line_reader.feed(held))
            elif self._data_reader is None and self._line_reader.pending:
                # Scanning stopped after DATA/BDAT/STARTTLS that was then refused: go on.
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
        if not isinstance(line, bytes):
            self._write(_error_reply(line))
            return
        verb = split_command(line)[0].decode("ascii", "replace")
        refusal = _state.check(self.state, verb)
        if refusal is not None:
            self._write(refusal)
            return
        try:
            command = parse_command(line, smtputf8=self._smtputf8_transaction)
        except CommandSyntaxError as error:
            self._write(_error_reply(error))
            return
        method = _COMMAND_METHODS.get(command.verb)
        if method is None:
            self._dispatch(
                self.unhandled_command,
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

    def _on_helo(self, command: HeloCommand) -> None:
        default = Reply(250, "", self.config.hostname)
        self._dispatch(
            self.helo,
            CommandEventArgs(command),
            "HELO",
            default,
            lambda verb, reply: self._finish_hello(command, reply, esmtp=False),
        )

    def _on_ehlo(self, command: EhloCommand) -> None:
        default = Reply(250, "", self.config.hostname)
        self._dispatch(
            self.ehlo,
            CommandEventArgs(command),
            "EHLO",
            default,
            lambda verb, reply: self._finish_hello(command, reply, esmtp=True),
        )

    def _finish_hello(self, command: HeloCommand | EhloCommand, reply: Reply, esmtp: bool) -> None:
        if reply.code // 100 == 2:
            # RFC 5321 4.1.4: HELO/EHLO resets the transaction. The EHLO reply lists exactly
            # the extensions this session serves, whatever the handler's text (4.1.1.1).
            self._reset_transaction()
            self.helo_name = command.client_hostname
            self.esmtp = esmtp
            if esmtp:
                reply = Reply(reply.code, "", (reply.lines[0], *self.config.ehlo_keywords()))
            else:
                reply = Reply(reply.code, "", reply.lines)
        accepted = reply.code // 100 == 2
        self.state = _state.advance(self.state, command.verb, accepted)
        # RFC 2034: enhanced codes come after the client learnt of them; a refusal has one.
        self._write(reply, enhanced=not accepted)

    def _on_mail(self, command: MailCommand) -> None:
        refusal = self._check_mail_parameters(command)
        if refusal is not None:
            self._write(refusal)
            return
        self._dispatch(
            self.mail,
            CommandEventArgs(command),
            "MAIL",
            _R_MAIL_OK,
            lambda verb, reply: self._finish_mail(command, reply),
        )

    def _check_mail_parameters(self, command: MailCommand) -> Reply | None:
        config = self.config
        for key in command.parameters:
            if key == "SIZE":
                size = command.size
                # RFC 1870 6.1: a declared size over the limit is refused at MAIL.
                if size is not None and config.max_message_size and size > config.max_message_size:
                    return _R_TOO_BIG
            elif key == "BODY" and config.eightbitmime:
                if command.body not in ("7BIT", "8BITMIME"):
                    return _R_BAD_BODY
            elif key == "SMTPUTF8" and config.smtputf8:
                pass
            else:
                return _R_UNKNOWN_PARAM
        return None

    def _finish_mail(self, command: MailCommand, reply: Reply) -> None:
        accepted = reply.code // 100 == 2
        if accepted:
            self.envelope = SmtpEnvelope(
                return_path=command.return_path,
                mail_parameters=dict(command.parameters),
                helo_name=self.helo_name,
                peer=self.peer,
                smtputf8=command.smtputf8 and self.config.smtputf8,
                body_type=command.body,
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
        if command.parameters:
            self._write(_R_UNKNOWN_PARAM)
            return
        self._dispatch(
            self.rcpt,
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
        self.state = _state.advance(self.state, "RCPT", accepted)
        self._write(reply)

    def _on_data(self, command: DataCommand) -> None:
        self._dispatch(self.data, CommandEventArgs(command), "DATA", _R_DATA_GO, self._finish_data)

    def _finish_data(self, verb: str, reply: Reply) -> None:
        if reply.code != 354:
            self._write(reply)
            return
        self._write(reply)
        self._flush()
        self.state = State.DATA
        config = self.config
        self._data_reader = reader = DataReader(
            config.max_message_size, config.max_text_line_length, config.bare_newline
        )
        pending = self._line_reader.take_pending()
        if pending:
            self._feed_message(reader, pending)

    def _feed_message(self, reader: DataReader, data: memoryview | bytes) -> None:
        chunk = reader.feed(data)
        if chunk:
            self._chunks.append(chunk)
        if reader.done:
            self._data_reader = None
            trailing = reader.trailing
            self._end_of_message(reader)
            if trailing:
                # Pipelined commands after the end of data (RFC 2920): scanned after the
                # message's reply, in order.
                if self._busy:
                    self._held += trailing
                else:
                    self._lines.extend(self._line_reader.feed(trailing))

    def _end_of_message(self, reader: DataReader) -> None:
        message = b"".join(self._chunks)
        self._chunks = []
        error = reader.error
        envelope = self.envelope
        if error is not None or envelope is None:
            # Read to the end mark, so the session is in sync; never delivered.
            if isinstance(error, MessageTooLarge):
                reply = _R_TOO_BIG
            elif isinstance(error, (BareLineFeed, BareCarriageReturn)):
                reply = _R_DATA_BARE
            elif isinstance(error, LineTooLong):
                reply = _R_DATA_LINE
            else:
                reply = _error_reply(error) if error is not None else _R_HANDLER_FAILED
            log.info("session %d: message refused: %s", self.id, reply)
            self._finish_message("DATA", reply)
            return
        envelope.message = message
        self._dispatch(
            self.message_received,
            MessageReceivedEventArgs(envelope, message),
            "DATA",
            _R_QUEUED,
            self._finish_message,
            failure=_R_MESSAGE_HANDLER_FAILED,
        )

    def _finish_message(self, verb: str, reply: Reply) -> None:
        self._reset_transaction()
        self.state = _state.end_of_message(self.state)
        self._write(reply)

    def _on_rset(self, command: RsetCommand) -> None:
        self._dispatch(self.rset, CommandEventArgs(command), "RSET", _R_OK, self._finish_rset)

    def _finish_rset(self, verb: str, reply: Reply) -> None:
        accepted = reply.code // 100 == 2
        if accepted:
            self._reset_transaction()
        self.state = _state.advance(self.state, "RSET", accepted)
        self._write(reply)

    def _on_noop(self, command: NoopCommand) -> None:
        self._dispatch(self.noop, CommandEventArgs(command), "NOOP", _R_OK, self._finish_simple)

    def _on_vrfy(self, command: VrfyCommand) -> None:
        self._dispatch(self.vrfy, CommandEventArgs(command), "VRFY", _R_VRFY, self._finish_simple)

    def _on_expn(self, command: ExpnCommand) -> None:
        self._dispatch(self.expn, CommandEventArgs(command), "EXPN", _R_EXPN, self._finish_simple)

    def _on_help(self, command: HelpCommand) -> None:
        self._dispatch(self.help, CommandEventArgs(command), "HELP", _R_HELP, self._finish_simple)

    def _on_quit(self, command: QuitCommand) -> None:
        self._dispatch(self.quit, CommandEventArgs(command), "QUIT", _R_BYE, self._finish_quit)

    def _finish_quit(self, verb: str, reply: Reply) -> None:
        # RFC 5321 4.1.1.10: the server MUST send an OK reply and then close.
        self._write(reply)
        self._flush()
        self.state = State.CLOSED
        if self.close_requested:
            self._notify(self.close_requested, EventArgs())
        self.close()

    def _on_not_implemented(self, command: SmtpCommand) -> None:
        self._write(_R_NOT_IMPLEMENTED)

    def _finish_simple(self, verb: str, reply: Reply) -> None:
        self._write(reply)

    def _reset_transaction(self) -> None:
        self.envelope = None
        self._chunks = []

    # --- handlers ---------------------------------------------------------------------------

    def _dispatch(
        self,
        event: Event[ArgsT],
        args: ArgsT,
        verb: str,
        default: Reply,
        finish: Callable[[str, Reply], None],
        failure: Reply = _R_HANDLER_FAILED,
    ) -> None:
        """Run ``event``'s handlers and ``finish(verb, reply)`` with the reply they chose.

        Synchronous handlers run inline. The first awaitable moves the rest into a task; the
        session stops reading until it is done, so replies stay in order (RFC 2920 3.1).
        A handler that raises, or answers something that is not a valid reply, is logged with
        its traceback and the client gets ``failure`` (451 4.3.0; 554 5.3.0 after DATA).
        """
        handlers = event.handlers
        if not handlers:
            finish(verb, default)
            return
        try:
            for index, handler in enumerate(handlers):
                result = handler(self, args)
                if inspect.isawaitable(result):
                    self._busy = True
                    self._flush()
                    self._update_reading()
                    self._spawn(
                        self._dispatch_async(
                            result, handlers[index + 1 :], args, verb, default, finish, failure
                        )
                    )
                    return
                if result is not None:
                    break
            else:
                result = None
            reply = self._to_reply(result, verb, default)
        except Exception:
            log.exception("session %d: %s handler failed", self.id, event.name)
            reply = failure
        finish(verb, reply)

    async def _dispatch_async(
        self,
        pending: Awaitable[Reply | str | None],
        rest: tuple[Callable[[Any, ArgsT], HandlerResult], ...],
        args: ArgsT,
        verb: str,
        default: Reply,
        finish: Callable[[str, Reply], None],
        failure: Reply,
    ) -> None:
        try:
            result: HandlerResult = await pending
            for handler in rest:
                if result is not None:
                    break
                result = handler(self, args)
                if inspect.isawaitable(result):
                    result = await result
            assert not inspect.isawaitable(result)
            reply = self._to_reply(result, verb, default)
        except Exception:
            log.exception("session %d: %s handler failed", self.id, verb)
            reply = failure
        self._busy = False
        if self.state is State.CLOSED or self._transport is None:
            return
        finish(verb, reply)
        self._update_reading()
        self._pump()

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

    def _notify(self, event: Event[ArgsT], args: ArgsT) -> None:
        """Raise an event whose handlers' results are not replies (close, connection lost)."""
        for handler in event.handlers:
            try:
                result = handler(self, args)
                if inspect.isawaitable(result):
                    self._spawn(_ignore_result(result, self.id, event.name))
            except Exception:
                log.exception("session %d: %s handler failed", self.id, event.name)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- writing ----------------------------------------------------------------------------

    def _write(self, reply: Reply, enhanced: bool = True) -> None:
        key = reply if enhanced else Reply(reply.code, "", reply.text)
        try:
            data = self._reply_cache.get(key)
        except TypeError:  # unhashable text (a list): not cached
            data = None
        if data is None:
            data = key.to_bytes(self.config.enhanced_status_codes)
            if len(self._reply_cache) < 64:
                with contextlib.suppress(TypeError):
                    self._reply_cache[key] = data
        self._out.append(data)

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

    def _arm_idle_timer(self) -> None:
        timeout = self.config.idle_timeout
        if timeout <= 0 or self._loop is None:
            return
        # One timer per timeout period, not one per read: a read only stamps the time, and
        # the timer re-arms itself for what is left (cheap on a busy connection).
        remaining = self._last_activity + timeout - self._loop.time()
        self._idle_handle = self._loop.call_later(max(remaining, 0.0), self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self._idle_handle = None
        if self.state is State.CLOSED or self._loop is None:
            return
        if self._busy:
            # The client waits for us, not we for it.
            self._last_activity = self._loop.time()
        if self._loop.time() - self._last_activity >= self.config.idle_timeout:
            log.info("session %d: idle timeout", self.id)
            self._send_and_close(_R_TIMEOUT)
            return
        self._arm_idle_timer()


async def _ignore_result(awaitable: Awaitable[Any], session_id: int, name: str) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("session %d: %s handler failed", session_id, name)


_EVENT_NAMES = (
    "helo",
    "ehlo",
    "mail",
    "rcpt",
    "data",
    "rset",
    "noop",
    "quit",
    "vrfy",
    "expn",
    "help",
    "message_received",
    "close_requested",
    "unhandled_command",
    "disconnected",
)

_COMMAND_METHODS: dict[str, Callable[[SmtpSession, Any], None]] = {
    "HELO": SmtpSession._on_helo,
    "EHLO": SmtpSession._on_ehlo,
    "MAIL": SmtpSession._on_mail,
    "RCPT": SmtpSession._on_rcpt,
    "DATA": SmtpSession._on_data,
    "RSET": SmtpSession._on_rset,
    "NOOP": SmtpSession._on_noop,
    "QUIT": SmtpSession._on_quit,
    "VRFY": SmtpSession._on_vrfy,
    "EXPN": SmtpSession._on_expn,
    "HELP": SmtpSession._on_help,
    "STARTTLS": SmtpSession._on_not_implemented,
    "AUTH": SmtpSession._on_not_implemented,
    "BDAT": SmtpSession._on_not_implemented,
    "LHLO": SmtpSession._on_not_implemented,
}
