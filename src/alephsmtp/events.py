"""Events in the seed's shape: ``session.helo += handler``, ``-=``, or ``@session.helo.connect``.

A handler is called as ``handler(sender, e)`` — ``sender`` is the session, ``e`` the event
arguments — and may return a reply (``str`` or :class:`~alephsmtp.replies.Reply`), ``None`` to
pass, or an awaitable of either. Handlers run in the order they were added; the first one that
returns a reply decides it and the rest are not called (a filter chain, so a handler that
rejects can never be overridden by one that accepts). With no handler, or when all pass, the
session sends its default reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .auth import Credentials
from .commands import AuthCommand, SmtpCommand
from .replies import Reply

if TYPE_CHECKING:
    from .envelope import SmtpEnvelope

__all__ = [
    "AuthEventArgs",
    "CommandEventArgs",
    "ConnectionLostEventArgs",
    "Event",
    "EventArgs",
    "Handler",
    "HandlerResult",
    "MessageChunkEventArgs",
    "MessageDiscardedEventArgs",
    "MessageReceivedEventArgs",
]

HandlerResult = Reply | str | bool | None | Awaitable[Reply | str | bool | None]
ArgsT = TypeVar("ArgsT", bound="EventArgs")
CommandT = TypeVar("CommandT", bound=SmtpCommand)
Handler = Callable[[Any, ArgsT], HandlerResult]


class Event(Generic[ArgsT]):
    """A multicast event: an ordered list of handlers.

    ``+=`` adds a handler, ``-=`` removes its last registration, and :meth:`connect` adds one as
    a decorator. ``bool(event)`` is true when it has handlers.
    """

    __slots__ = ("_handlers", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._handlers: list[Handler[ArgsT]] = []

    def __iadd__(self, handler: Handler[ArgsT]) -> Event[ArgsT]:
        if not callable(handler):
            raise TypeError(f"event handler must be callable, not {type(handler).__name__}")
        self._handlers.append(handler)
        return self

    def __isub__(self, handler: Handler[ArgsT]) -> Event[ArgsT]:
        for index in range(len(self._handlers) - 1, -1, -1):
            if self._handlers[index] == handler:
                del self._handlers[index]
                break
        else:
            raise ValueError(f"handler is not connected to the {self.name or 'event'}")
        return self

    def connect(self, handler: Handler[ArgsT]) -> Handler[ArgsT]:
        """Add ``handler``; returns it unchanged, so this works as a decorator."""
        self += handler
        return handler

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    @property
    def handlers(self) -> tuple[Handler[ArgsT], ...]:
        """The connected handlers, in calling order."""
        return tuple(self._handlers)

    def __repr__(self) -> str:
        return f"<Event {self.name!r} with {len(self._handlers)} handler(s)>"


@dataclass(slots=True)
class EventArgs:
    """Base of all event arguments."""


@dataclass(slots=True)
class CommandEventArgs(EventArgs, Generic[CommandT]):
    """The arguments of a command's event: ``e.command`` is the parsed command."""

    command: CommandT


@dataclass(slots=True)
class MessageReceivedEventArgs(EventArgs):
    """A complete message: the unstuffed body, byte-exact, and the transaction's envelope.

    When the session's ``message_chunk`` event has handlers, the body went to them as it
    arrived: ``streamed`` is true, ``message`` is empty and ``size`` says how much there was.
    """

    envelope: SmtpEnvelope
    message: bytes
    streamed: bool = False
    size: int = -1

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.message)


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
        """The password (PLAIN, LOGIN); ``None`` for CRAM-MD5, which never sends it."""
        return self.credentials.password

    def check_password(self, secret: str) -> bool:
        """Whether the client proved it knows ``secret``."""
        return self.credentials.check_password(secret)
