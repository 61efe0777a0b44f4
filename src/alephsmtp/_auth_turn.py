"""One AUTH command on a session, from its line to its reply (RFC 4954).

The session checks the command (order, syntax, the mechanisms offered now) and hands it to an
`AuthTurn`; while the turn reads, the session's read loop gives
it the client's lines. The turn runs the ``auth_command`` handlers (which may take the whole
exchange over, through ``session.sasl_challenge``) or the built-in mechanism
([`SaslExchange`][alephsmtp.auth.SaslExchange], no I/O, in ``auth.py``), has the ``auth``
handlers judge the credentials, and answers. A refusal counts against the session's limits:
every failure is an error, from the second on the reply waits ``auth_failure_delay`` (Postfix's
``smtpd_error_sleep_time``), and ``max_auth_failures`` ends the session.

Cold code: nothing here runs for a session that does not authenticate.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import replies as R
from ._protocol import RULES, Rule, State
from .auth import (
    AuthCancelled,
    AuthSyntaxError,
    Credentials,
    SaslContext,
    SaslExchange,
    mechanism_known,
)
from .commands import AuthCommand
from .errors import LineTooLong, SmtpError
from .events import DEFERRED, AuthCommandEventArgs, AuthEventArgs
from .replies import Reply

if TYPE_CHECKING:
    from .session import SmtpSession

__all__ = ["AuthTurn"]

_AUTH = RULES["AUTH"]
_AUTH_COMMAND = Rule("AUTH", "auth_command", R.AUTH_FAILED, (), failure=R.AUTH_HANDLER_FAILED)


class AuthTurn:
    """The AUTH command ``command`` on ``session``, until its reply is written.

    ``reading``: the client's next line is this turn's (a response to a challenge), not a
    command. The session ends the turn (``session._auth_turn = None``) when it answers.
    """

    __slots__ = ("_exchange", "_refusal", "_session", "_waiter", "command")

    def __init__(self, session: SmtpSession, command: AuthCommand) -> None:
        self._session = session
        self.command = command
        self._exchange: SaslExchange | None = None  # the built-in mechanism's exchange
        self._refusal: tuple[Reply, Credentials] | None = None  # said after a last 334
        self._waiter: asyncio.Future[str] | None = None  # an auth_command's challenge

    @property
    def reading(self) -> bool:
        """Whether the client's next line answers a challenge of this turn."""
        return self._exchange is not None or self._waiter is not None

    @property
    def exchanging(self) -> bool:
        """Whether the built-in mechanism's exchange runs (its lines are read one by one)."""
        return self._exchange is not None

    def begin(self) -> None:
        """The ``auth_command`` handlers first, if any (they may run the exchange themselves,
        or pass), else the built-in mechanism."""
        session = self._session
        event = session._events.get("auth_command")
        if event is not None and event.handlers:
            args = AuthCommandEventArgs(self.command)
            reply = session._decide(_AUTH_COMMAND, event.handlers, args, self._judged, args)
            if reply is not DEFERRED:
                self._judged(args, reply)
            return
        self._start()

    def line(self, line: bytes | SmtpError) -> None:
        """The client's answer to this turn's last challenge."""
        if self._exchange is None:
            self._answer_challenge(line)
            return
        if self._refusal is not None:
            # The answer to the mechanism's last challenge after a refusal (RFC 7628 3.2.3):
            # whatever it is, the refusal follows.
            refusal, credentials = self._refusal
            self._end()
            self._refuse(credentials, refusal)
            return
        if isinstance(line, SmtpError):
            self._end()
            self._session._write(
                R.AUTH_LINE if isinstance(line, LineTooLong) else R.from_error(line)
            )
            return
        self._step(line.decode("ascii", "replace").strip(" "))

    def challenge(self, data: bytes) -> asyncio.Future[str]:
        """``session.sasl_challenge``: a ``334`` for an ``auth_command`` handler, and a future
        for the client's answer. The client's turn is timed as any command is
        (``idle_timeout``), not as the handler."""
        session = self._session
        assert session._loop is not None
        session._write(R.challenge(data))
        session._flush()
        waiter: asyncio.Future[str] = session._loop.create_future()
        self._waiter = waiter
        # The handler's task waits for the answer: reading goes on until it comes.
        session._busy = False
        session._handler_deadline = 0.0
        session._last_activity = session._loop.time()
        session._update_reading()
        session._run()
        return waiter

    def cancel(self) -> None:
        """The connection is gone: a handler waiting for an answer gets an error."""
        waiter = self._waiter
        self._waiter = None
        self._exchange = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client is gone"))

    # --- the exchange -----------------------------------------------------------------------

    def _judged(self, args: AuthCommandEventArgs, reply: Reply | None) -> None:
        """What the ``auth_command`` handlers said (``None``: they passed)."""
        command = args.command
        if reply is None:
            if mechanism_known(command.mechanism):
                self._start()  # the handlers passed: the built-in exchange
            else:
                self._end()
                self._session._write(R.AUTH_MECHANISM)
            return
        if reply.code // 100 == 2 and not args.identity:
            self._session.log.error("an auth_command handler accepted AUTH without e.identity")
            reply = R.AUTH_HANDLER_FAILED
        self._done(Credentials(command.mechanism, args.identity or ""), reply)

    def _answer_challenge(self, line: bytes | SmtpError) -> None:
        """The client's answer to an auth_command handler's challenge: back to it."""
        session = self._session
        waiter = self._waiter
        assert waiter is not None
        self._waiter = None
        session._busy = True  # the handler goes on, on its clock again
        session._start_handler_clock(session.config.handler_timeout)
        if waiter.done():
            return
        if isinstance(line, SmtpError):
            waiter.set_exception(AuthSyntaxError(R.AUTH_LINE.lines[0]))
        elif line.strip(b" ") == b"*":
            waiter.set_exception(AuthCancelled())
        else:
            waiter.set_result(line.decode("ascii", "replace").strip(" "))

    def _start(self) -> None:
        session = self._session
        tls = session.tls
        context = SaslContext(session.config.hostname, tls.peer_certificate if tls else None)
        self._exchange = SaslExchange(self.command.mechanism, context)
        self._step(self.command.initial_response)

    def _step(self, response: str | None) -> None:
        exchange = self._exchange
        assert exchange is not None
        session = self._session
        try:
            result = exchange.step(response)
        except SmtpError as error:
            self._end()
            session._write(R.from_error(error))
            return
        if isinstance(result, bytes):
            # A challenge: the next line is the client's answer.
            session._write(R.challenge(result))
            return
        # Never log credentials: the mechanism and the identity only.
        args = AuthEventArgs(self.command, result)
        reply = session._decide(_AUTH, session._handlers("auth"), args, self._done, result)
        if reply is not DEFERRED:
            self._done(result, reply)

    def _done(self, credentials: Credentials, answer: Reply | None) -> None:
        """The handlers' judgement of ``credentials`` (``None``: no handler accepted)."""
        session = self._session
        reply = answer if answer is not None else R.AUTH_FAILED
        username = credentials.username
        metrics = session._pools.metrics
        if reply.code // 100 == 2:
            self._end()
            session.authenticated_as = username
            session.auth_mechanism = credentials.mechanism
            session.log.info("authenticated as %r (%s)", username, credentials.mechanism)
            metrics.auth[credentials.mechanism, "success"] += 1
            session._write(reply)
            return
        if reply.code // 100 != 5:  # our own trouble (454 4.7.0): not the client's failure
            self._end()
            metrics.auth[credentials.mechanism, "error"] += 1
            session._write(reply)
            return
        last = self._exchange.failure() if self._exchange is not None else None
        if last is not None:
            # RFC 7628 3.2.2: OAUTHBEARER (and XOAUTH2) say why in a last challenge; the
            # client answers it, then gets the refusal.
            self._refusal = (reply, credentials)
            session._write(R.challenge(last))
            return
        self._end()
        self._refuse(credentials, reply)

    def _end(self) -> None:
        self._exchange = None
        self._refusal = None
        if self._session._auth_turn is self:
            self._session._auth_turn = None

    # --- password guessing ------------------------------------------------------------------

    def _refuse(self, credentials: Credentials, reply: Reply) -> None:
        session = self._session
        config = session.config
        session._pools.metrics.auth[credentials.mechanism, "failure"] += 1
        session.log.info("authentication failed for %r", credentials.username)
        session._auth_failures += 1
        session._count_error()
        limit = config.max_auth_failures
        if limit and session._auth_failures >= limit and session._limit_reply is None:
            session._limit_reply = R.TOO_MANY_AUTH_FAILURES
        delay = config.auth_failure_delay
        if session._auth_failures > 1 and delay > 0 and session._loop is not None:
            session._busy = True  # what the guesser sends meanwhile waits (held, bounded)
            session._flush()
            session._loop.call_later(delay, _after_delay, session, reply)
            return
        session._write(reply)


def _after_delay(session: SmtpSession, reply: Reply) -> None:
    """A delayed refusal: said, and the session reads on."""
    session._busy = False
    if session.state is State.CLOSED or session._transport is None:
        return
    session._write(reply)
    session._update_reading()
    session._run()
