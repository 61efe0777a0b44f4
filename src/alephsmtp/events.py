"""Events in the seed's shape: ``session.helo += handler``, ``-=``, or ``@session.helo.connect``.

A handler is called as ``handler(sender, e)`` — ``sender`` is the session, ``e`` the event
arguments — and may return a reply (``str`` or [`Reply`][alephsmtp.replies.Reply]), ``None`` to
pass, or an awaitable of either. Handlers run in the order they were added; the first one that
returns a reply decides it and the rest are not called (a filter chain, so a handler that
rejects can never be overridden by one that accepts). With no handler, or when all pass, the
session sends its default reply.

[`run_chain()`][alephsmtp.events.run_chain] (the first reply decides) and
[`run_all()`][alephsmtp.events.run_all] (every handler, results ignored) are the one place handlers
are run, for every caller: commands, message chunks, notifications, the test server. Synchronous
handlers run inline; at the first awaitable the rest becomes a [`Pending`][alephsmtp.events.Pending]
coroutine, which the caller runs as a task (the session times it out and turns its result into a
reply).
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar

from .auth import Credentials
from .commands import AuthCommand, SmtpCommand
from .replies import Reply

if TYPE_CHECKING:
    from .envelope import SmtpEnvelope
    from .spool import MessageSpool

__all__ = [
    "AuthCommandEventArgs",
    "AuthEventArgs",
    "CommandEventArgs",
    "ConnectionLostEventArgs",
    "EhloEventArgs",
    "Event",
    "EventArgs",
    "Handler",
    "HandlerErrorEventArgs",
    "HandlerResult",
    "MessageChunkEventArgs",
    "MessageDiscardedEventArgs",
    "MessageReceivedEventArgs",
    "Pending",
    "run_all",
    "run_chain",
]

#: What a handler may answer: a reply (``None``: no opinion, the next handler decides; ``True``
#: / ``False`` for ``auth``), or for an LMTP message one reply per recipient (RFC 2033 4.2);
#: or an awaitable of any of these.
Answer = Reply | str | bool | None | Sequence[Reply | str]
HandlerResult = Answer | Awaitable[Answer]
ArgsT = TypeVar("ArgsT", bound="EventArgs")
CommandT = TypeVar("CommandT", bound=SmtpCommand)
Handler = Callable[[Any, ArgsT], HandlerResult]


class Event(Generic[ArgsT]):
    """A multicast event: an ordered list of handlers.

    ``+=`` adds a handler, ``-=`` removes its last registration,
    [`connect()`][alephsmtp.events.Event.connect] adds one as a decorator, and
    [`prepend()`][alephsmtp.events.Event.prepend] puts one before all the others. ``bool(event)`` is
    true when it has handlers.
    """

    __slots__ = ("handlers", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        #: The connected handlers, in calling order (a tuple: what runs them reads it as is).
        self.handlers: tuple[Handler[ArgsT], ...] = ()

    def __iadd__(self, handler: Handler[ArgsT]) -> Event[ArgsT]:
        if not callable(handler):
            raise TypeError(f"event handler must be callable, not {type(handler).__name__}")
        self.handlers = (*self.handlers, handler)
        return self

    def __isub__(self, handler: Handler[ArgsT]) -> Event[ArgsT]:
        handlers = self.handlers
        for index in range(len(handlers) - 1, -1, -1):
            if handlers[index] == handler:
                self.handlers = handlers[:index] + handlers[index + 1 :]
                break
        else:
            raise ValueError(f"handler is not connected to the {self.name or 'event'}")
        return self

    def connect(self, handler: Handler[ArgsT]) -> Handler[ArgsT]:
        """Add ``handler``; returns it unchanged, so this works as a decorator."""
        self += handler
        return handler

    def prepend(self, handler: Handler[ArgsT]) -> Handler[ArgsT]:
        """Add ``handler`` before every handler already connected: it answers first, whatever
        order the others were added in (a filter such as the milters). Returns it unchanged."""
        if not callable(handler):
            raise TypeError(f"event handler must be callable, not {type(handler).__name__}")
        self.handlers = (handler, *self.handlers)
        return handler

    def __bool__(self) -> bool:
        return bool(self.handlers)

    def __len__(self) -> int:
        return len(self.handlers)

    def __repr__(self) -> str:
        return f"<Event {self.name!r} with {len(self.handlers)} handler(s)>"


#: What a session's check/act path gets from running handlers that went asynchronous: no
#: reply yet; the act half is called with it later, from the handlers' task.
DEFERRED: Any = object()


class Pending:
    """The rest of a handler chain, from its first awaitable on: ``coroutine`` gives the
    chain's result when awaited. Returned by [`run_chain()`][alephsmtp.events.run_chain] /
    [`run_all()`][alephsmtp.events.run_all] so that the caller can tell it from a reply with one
    identity check."""

    __slots__ = ("coroutine",)

    def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.coroutine = coroutine


def run_chain(handlers: Sequence[Callable[[Any, Any], Any]], sender: Any, args: Any) -> Any:
    """Run ``handlers`` in order until one answers (not ``None``); its answer, ``None`` when
    all pass, or a [`Pending`][alephsmtp.events.Pending] for the rest once a handler returned an
    awaitable.

    A handler's exception propagates (the caller decides what it means).
    """
    for index, handler in enumerate(handlers):
        result = handler(sender, args)
        if result is not None:
            if inspect.isawaitable(result):
                return Pending(_chain_rest(result, handlers[index + 1 :], sender, args))
            return result
    return None


async def _chain_rest(
    pending: Awaitable[Any], rest: Sequence[Callable[[Any, Any], Any]], sender: Any, args: Any
) -> Any:
    result = await pending
    for handler in rest:
        if result is not None:
            return result
        result = handler(sender, args)
        if inspect.isawaitable(result):
            result = await result
    return result


def run_all(handlers: Sequence[Callable[[Any, Any], Any]], sender: Any, args: Any) -> Any:
    """Run every handler in order, whatever they return; ``None``, or a
    [`Pending`][alephsmtp.events.Pending] for the rest once a handler returned an awaitable (each
    awaited before the next runs)."""
    for index, handler in enumerate(handlers):
        result = handler(sender, args)
        if result is not None and inspect.isawaitable(result):
            return Pending(_all_rest(result, handlers[index + 1 :], sender, args))
    return None


async def _all_rest(
    pending: Awaitable[Any], rest: Sequence[Callable[[Any, Any], Any]], sender: Any, args: Any
) -> None:
    await pending
    for handler in rest:
        result = handler(sender, args)
        if result is not None and inspect.isawaitable(result):
            await result


@dataclass(slots=True)
class EventArgs:
    """Base of all event arguments."""


@dataclass(slots=True)
class CommandEventArgs(EventArgs, Generic[CommandT]):
    """The arguments of a command's event: ``e.command`` is the parsed command.

    ``e.envelope`` is the transaction's envelope for the commands of a transaction (MAIL:
    the one it opens, filled in with the sender and the parameters; RCPT, DATA, BDAT), else
    ``None``.
    """

    command: CommandT
    envelope: SmtpEnvelope | None = None


@dataclass(slots=True)
class EhloEventArgs(CommandEventArgs[CommandT]):
    """EHLO/LHLO: ``e.keywords`` are the extension lines the reply will list (RFC 5321
    4.1.1.1), without the code: a handler may add its own or remove some, in place. (The
    reply's first line is the handler's text, or the server's hostname.)"""

    keywords: list[str] = field(default_factory=list)


class MessageReceivedEventArgs(EventArgs):
    """A complete message, byte-exact (unstuffed), and the transaction's envelope.

    ``e.message`` is the whole message as ``bytes``, read on first use: a large message was
    spooled to a temporary file as it arrived (``spool_threshold``), and ``e.open()`` reads
    it in pieces instead, as a binary file, without holding it in memory. A handler may
    assign ``e.message = new_bytes``: the handlers after it (and ``e.envelope.message``) see
    the new message.

    When the session's ``message_chunk`` event has handlers, the body went to them as it
    arrived: ``streamed`` is true, ``message`` is empty and ``size`` says how much there was.
    """

    __slots__ = ("_size", "envelope", "streamed")

    def __init__(
        self,
        envelope: SmtpEnvelope,
        message: bytes | MessageSpool = b"",
        streamed: bool = False,
        size: int = -1,
    ) -> None:
        self.envelope = envelope
        self.streamed = streamed
        if not streamed:
            envelope.set_content(message)
        self._size = size

    def __repr__(self) -> str:
        return f"<MessageReceivedEventArgs {self.size} bytes{' streamed' if self.streamed else ''}>"

    @property
    def message(self) -> bytes:
        """The whole message (empty when it was streamed to ``message_chunk`` handlers)."""
        if self.streamed:
            return b""
        return self.envelope.message or b""

    @message.setter
    def message(self, value: bytes) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"a message is bytes, not {type(value).__name__}")
        self.streamed = False
        self._size = -1
        self.envelope.set_content(bytes(value))

    @property
    def size(self) -> int:
        """The message's size in bytes (what was streamed, for a streamed message)."""
        if self._size >= 0:
            return self._size
        return self.envelope.message_size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def open(self) -> BinaryIO:
        """The message as a binary file (readable, seekable), read from memory or from its
        spool file without loading it whole; each call gives an independent view."""
        if self.streamed:
            return io.BytesIO(b"")
        return self.envelope.open_message()


@dataclass(slots=True)
class MessageChunkEventArgs(EventArgs):
    """A piece of a message as it streams in (unstuffed), at ``offset`` in the message.

    The pieces of one message, joined in order, are the message. It is not accepted yet:
    ``message_received`` (accepted) or ``message_discarded`` (refused, or the connection
    dropped) follows. An async handler pauses reading until it is done (back-pressure).
    """

    envelope: SmtpEnvelope
    chunk: bytes
    offset: int


@dataclass(slots=True)
class MessageDiscardedEventArgs(EventArgs):
    """A message whose chunks were streamed was not accepted; ``reply`` is why, or ``None``
    when it was abandoned (the connection dropped, or RSET / a new EHLO ended a BDAT
    transaction)."""

    envelope: SmtpEnvelope
    reply: Reply | None


@dataclass(slots=True)
class ConnectionLostEventArgs(EventArgs):
    """The connection ended; ``exception`` is ``None`` for a clean close."""

    exception: BaseException | None = field(default=None)


@dataclass(slots=True)
class HandlerErrorEventArgs(EventArgs):
    """A handler of ``event`` raised ``exception`` (aiosmtpd's ``handle_exception``).

    A ``handler_error`` handler may return the reply the client gets instead of ``reply``,
    the temporary failure it would get otherwise (451 4.3.0; 454 4.7.0 for AUTH). Returning
    a 5xx tells the client to give up on what it sent: do it only for a fault you know is
    the client's. ``None`` keeps ``reply``.
    """

    event: str
    exception: BaseException
    reply: Reply


@dataclass(slots=True)
class AuthCommandEventArgs(EventArgs):
    """An AUTH command, before the built-in exchange (RFC 4954 4): an ``auth_command``
    handler may run the exchange itself (``await session.sasl_challenge(data)`` for each
    challenge) and answer; to accept, it sets ``e.identity`` (who logged in) and returns a
    ``235``. Returning ``None`` lets the built-in mechanism run (the ``auth`` event then
    judges the credentials). A mechanism named in ``auth_mechanisms`` that alephsmtp does not
    implement is offered when an ``auth_command`` handler exists.
    """

    command: AuthCommand
    identity: str | None = None

    @property
    def mechanism(self) -> str:
        """The mechanism the client asked for, uppercased."""
        return self.command.mechanism


@dataclass(slots=True)
class AuthEventArgs(EventArgs):
    """A finished SASL exchange (RFC 4954) for the ``auth`` event to decide.

    A handler returns ``True`` to accept (235 2.7.0), ``False`` or ``None`` to refuse
    (535 5.7.8), or a reply of its own. ``check_password(secret)`` works for every mechanism,
    CRAM-MD5 included, in constant time.
    """

    command: AuthCommand
    credentials: Credentials

    @property
    def mechanism(self) -> str:
        """``PLAIN``, ``LOGIN`` or ``CRAM-MD5``."""
        return self.credentials.mechanism

    @property
    def username(self) -> str:
        """The authentication identity the client gave."""
        return self.credentials.username

    @property
    def password(self) -> str | None:
        """The password (PLAIN, LOGIN); ``None`` for the mechanisms that send none."""
        return self.credentials.password

    @property
    def token(self) -> str | None:
        """XOAUTH2 and OAUTHBEARER: the bearer token (check it with its issuer)."""
        return self.credentials.token

    @property
    def certificate(self) -> dict[str, Any] | None:
        """EXTERNAL: the client's verified TLS certificate (``ssl.getpeercert()``)."""
        return self.credentials.certificate

    def check_password(self, secret: str) -> bool:
        """Whether the client proved it knows ``secret``."""
        return self.credentials.check_password(secret)
