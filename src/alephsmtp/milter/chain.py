"""Milters in alephsmtp sessions: each SMTP event goes to the configured milters, in order, and
their verdicts become the replies, as Postfix's ``smtpd_milters`` does.

``Milters([...]).attach(session)`` adds one handler per event through the session's public
events, before the user's handlers (``Event.prepend``), so that a milter's verdict comes first
(the first reply decides) whenever ``attach`` is called in ``on_session``. A milter that says
"continue" lets the next milter, then the user's handlers, decide. The message's header and body
edits are applied before ``message_received``'s later handlers see it (``e.message``), the
envelope edits to the envelope, and the whole story goes on ``envelope.milter``
([`MilterReport`][alephsmtp.milter.report.MilterReport]).

The semantics follow Postfix's ``milter8.c`` and ``smtpd.c``, so that one milter behaves the
same behind either MTA; where alephsmtp differs, docs/milter.md says so.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from alephsmtp import __version__
from alephsmtp import replies as R
from alephsmtp.addresses import Address, decode_xtext, parse_parameters, parse_path
from alephsmtp.errors import CommandSyntaxError
from alephsmtp.events import MessageDiscardedEventArgs
from alephsmtp.replies import Reply

from .client import (
    Endpoint,
    MilterConnection,
    MilterError,
    MilterProtocolError,
)
from .message import HeaderScanner, milter_value
from .message import apply as apply_edits
from .protocol import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    MAX_BODY_CHUNK,
    SMFIA_INET,
    SMFIA_INET6,
    SMFIA_UNIX,
    SMFIA_UNKNOWN,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MAIL,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    Accept,
    AddRecipient,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    MacroStage,
    Modification,
    Negotiate,
    Negotiated,
    Progress,
    ProtocolError,
    Quarantine,
    Reject,
    ReplaceBody,
    ReplyCode,
    Shutdown,
    Skip,
    Step,
    Tempfail,
    encode_abort,
    encode_body,
    encode_connect,
    encode_data,
    encode_end_of_body,
    encode_end_of_headers,
    encode_header,
    encode_helo,
    encode_macros,
    encode_mail,
    encode_negotiate,
    encode_quit,
    encode_rcpt,
    encode_unknown,
    negotiate,
)
from .report import MilterEdit, MilterReport, MilterVerdict

if TYPE_CHECKING:
    from alephsmtp.session import SmtpSession

__all__ = ["DefaultAction", "Milter", "MilterSession", "Milters"]

log = logging.getLogger("alephsmtp.milter")

DefaultAction = Literal["tempfail", "accept", "reject"]
_DEFAULT_ACTIONS = ("tempfail", "accept", "reject")

# Replies, as Postfix gives them (milter8.c, smtpd.c).
_R_FAILED = {"tempfail": R.MILTER_UNAVAILABLE, "reject": R.MILTER_UNAVAILABLE_REJECT}


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Milter:
    """One milter: its socket (``inet:127.0.0.1:11332``, ``unix:/run/opendkim.sock``, ...) and,
    if not the [`Milters`][alephsmtp.milter.chain.Milters] defaults, its own failure policy and time
    limits (Postfix's per-milter ``{ inet:..., default_action = accept }``). ``name`` labels it in
    logs and in ``envelope.milter`` (default: the endpoint)."""

    endpoint: str
    default_action: DefaultAction | None = None
    connect_timeout: float | None = None
    command_timeout: float | None = None
    content_timeout: float | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class _Config:
    endpoint: Endpoint
    name: str
    default_action: str
    connect_timeout: float
    command_timeout: float
    content_timeout: float


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stage:
    """One kind of event: its command, the flag that leaves it out (``SMFIP_NO*``), the flag
    that leaves its reply out (``SMFIP_NR_*``), its macro stage, and whether it is about the
    message content (content timeout) or the connection (accept/reject last the session)."""

    index: int
    name: str
    command: bytes
    no_send: int
    no_reply: int
    macros: MacroStage | None
    content: bool = False
    connection: bool = False


_CONNECT = _Stage(
    0,
    "connect",
    SMFIC_CONNECT,
    int(Step.NOCONNECT),
    int(Step.NR_CONN),
    MacroStage.CONNECT,
    connection=True,
)
_HELO = _Stage(
    1, "helo", SMFIC_HELO, int(Step.NOHELO), int(Step.NR_HELO), MacroStage.HELO, connection=True
)
_MAIL = _Stage(2, "mail", SMFIC_MAIL, int(Step.NOMAIL), int(Step.NR_MAIL), MacroStage.ENVFROM)
_RCPT = _Stage(3, "rcpt", SMFIC_RCPT, int(Step.NORCPT), int(Step.NR_RCPT), MacroStage.ENVRCPT)
_DATA = _Stage(4, "data", SMFIC_DATA, int(Step.NODATA), int(Step.NR_DATA), MacroStage.DATA)
_UNKNOWN = _Stage(5, "unknown", SMFIC_UNKNOWN, int(Step.NOUNKNOWN), int(Step.NR_UNKN), None)
_HEADER = _Stage(6, "header", SMFIC_HEADER, int(Step.NOHDRS), int(Step.NR_HDR), None, content=True)
_EOH = _Stage(
    7, "end-of-header", SMFIC_EOH, int(Step.NOEOH), int(Step.NR_EOH), MacroStage.EOH, content=True
)
_BODY = _Stage(8, "body", SMFIC_BODY, int(Step.NOBODY), int(Step.NR_BODY), None, content=True)
_EOM = _Stage(9, "end-of-message", SMFIC_BODYEOB, 0, 0, MacroStage.EOM, content=True)

_LEADSPC = int(Step.HDR_LEADSPC)
_STAGES = (_CONNECT, _HELO, _MAIL, _RCPT, _DATA, _UNKNOWN, _HEADER, _EOH, _BODY, _EOM)

# The macros sent before each event unless the milter asked for others (Postfix's defaults,
# milter_*_macros, plus the client's address and port at connect).
_DEFAULT_MACROS: dict[MacroStage, tuple[str, ...]] = {
    MacroStage.CONNECT: (
        "j",
        "{daemon_name}",
        "{daemon_addr}",
        "{daemon_port}",
        "v",
        "_",
        "{client_addr}",
        "{client_port}",
        "{client_name}",
        "{client_ptr}",
    ),
    MacroStage.HELO: (
        "{tls_version}",
        "{cipher}",
        "{cipher_bits}",
        "{cert_subject}",
        "{cert_issuer}",
    ),
    MacroStage.ENVFROM: (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
    ),
    MacroStage.ENVRCPT: ("i", "{rcpt_addr}", "{rcpt_host}"),
    MacroStage.DATA: ("i",),
    MacroStage.EOH: ("i",),
    MacroStage.EOM: ("i",),
}

# Outcomes of one event at one milter.
_CONTINUE = "continue"
_ACCEPT = "accept"
_REJECT = "reject"  # with a reply (4xx or 5xx)
_DISCARD = "discard"
_SHUTDOWN = "shutdown"
_SKIP = "skip"

# Link states (Postfix's MILTER8_STAT_*).
_CLOSED = 0  # not connected (yet)
_READY = 1  # in the session: events go to it
_ACCEPT_CON = 2  # accepted the connection: no more events
_ACCEPT_MSG = 3  # accepted this message: no more events until the next one
_REJECT_CON = 4  # refused the connection: its reply answers every command that can be refused
_ERROR = 5  # failed: its reply (per default_action) answers likewise; none for "accept"

# Tasks of the user's async message_discarded handlers, held until done (the loop keeps only
# weak references).
_background: set[asyncio.Future[Any]] = set()

_SMTP_REPLY_LINE = re.compile(r"[45]\d\d(?:[ -]|\Z)")


def _milter_reply(text: str) -> Reply:
    """An ``SMFIR_REPLYCODE`` text as a reply, checked as Postfix checks it: 4xx or 5xx on
    every line, CRLF between lines; Sendmail's doubled ``%%`` is one ``%``, a lone one goes."""
    lines = text.split("\r\n")
    for line in lines:
        if not _SMTP_REPLY_LINE.match(line):
            raise ProtocolError(f"malformed reply from the milter: {text!r}")
    text = re.sub(r"%(.?)", lambda m: "%" if m.group(1) == "%" else m.group(1), text)
    try:
        return Reply.parse(text)
    except ValueError as error:
        raise ProtocolError(f"malformed reply from the milter: {error}") from None


class _Link:
    """One milter in one session: its connection, what was negotiated, where it stands."""

    __slots__ = (
        "config",
        "connection",
        "in_transaction",
        "leading_space",
        "macro_names",
        "options",
        "pending",
        "plan",
        "reply",
        "resync",
        "skip",
        "state",
    )

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.connection: MilterConnection | None = None
        self.options: Negotiated | None = None
        self.state = _CLOSED
        self.reply: Reply | None = None  # what it answers for good (_REJECT_CON, _ERROR)
        self.skip: _Stage | None = None  # SMFIR_SKIP: leave out further events of this kind
        self.in_transaction = False  # it saw MAIL (or more) and no end of message or abort
        self.resync = False  # an early verdict may have left answers in flight: reconnect
        self.pending: list[_Stage] = []  # events sent whose answers are still to be read
        self.leading_space = False  # SMFIP_HDR_LEADSPC: header values keep their blank
        # Per stage (by index), worked out once from the negotiation: (not in the milter's
        # protocol version, sent, answered), and the macro names to send before it.
        self.plan: list[tuple[bool, bool, bool]] | None = None
        self.macro_names: list[tuple[str, ...]] = []

    def negotiated(self, options: Negotiated) -> None:
        self.options = options
        # Plain ints: IntFlag arithmetic costs a call per operation.
        skipped, protocol = int(options.skipped), int(options.protocol)
        self.leading_space = bool(protocol & _LEADSPC)
        self.plan = [
            (
                bool(skipped & stage.no_send),
                not protocol & stage.no_send,
                not protocol & stage.no_reply,
            )
            for stage in _STAGES
        ]
        self.macro_names = [
            (options.macros.get(stage.macros) or _DEFAULT_MACROS[stage.macros])
            if stage.macros is not None
            else ()
            for stage in _STAGES
        ]

    @property
    def name(self) -> str:
        return self.config.name

    def abort_transaction(self) -> None:
        """SMFIC_ABORT if a transaction is open at the milter (it gets no reply)."""
        if self.in_transaction:
            self.in_transaction = False
            if self.connection is not None and self.state in (_READY, _ACCEPT_MSG):
                self.connection.send(encode_abort())
        if self.state == _ACCEPT_MSG:
            self.state = _READY

    def close(self) -> None:
        connection = self.connection
        if connection is not None and not connection.closed:
            if self.state in (_READY, _ACCEPT_MSG):
                connection.send(encode_quit())
            connection.close()


class _Feed:
    """The message on its way to one milter: header fields, end of header, body chunks."""

    __slots__ = ("body", "done", "edits", "eoh_sent", "open_line", "scanner")

    def __init__(self) -> None:
        self.scanner = HeaderScanner()
        self.body = bytearray()  # body bytes not sent yet (less than one chunk)
        self.open_line = False  # the body so far does not end with LF
        self.eoh_sent = False
        self.edits: list[Modification] = []  # the milter's end-of-message edits
        self.done: tuple[str, Reply | None] | None = None  # the milter decided before the end


class _Transaction:
    """One mail transaction as the milters see it."""

    __slots__ = (
        "data_reply",
        "data_sent",
        "discard",
        "edits",
        "feeds",
        "quarantine",
        "queue_id",
        "streamed",
        "verdicts",
    )

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        self.discard = False
        self.quarantine: str | None = None
        self.verdicts: list[MilterVerdict] = []
        self.edits: list[MilterEdit] = []
        self.data_sent = False
        self.data_reply: Reply | None = None  # a milter refused DATA (streamed BDAT)
        self.streamed = False
        self.feeds: dict[int, _Feed] = {}


# --- the milters of a server, and of one session -----------------------------------------------


class Milters:
    """The milters every session goes through, in order (Postfix's ``smtpd_milters``).

    ``Milters(["inet:127.0.0.1:11332", Milter("unix:/run/opendkim.sock", default_action=
    "accept")], default_action="tempfail")``. In ``on_session``, first of all,
    ``milters.attach(session)`` (or ``await milters.attach(session)`` in an ``async``
    ``on_session``, so that a milter that refuses the connection refuses it at the greeting);
    or hand ``milters.wrap(on_session)`` to the server.

    ``default_action`` says what a milter that cannot be used means (it does not answer in
    time, closes, or breaks the protocol): ``"tempfail"`` (``451 4.7.1`` to the command it
    failed at and to every later command it would see, so the client retries), ``"accept"``
    (go on without it) or ``"reject"`` (``550 5.5.0``). Timeouts, as Postfix's: connecting,
    each command's answer, each answer while the message content goes through.
    """

    def __init__(
        self,
        milters: Sequence[str | Milter],
        *,
        default_action: DefaultAction = "tempfail",
        connect_timeout: float = 30.0,
        command_timeout: float = 30.0,
        content_timeout: float = 300.0,
        daemon_name: str = "alephsmtp",
    ) -> None:
        if default_action not in _DEFAULT_ACTIONS:
            raise ValueError(f"default_action must be one of {_DEFAULT_ACTIONS}")
        configs = []
        for item in milters:
            milter = item if isinstance(item, Milter) else Milter(item)
            action = milter.default_action or default_action
            if action not in _DEFAULT_ACTIONS:
                raise ValueError(f"default_action must be one of {_DEFAULT_ACTIONS}")
            configs.append(
                _Config(
                    Endpoint.parse(milter.endpoint),
                    milter.name or milter.endpoint,
                    action,
                    milter.connect_timeout or connect_timeout,
                    milter.command_timeout or command_timeout,
                    milter.content_timeout or content_timeout,
                )
            )
        self.configs: tuple[_Config, ...] = tuple(configs)
        self.daemon_name = daemon_name

    def attach(self, session: SmtpSession) -> MilterSession:
        """Put the milters in front of ``session``'s handlers and start connecting to them.

        Call it before adding handlers of your own. Awaiting the result waits for the connect
        stage and refuses the session at the greeting if a milter refused it.
        """
        return MilterSession(self, session)

    def wrap(
        self, on_session: Callable[[SmtpSession], Awaitable[None] | None] | None = None
    ) -> Callable[[SmtpSession], Awaitable[None]]:
        """An ``on_session`` for ``SmtpServer``: the milters first (the greeting waits for their
        connect stage), then ``on_session``."""

        async def on_milter_session(session: SmtpSession) -> None:
            # The connect stage runs here, in the session's own on_session task: no task of
            # its own, as no command can come before the greeting.
            milters = MilterSession(self, session, start=False)
            await milters._connect()
            await milters._greet()
            if milters.refused:
                return
            if on_session is not None:
                result = on_session(session)
                if inspect.isawaitable(result):
                    await result

        return on_milter_session


class MilterSession:
    """The milters of one SMTP session (made by
    [`Milters.attach()`][alephsmtp.milter.chain.Milters.attach])."""

    def __init__(self, milters: Milters, session: SmtpSession, *, start: bool = True) -> None:
        self.milters = milters
        self.session = session
        self.refused = False  # the greeting refused the session for a milter
        self._links = [_Link(config) for config in milters.configs]
        self._macros: dict[str, str] = {}
        self._session_verdicts: list[MilterVerdict] = []
        self._transaction: _Transaction | None = None
        self._streaming = False  # our message_chunk handler is on the session
        self._helo: str | None = None  # the last HELO/EHLO name (shown again on reconnection)
        self._closed = False
        self._connected: asyncio.Task[None] | None = None
        # Before the user's handlers, whenever they were added: a milter's verdict decides
        # first (the first reply wins); "continue" lets the user's handlers answer.
        session.helo.prepend(self._on_helo)
        session.ehlo.prepend(self._on_helo)
        session.lhlo.prepend(self._on_helo)
        session.mail.prepend(self._on_mail)
        session.rcpt.prepend(self._on_rcpt)
        session.data.prepend(self._on_data)
        session.bdat.prepend(self._on_bdat)
        session.rset.prepend(self._on_rset)
        session.vrfy.prepend(self._on_other)
        session.expn.prepend(self._on_other)
        session.starttls.prepend(self._on_other)
        session.unhandled_command.prepend(self._on_unknown)
        session.message_received.prepend(self._on_message)
        session.message_discarded += self._on_discarded
        session.disconnected += self._on_disconnected
        if self._links and start:
            self._connected = asyncio.get_running_loop().create_task(self._connect())

    def __await__(self) -> Generator[Any, None, None]:
        return self._greet().__await__()

    async def _greet(self) -> None:
        """The connect stage is over: refuse the session at the greeting if a milter did
        (Postfix: 554 for a 5xx, 421 for a shutdown; a 4xx answers the commands later)."""
        if self._connected is not None:
            await asyncio.shield(self._connected)
        hostname = self.session.config.hostname
        for link in self._links:
            reply = link.reply if link.state in (_REJECT_CON, _ERROR) else None
            if reply is None:
                continue
            if reply.code == 421:
                self.refused = True
                self.session.start_transaction(
                    Reply(421, "4.7.0", f"{hostname} Service unavailable - try again later")
                )
                return
            if reply.code // 100 == 5:
                self.refused = True
                self.session.start_transaction(
                    Reply(554, "5.7.1", f"{hostname} ESMTP not accepting connections")
                )
                return

    # --- the connect stage ------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect, negotiate and report the connection to each milter in turn; one that
        refuses the connection ends the stage (Postfix's milter_conn_event)."""
        self._macros.update(self._connection_macros())
        packet = self._connect_packet()
        try:
            for link in self._links:
                if self._closed:
                    return
                outcome = await self._connect_link(link, packet)
                if outcome in (_REJECT, _SHUTDOWN):
                    return
        finally:
            if self._closed:
                # The client left while a milter was being connected: close what came up.
                for link in self._links:
                    link.close()

    async def _connect_link(self, link: _Link, packet: bytes) -> str:
        try:
            await self._open(link)
        except MilterError as error:
            self._failed(link, _CONNECT, error, None)
            return _REJECT if link.reply is not None else _CONTINUE
        outcome, _ = await self._event(link, _CONNECT, packet, None)
        return outcome

    async def _open(self, link: _Link) -> None:
        config = link.config
        link.connection = connection = await MilterConnection.open(
            config.endpoint, config.connect_timeout
        )
        connection.send(encode_negotiate())
        answer = await connection.response(config.command_timeout)
        if not isinstance(answer, Negotiate):
            raise MilterProtocolError(f"milter {link.name}: {answer!r} instead of negotiation")
        try:
            link.negotiated(negotiate(answer, ALL_ACTIONS, ALL_PROTOCOL))
        except ProtocolError as error:
            raise MilterProtocolError(f"milter {link.name}: {error}") from None
        link.state = _READY

    def _connection_macros(self) -> dict[str, str]:
        session = self.session
        macros = {
            "j": session.config.hostname,
            "{daemon_name}": self.milters.daemon_name,
            "v": f"alephsmtp {__version__}",
            "{client_name}": "unknown",
            "{client_ptr}": "unknown",
        }
        transport = session.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            macros["{daemon_addr}"] = str(sockname[0])
            macros["{daemon_port}"] = str(sockname[1])
        host, port = self._client()
        if host:
            macros["{client_addr}"] = host
            macros["{client_port}"] = str(port)
            macros["_"] = f"unknown [{host}]"
        return macros

    def _client(self) -> tuple[str, int]:
        peer = self.session.peer
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0]), int(peer[1])
        return "", 0

    def _connect_packet(self) -> bytes:
        host, port = self._client()
        if not host:
            peer = self.session.peer
            if isinstance(peer, str) and peer:
                return encode_connect("localhost", SMFIA_UNIX, 0, peer)
            return encode_connect("unknown", SMFIA_UNKNOWN)
        try:
            version = ipaddress.ip_address(host.partition("%")[0]).version
        except ValueError:
            return encode_connect("unknown", SMFIA_UNKNOWN)
        # No client name is looked up: the milter gets "[address]", as Postfix sends for a
        # client whose name is unknown.
        family = SMFIA_INET if version == 4 else SMFIA_INET6
        return encode_connect(f"[{host}]", family, port, host)

    def _wait(self) -> Awaitable[None] | None:
        """The connect stage, if it is still running."""
        connected = self._connected
        if connected is None or connected.done():
            return None
        return asyncio.shield(connected)

    # --- one event at one milter ------------------------------------------------------------

    async def _event(
        self,
        link: _Link,
        stage: _Stage,
        packet: bytes,
        edits: list[Modification] | None,
    ) -> tuple[str, Reply | None]:
        """Send one event (its macros first) and read the milter's answer, as milter8_event.

        A failure (no answer, closed, protocol broken) applies the milter's default action.
        """
        return await self._batch(link, [(stage, packet)], edits)

    async def _batch(
        self,
        link: _Link,
        events: Sequence[tuple[_Stage, bytes]],
        edits: list[Modification] | None,
    ) -> tuple[str, Reply | None]:
        """Send events to one milter in one write and read their answers in order; the first
        answer that is not "continue" ends it. A milter that fails gets its default action.

        The message content goes this way (header fields, end of header, body chunks, end of
        message): one round trip instead of one per field. libmilter answers each event until
        it decides, then ignores the rest of the message (its state machine goes back to HELO),
        so the answers stay in step; a filter that answered the rest anyway would not, so after
        an early verdict the connection is made afresh before its next use.
        """
        if link.pending:
            await self._settle(link)
        state = link.state
        if state in (_ERROR, _REJECT_CON):
            return (_REJECT, link.reply) if link.reply is not None else (_CONTINUE, None)
        if state in (_CLOSED, _ACCEPT_CON):
            return _CONTINUE, None
        if state == _ACCEPT_MSG and not events[0][0].connection:
            return _CONTINUE, None
        progress = [events[0][0]]  # the event whose answer is awaited (for the failure report)
        try:
            if link.resync:
                await self._reopen(link)
                if link.state != _READY:
                    return await self._batch(link, events, edits)
            return await self._exchange(link, events, edits, progress)
        except (MilterError, ProtocolError) as error:
            return self._failed(link, progress[0], error, edits)
        except asyncio.CancelledError:
            # The session gave up on us (handler timeout, or it is closing): the milter is
            # somewhere in its answer, so nothing more can be read from it.
            self._failed(link, progress[0], MilterError("cancelled"), edits)
            raise

    async def _exchange(
        self,
        link: _Link,
        events: Sequence[tuple[_Stage, bytes]],
        edits: list[Modification] | None,
        progress: list[_Stage],
    ) -> tuple[str, Reply | None]:
        """[`_batch()`][alephsmtp.milter.chain.MilterSession._batch] without the failure policy: a
        failure raises."""
        connection = link.connection
        plan = link.plan
        assert connection is not None and plan is not None
        out: list[bytes] = []
        waiting: list[_Stage] = []  # the events that get an answer, in order
        for stage, packet in events:
            skipped, sends, replies = plan[stage.index]
            if skipped:
                continue  # not in the milter's protocol version
            if link.skip is not None:
                if link.skip is stage:
                    continue  # SMFIR_SKIP: no more events of this kind...
                link.skip = None  # ...until another kind comes (milter8_event)
            if stage.macros is not None:
                macros = self._macro_packet(link, stage)
                if macros:
                    out.append(macros)
            if sends:
                out.append(packet)
                if replies:
                    waiting.append(stage)
        if out:
            connection.send(out[0] if len(out) == 1 else b"".join(out))
        last = len(waiting) - 1
        for index, stage in enumerate(waiting):
            progress[0] = stage
            outcome, reply = await self._answer(
                link, stage, edits if stage is _EOM else None, last - index + 1
            )
            if stage is _EOM:
                link.in_transaction = False  # the message is over for it
                if outcome in (_CONTINUE, _SKIP):
                    self._record(link, _EOM, _CONTINUE)
            if outcome == _SKIP:
                link.skip = stage
                continue
            if outcome != _CONTINUE:
                if index < last:
                    link.resync = True
                return outcome, reply
        if waiting and waiting[-1].content:
            await connection.drain()  # a milter slower than the client slows it down
        return _CONTINUE, None

    async def _answer(
        self, link: _Link, stage: _Stage, edits: list[Modification] | None, due: int = 1
    ) -> tuple[str, Reply | None]:
        """Read the milter's answer to one event: progress and quarantine notes, edits (end of
        message only), then one verdict."""
        connection = link.connection
        options = link.options
        assert connection is not None and options is not None
        timeout = link.config.content_timeout if stage.content else link.config.command_timeout
        while True:
            response = await connection.response(timeout, due)
            kind = type(response)
            if kind is Continue:
                return _CONTINUE, None
            if kind is Progress:
                continue
            if kind is Quarantine:
                assert isinstance(response, Quarantine)
                self._quarantine(link, stage, response.reason)
                continue
            if kind is Accept:
                link.state = _ACCEPT_CON if stage.connection else _ACCEPT_MSG
                self._record(link, stage, _ACCEPT)
                return _ACCEPT, None
            if kind is Reject or kind is Tempfail or kind is ReplyCode:
                if isinstance(response, ReplyCode):
                    reply = _milter_reply(response.text)
                else:
                    reply = R.MILTER_REJECT if kind is Reject else R.MILTER_TEMPFAIL
                action = "reject" if reply.code // 100 == 5 else "tempfail"
                self._record(link, stage, action, reply)
                if stage.connection:
                    link.state = _REJECT_CON
                    link.reply = reply
                    link.close()
                return _REJECT, reply
            if kind is Discard:
                if stage.connection:
                    log.warning("milter %s: DISCARD is not allowed at %s", link.name, stage.name)
                    return _CONTINUE, None
                link.state = _ACCEPT_MSG
                self._record(link, stage, _DISCARD)
                return _DISCARD, None
            if kind is Skip:
                return _SKIP, None
            if kind is Shutdown:
                link.state = _REJECT_CON
                link.reply = R.MILTER_SHUTDOWN
                self._record(link, stage, _SHUTDOWN, R.MILTER_SHUTDOWN)
                link.close()
                return _SHUTDOWN, R.MILTER_SHUTDOWN
            if edits is not None and isinstance(response, Modification):
                if not response.action & options.actions:
                    raise MilterProtocolError(
                        f"milter {link.name}: {type(response).__name__} without "
                        "having negotiated it"
                    )
                edits.append(response)
                continue
            raise MilterProtocolError(
                f"milter {link.name}: unexpected {type(response).__name__} at {stage.name}"
            )

    async def _reopen(self, link: _Link) -> None:
        """A fresh connection after an early verdict left the old one possibly out of step:
        negotiate again and show the milter the connection and the HELO again."""
        link.resync = False
        link.pending = []
        if link.connection is not None:
            link.connection.abort()
        link.in_transaction = False
        await self._open(link)
        outcome, _ = await self._event(link, _CONNECT, self._connect_packet(), None)
        if outcome == _CONTINUE and self._helo is not None:
            await self._event(link, _HELO, encode_helo(self._helo), None)

    def _failed(
        self,
        link: _Link,
        stage: _Stage,
        error: Exception,
        edits: list[Modification] | None,
    ) -> tuple[str, Reply | None]:
        """A milter that cannot be used: its default action, for the rest of the session
        (Postfix's milter8_comm_error)."""
        if edits is not None:
            edits.clear()  # half an answer is no answer
        if link.connection is not None:
            link.connection.abort()
        action = link.config.default_action
        link.state = _ERROR
        link.reply = _R_FAILED.get(action)
        if not self._closed:
            log.warning(
                "milter %s failed at %s: %s; default action %s",
                link.name,
                stage.name,
                error,
                action,
            )
        self._record(link, stage, "failed", link.reply, str(error))
        if link.reply is None:
            return _CONTINUE, None
        return _REJECT, link.reply

    def _macro_packet(self, link: _Link, stage: _Stage) -> bytes:
        macros = self._macros
        pairs = [(name, macros[name]) for name in link.macro_names[stage.index] if name in macros]
        if not pairs:
            return b""
        return encode_macros(stage.command, pairs)

    def _record(
        self,
        link: _Link,
        stage: _Stage,
        action: str,
        reply: Reply | None = None,
        detail: str | None = None,
    ) -> None:
        verdict = MilterVerdict(link.name, stage.name, action, reply, detail)
        transaction = self._transaction
        if transaction is not None and stage not in (_CONNECT, _HELO):
            transaction.verdicts.append(verdict)
        else:
            self._session_verdicts.append(verdict)
        if action not in (_CONTINUE, _ACCEPT) and stage is not _EOM:
            log.info(
                "milter %s: %s at %s%s",
                link.name,
                action,
                stage.name,
                f": {reply}" if reply else "",
            )

    def _quarantine(self, link: _Link, stage: _Stage, reason: str) -> None:
        transaction = self._transaction
        if transaction is not None:
            transaction.quarantine = reason or "milter triggers HOLD action"
        self._record(link, stage, "quarantine", None, reason)

    async def _chain(self, stage: _Stage, packet: bytes) -> tuple[str, Reply | None]:
        """An envelope event through every milter in order, until one decides (Postfix's
        milter_*_event loops: the first answer that is not "continue" ends the loop)."""
        for link in self._links:
            outcome, reply = await self._event(link, stage, packet, None)
            if outcome in (_REJECT, _SHUTDOWN, _DISCARD):
                return outcome, reply
        return _CONTINUE, None

    def _needs_io(self, stage: _Stage) -> bool:
        """Whether any milter has to be written to or answered for ``stage`` (else the
        handler answers at once, without a task)."""
        for link in self._links:
            if link.state in (_ERROR, _REJECT_CON):
                if link.reply is not None:
                    return True
                continue
            if link.state == _READY and link.plan is not None:
                skipped, sends, _ = link.plan[stage.index]
                if not skipped and (sends or link.macro_names[stage.index]):
                    return True
        return False

    def _reply(self, outcome: str, reply: Reply | None) -> Reply | None:
        if outcome == _SHUTDOWN or (reply is not None and reply.code == 421):
            self._shutdown()
        if outcome in (_REJECT, _SHUTDOWN):
            return reply
        return None

    def _shutdown(self) -> None:
        """SMFIR_SHUTDOWN: 421, then close once the reply is out (RFC 5321 3.8)."""
        loop = asyncio.get_running_loop()
        loop.call_soon(self.session.close)

    # --- session handlers --------------------------------------------------------------------

    def _on_helo(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | None:
        if not self._links:
            return None
        name = e.command.client_hostname
        wait = self._wait()
        if wait is not None:
            return self._hello_after(wait, name)
        self._hello(name)
        return None

    async def _hello_after(self, wait: Awaitable[None], name: str) -> Reply | None:
        await wait
        self._hello(name)
        return None

    def _hello(self, name: str) -> None:
        """HELO/EHLO goes to every milter without waiting for the answers.

        Sendmail/Postfix compatibility: a milter's refusal at HELO is not HELO's reply; it
        answers MAIL and the other commands instead. So HELO is answered at once and the
        milters' answers are read before their next event (a shutdown then answers 421 there).
        """
        # A new HELO/EHLO (after STARTTLS too) ends any open transaction.
        self._end_transaction()
        self._macros.update(self._tls_macros())
        self._helo = name
        packet = encode_helo(name)
        for link in self._links:
            if link.state not in (_READY, _ACCEPT_MSG) or link.resync:
                continue  # out, or made afresh (with this HELO) before its next event
            connection, plan = link.connection, link.plan
            assert connection is not None and plan is not None
            skipped, sends, replies = plan[_HELO.index]
            if skipped:
                continue
            out = self._macro_packet(link, _HELO)
            if sends:
                out += packet
                if replies:
                    link.pending.append(_HELO)
            if out:
                connection.send(out)

    async def _settle(self, link: _Link) -> None:
        """Read the answers to events sent without waiting (HELO) before the next event."""
        pending, link.pending = link.pending, []
        progress = [pending[0]]
        try:
            for index, stage in enumerate(pending):
                progress[0] = stage
                outcome, _ = await self._answer(link, stage, None, len(pending) - index)
                if outcome not in (_CONTINUE, _SKIP):
                    if index < len(pending) - 1:
                        link.resync = True
                    return
        except (MilterError, ProtocolError) as error:
            self._failed(link, progress[0], error, None)

    def _tls_macros(self) -> dict[str, str]:
        tls = self.session.tls
        if tls is None:
            return {}
        macros: dict[str, str] = {}
        if tls.version:
            macros["{tls_version}"] = tls.version
        if tls.cipher:
            macros["{cipher}"] = tls.cipher
        if tls.bits:
            macros["{cipher_bits}"] = str(tls.bits)
        certificate = tls.peer_certificate or {}
        for key, macro in (("subject", "{cert_subject}"), ("issuer", "{cert_issuer}")):
            for rdn in certificate.get(key, ()):
                for name, value in rdn:
                    if name == "commonName":
                        macros[macro] = value
        return macros

    def _on_mail(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | None:
        if not self._links:
            return None
        return self._mail(e.command)

    async def _mail(self, command: Any) -> Reply | None:
        wait = self._wait()
        if wait is not None:
            await wait
        self._end_transaction()
        transaction = self._transaction = _Transaction(secrets.token_hex(5).upper())
        self._start_streaming()
        transaction.streamed = self._streaming
        session = self.session
        return_path: Address = command.return_path
        macros = self._macros
        for name in ("{auth_type}", "{auth_authen}", "{auth_author}", "{rcpt_addr}", "{rcpt_host}"):
            macros.pop(name, None)
        macros["i"] = transaction.queue_id
        macros["{mail_addr}"] = str(return_path)
        macros["{mail_host}"] = return_path.domain
        if session.authenticated_as is not None:
            if session.auth_mechanism is not None:
                macros["{auth_type}"] = session.auth_mechanism
            macros["{auth_authen}"] = session.authenticated_as
            if command.auth is not None:
                macros["{auth_author}"] = command.auth
        arguments = [f"<{return_path}>"] + [
            key if value is None else f"{key}={value}" for key, value in command.parameters.items()
        ]
        for link in self._links:
            if link.state == _READY:
                link.in_transaction = True
        outcome, reply = await self._chain(_MAIL, encode_mail(arguments))
        if outcome == _DISCARD:
            transaction.discard = True
        return self._reply(outcome, reply)

    def _on_rcpt(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | None:
        transaction = self._transaction
        if not self._links or transaction is None or transaction.discard:
            return None
        return self._rcpt(e.command)

    async def _rcpt(self, command: Any) -> Reply | None:
        transaction = self._transaction
        assert transaction is not None
        recipient: Address = command.recipient_address
        self._macros["{rcpt_addr}"] = str(recipient)
        self._macros["{rcpt_host}"] = recipient.domain
        arguments = [f"<{recipient}>"] + [
            key if value is None else f"{key}={value}" for key, value in command.parameters.items()
        ]
        outcome, reply = await self._chain(_RCPT, encode_rcpt(arguments))
        if outcome == _DISCARD:
            transaction.discard = True
        return self._reply(outcome, reply)

    def _on_data(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | None:
        transaction = self._transaction
        if transaction is None or transaction.discard or transaction.data_sent:
            return None
        return self._data()

    async def _data(self) -> Reply | None:
        transaction = self._transaction
        assert transaction is not None
        transaction.data_sent = True
        outcome, reply = await self._chain(_DATA, encode_data())
        if outcome == _DISCARD:
            transaction.discard = True
        reply = self._reply(outcome, reply)
        transaction.data_reply = reply
        return reply

    def _on_bdat(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | Reply | None:
        # CHUNKING: the milters' DATA event comes with the first chunk (for a streamed
        # message it went before the chunk's content, from the message_chunk handler).
        transaction = self._transaction
        if transaction is None or transaction.discard:
            return None
        if transaction.data_sent:
            return transaction.data_reply
        return self._data()

    def _on_rset(self, session: SmtpSession, e: Any) -> None:
        self._end_transaction()

    def _on_discarded(self, session: SmtpSession, e: Any) -> None:
        self._end_transaction()

    def _on_other(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | Reply | None:
        """VRFY, EXPN, STARTTLS: a milter's lasting refusal answers them (milter_other_event)."""
        if not self._links:
            return None
        wait = self._wait()
        if wait is not None or any(link.pending for link in self._links):
            return self._lasting_reply_after(wait)
        return self._lasting_reply()

    async def _lasting_reply_after(self, wait: Awaitable[None] | None) -> Reply | None:
        if wait is not None:
            await wait
        for link in self._links:
            if link.pending:
                await self._settle(link)
        return self._lasting_reply()

    def _lasting_reply(self) -> Reply | None:
        for link in self._links:
            if link.state in (_REJECT_CON, _ERROR) and link.reply is not None:
                return link.reply
        return None

    def _on_unknown(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | None:
        if not self._links or not self._needs_io(_UNKNOWN):
            return None
        command = e.command
        line = f"{command.verb} {command.parameter}".rstrip()
        return self._unknown(line)

    async def _unknown(self, line: str) -> Reply | None:
        wait = self._wait()
        if wait is not None:
            await wait
        outcome, reply = await self._chain(_UNKNOWN, encode_unknown(line))
        return self._reply(outcome, reply)

    def _on_disconnected(self, session: SmtpSession, e: Any) -> None:
        self._closed = True
        if self._connected is not None and not self._connected.done():
            self._connected.cancel()
        # Postfix's order: abort an open transaction, then quit.
        self._end_transaction()
        for link in self._links:
            link.close()

    def _end_transaction(self) -> None:
        for link in self._links:
            link.abort_transaction()
        self._transaction = None

    # --- the message ---------------------------------------------------------------------------

    def _start_streaming(self) -> None:
        """Stream the message to the milters when the session streams it (``message_chunk``
        has handlers of the user's): decided at MAIL, once the user's handlers are in."""
        session = self.session
        if self._streaming:
            return
        if any(handler != self._on_chunk for handler in session.message_chunk.handlers):
            session.message_chunk.prepend(self._on_chunk)
            self._streaming = True

    def _on_chunk(self, session: SmtpSession, e: Any) -> Awaitable[None] | None:
        transaction = self._transaction
        if transaction is None or transaction.discard or not transaction.streamed:
            return None
        return self._chunk(transaction, e.chunk, e.offset)

    async def _chunk(self, transaction: _Transaction, chunk: bytes, offset: int) -> None:
        if offset == 0 and not transaction.data_sent:
            await self._data()  # BDAT: the DATA event precedes the content
            if transaction.data_reply is not None or transaction.discard:
                return
        for link in self._links:
            feed = transaction.feeds.get(id(link))
            if feed is None:
                feed = transaction.feeds[id(link)] = _Feed()
            if feed.done is None:
                await self._feed(link, feed, chunk, final=False)

    async def _feed(self, link: _Link, feed: _Feed, data: bytes, *, final: bool) -> None:
        """Send ``data`` (the next part of the message) to one milter, in one batch: the header
        fields it completes, the end of header, full body chunks; when ``final``, the rest
        and the end of the message (whose answer, with the edits, goes to ``feed``)."""
        leading_space = link.leading_space
        fields, body = feed.scanner.feed(data) if data else ([], b"")
        if final and feed.scanner.in_header:
            more, rest = feed.scanner.finish()
            fields += more
            body += rest
        try:
            events: list[tuple[_Stage, bytes]] = [
                (_HEADER, encode_header(f.name, milter_value(f.raw, leading_space=leading_space)))
                for f in fields
            ]
        except ValueError:
            # A NUL in a header field: the milter protocol's strings cannot carry it, so no
            # milter can judge the message. The message is at fault, not us: refused (5xx).
            feed.done = (_REJECT, R.MILTER_NUL_IN_HEADER)
            return
        if not feed.scanner.in_header and not feed.eoh_sent:
            feed.eoh_sent = True
            events.append((_EOH, encode_end_of_headers()))
        pending = feed.body
        if body:
            pending += body
            feed.open_line = not body.endswith(b"\n")
        if final and feed.open_line:
            # Postfix sends every body line with its CRLF, the last one too.
            pending += b"\r\n"
            feed.open_line = False
        start = 0
        size = len(pending)
        while size - start >= MAX_BODY_CHUNK or (final and start < size):
            end = min(start + MAX_BODY_CHUNK, size)
            events.append((_BODY, encode_body(pending[start:end])))
            start = end
        del pending[:start]
        if final:
            events.append((_EOM, encode_end_of_body()))
        if not events:
            return
        outcome, reply = await self._batch(link, events, feed.edits if final else None)
        if outcome not in (_CONTINUE, _SKIP):
            feed.done = (outcome, reply)
        elif final:
            feed.done = (_CONTINUE, None)

    def _on_message(self, session: SmtpSession, e: Any) -> Awaitable[Reply | None] | Reply | None:
        transaction = self._transaction
        if not self._links or transaction is None:
            return None
        if transaction.discard:
            self._end_transaction()
            self._report(transaction, e, discarded=True)
            self._discard_streamed(e)
            return R.MILTER_DISCARDED
        return self._message(transaction, e)

    async def _message(self, transaction: _Transaction, e: Any) -> Reply | None:
        try:
            reply = await self._message_verdict(transaction, e)
            if reply is None and self._closed:
                # The client left while the milters worked: it never heard the message was
                # taken, so it will send it again; this copy must not be delivered too.
                return R.MILTER_TEMPFAIL
            return reply
        finally:
            # Postfix aborts every milter after a message (mail_reset); here only those that
            # did not get to the end of it (one that did would ignore the abort anyway).
            self._end_transaction()

    async def _message_verdict(self, transaction: _Transaction, e: Any) -> Reply | None:
        streamed = bool(e.streamed)
        if streamed and not transaction.streamed:
            # The session streamed a message the milters never saw (a message_chunk handler
            # added after MAIL): it cannot be filtered.
            log.error("a message was streamed past the milters; refused")
            return R.MILTER_STREAMED_BODY
        message: bytes = e.message
        for link in self._links:
            if link.state in (_ERROR, _REJECT_CON):
                if link.reply is not None:
                    return self._refuse(transaction, e, link.reply)
                continue
            if link.state != _READY:
                continue  # never connected, accepted the connection or this message
            feed = transaction.feeds.get(id(link)) if streamed else None
            if feed is None:
                feed = _Feed()
            if feed.done is None:
                await self._feed(link, feed, b"" if streamed else message, final=True)
            outcome, reply = feed.done or (_CONTINUE, None)
            edits = feed.edits
            if outcome in (_REJECT, _SHUTDOWN):
                return self._refuse(transaction, e, self._reply(outcome, reply))
            if outcome == _DISCARD:
                transaction.discard = True
                self._report(transaction, e, discarded=True)
                self._discard_streamed(e)
                return R.MILTER_DISCARDED
            if not edits:
                continue
            if streamed and any(isinstance(edit, ReplaceBody) for edit in edits):
                # The body went by as it came; nothing can replace it now. A configuration
                # problem: the milter's default action says what the client hears.
                outcome, reply = self._failed(
                    link,
                    _EOM,
                    MilterError("it replaced the body of a streamed message, which cannot be"),
                    edits,
                )
                if reply is not None:
                    return self._refuse(transaction, e, reply)
                continue
            if not streamed:
                try:
                    message = apply_edits(message, edits, leading_space=link.leading_space)
                except ProtocolError as error:
                    outcome, reply = self._failed(link, _EOM, error, edits)
                    if reply is not None:
                        return self._refuse(transaction, e, reply)
                    continue
            edits = self._edit_envelope(link, e.envelope, edits)
            transaction.edits.extend(
                MilterEdit(link.name, edit, link.leading_space) for edit in edits
            )
        if not streamed and message is not e.message:
            e.message = message
            e.size = len(message)
            e.envelope.message = message
        self._report(transaction, e, applied=not streamed)
        return None

    def _report(
        self, transaction: _Transaction, e: Any, *, applied: bool = True, discarded: bool = False
    ) -> None:
        e.envelope.milter = MilterReport(
            transaction.queue_id,
            tuple(self._session_verdicts) + tuple(transaction.verdicts),
            tuple(transaction.edits),
            transaction.quarantine,
            applied=applied,
            discarded=discarded,
        )

    def _refuse(self, transaction: _Transaction, e: Any, reply: Reply | None) -> Reply | None:
        # A streamed message refused here: the session tells the message_discarded handlers.
        return reply

    def _discard_streamed(self, e: Any, reply: Reply | None = None) -> None:
        """A streamed message a milter discarded (the client was told 250, so the session
        does not know): tell the user's ``message_discarded`` handlers, so they can drop what
        they stored."""
        if not e.streamed:
            return
        args = MessageDiscardedEventArgs(e.envelope, reply)
        for handler in self.session.message_discarded.handlers:
            if handler == self._on_discarded:
                continue
            try:
                result = handler(self.session, args)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    _background.add(task)
                    task.add_done_callback(_background.discard)
            except Exception:
                log.exception("message_discarded handler failed")

    def _edit_envelope(
        self, link: _Link, envelope: Any, edits: list[Modification]
    ) -> list[Modification]:
        """Apply a milter's sender and recipient edits to the envelope; returns the edits kept.

        An address that does not parse is dropped with a warning, as Postfix drops bad ESMTP
        parameters; in LMTP, recipient edits are dropped too (RFC 2033 4.2: one reply per
        recipient the client gave).
        """
        kept: list[Modification] = []
        for edit in edits:
            try:
                if isinstance(edit, ChangeSender):
                    address, _ = parse_path(
                        _bracketed(edit.address), allow_null=True, allow_utf8=True
                    )
                    envelope.return_path = address
                    for key, value in parse_parameters(edit.parameters or "").items():
                        if key == "RET" and value:
                            envelope.dsn_ret = value.upper()
                        elif key == "ENVID" and value:
                            envelope.dsn_envid = decode_xtext(value)
                elif isinstance(edit, (AddRecipient, DeleteRecipient)):
                    if self.session.lmtp:
                        raise ValueError("an LMTP server answers for the recipients it was given")
                    if isinstance(edit, AddRecipient):
                        _add_recipient(envelope, edit)
                    else:
                        _delete_recipient(envelope, edit)
            except (CommandSyntaxError, ValueError) as error:
                log.warning("milter %s: ignoring %s: %s", link.name, edit, error)
                continue
            kept.append(edit)
        return kept


def _add_recipient(envelope: Any, edit: AddRecipient) -> None:
    address, _ = parse_path(_bracketed(edit.address), allow_utf8=True, allow_postmaster=True)
    envelope.recipients.append(address)
    envelope.rcpt_parameters.append(parse_parameters(edit.parameters or ""))
    envelope.dsn_notify.append(None)
    envelope.dsn_orcpt.append(None)


def _delete_recipient(envelope: Any, edit: DeleteRecipient) -> None:
    """Every recipient equal to the milter's address (angle brackets optional) goes, with its
    parameters."""
    wanted = _bracketed(edit.address)[1:-1]
    for position in range(len(envelope.recipients) - 1, -1, -1):
        if str(envelope.recipients[position]) == wanted:
            for values in (
                envelope.recipients,
                envelope.rcpt_parameters,
                envelope.dsn_notify,
                envelope.dsn_orcpt,
            ):
                if position < len(values):
                    del values[position]


def _bracketed(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address
    return f"<{address}>"
