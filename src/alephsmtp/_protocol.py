"""The protocol table, without I/O: the only place that knows which command may come when,
which event it raises, what it gets by default, and where the session goes next.

RFC 5321 4.1.4 and 3.3: a mail transaction is MAIL, one or more RCPT, then DATA; HELO/EHLO first;
RSET, NOOP, HELP, VRFY, EXPN and QUIT at any time. The session looks a command's
[`Rule`][alephsmtp._protocol.Rule] up once ([`RULES`][alephsmtp._protocol.RULES], by verb), asks it
whether the command may come now (``rule.order[state]``: ``None``, or the 503 it gets there) before
any handler sees the command, and moves with [`advance()`][alephsmtp._protocol.advance] once it was
answered. Every state change of a session goes through [`advance()`][alephsmtp._protocol.advance],
including those no command makes (the greeting, the end of a message, a TLS handshake, the close).

States are ints (an ``IntEnum``): the order row of a rule is a tuple indexed by state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import replies as R
from .replies import Reply

__all__ = ["RULES", "UNKNOWN", "Rule", "State", "advance"]


class State(enum.IntEnum):
    """Where a session is in the protocol."""

    GREETING = 0  # connected, greeting not yet sent: nothing is read
    NEED_HELO = 1  # greeted; HELO/EHLO not yet accepted
    READY = 2  # HELO/EHLO accepted, no transaction open
    MAIL = 3  # MAIL accepted
    RCPT = 4  # at least one RCPT accepted
    BDAT = 5  # at least one BDAT chunk accepted, LAST not yet (RFC 3030)
    DATA = 6  # 354 sent: the message is being read
    CLOSED = 7  # QUIT answered, or the connection is gone


_S = State
_COMMAND_STATES = (_S.NEED_HELO, _S.READY, _S.MAIL, _S.RCPT, _S.BDAT)


@dataclass(frozen=True, slots=True)
class Rule:
    """One command of the protocol table.

    ``event`` is the session event its handlers answer; ``default`` the reply when they all
    pass; ``order[state]`` is ``None`` when the command may come in that state, else the 503
    it gets (RFC 5321 4.3.2); ``next`` the state after a 2xx (354 for DATA), ``None`` to stay.
    """

    verb: str
    event: str
    default: Reply
    order: tuple[Reply | None, ...]
    next: State | None = None
    #: What the client gets when a handler fails (a temporary error: never a bounce).
    failure: Reply = R.HANDLER_FAILED
    #: The verb as bytes, as the parsing core's ``split_command`` gives it.
    key: bytes = field(init=False, repr=False, compare=False)
    #: The name of ``default`` in ``alephsmtp.replies`` (its wire form is read by that name).
    default_name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.verb.encode("ascii"))
        names = [name for name in R.NAMES if getattr(R, name) is self.default]
        object.__setattr__(self, "default_name", names[0] if names else "")


def _order(**refusals: Reply | None) -> tuple[Reply | None, ...]:
    """An order row: each command state maps to ``None`` (allowed) unless named."""
    row: list[Reply | None] = [R.SEQ_NEED_MAIL] * len(State)
    for state in _COMMAND_STATES:
        row[state] = refusals.get(state.name)
    return tuple(row)


_ANYWHERE = _order()
_OUTSIDE_TRANSACTION = _order(
    NEED_HELO=R.SEQ_HELO_FIRST,
    MAIL=R.SEQ_IN_TRANSACTION,
    RCPT=R.SEQ_IN_TRANSACTION,
    BDAT=R.SEQ_IN_TRANSACTION,
)

_OUTSIDE_MAIL = _order(
    MAIL=R.SEQ_IN_TRANSACTION, RCPT=R.SEQ_IN_TRANSACTION, BDAT=R.SEQ_IN_TRANSACTION
)

RULES: dict[str, Rule] = {
    rule.verb: rule
    for rule in (
        Rule("HELO", "helo", R.HELLO_OK, _ANYWHERE, _S.READY),
        Rule("EHLO", "ehlo", R.HELLO_OK, _ANYWHERE, _S.READY),
        Rule("LHLO", "lhlo", R.HELLO_OK, _ANYWHERE, _S.READY),
        Rule(
            "MAIL",
            "mail",
            R.MAIL_OK,
            _order(
                NEED_HELO=R.SEQ_HELO_FIRST,
                MAIL=R.SEQ_NESTED_MAIL,
                RCPT=R.SEQ_NESTED_MAIL,
                BDAT=R.SEQ_NESTED_MAIL,
            ),
            _S.MAIL,
        ),
        Rule(
            "RCPT",
            "rcpt",
            R.RCPT_OK,
            _order(NEED_HELO=R.SEQ_NEED_MAIL, READY=R.SEQ_NEED_MAIL, BDAT=R.SEQ_BDAT_STARTED),
            _S.RCPT,
        ),
        # RFC 3030 2: DATA and BDAT cannot be used in the same transaction.
        Rule(
            "DATA",
            "data",
            R.DATA_GO,
            _order(
                NEED_HELO=R.SEQ_NEED_MAIL,
                READY=R.SEQ_NEED_MAIL,
                MAIL=R.SEQ_NEED_RCPT,
                BDAT=R.SEQ_BDAT_STARTED,
            ),
            _S.DATA,
        ),
        Rule(
            "BDAT",
            "bdat",
            R.CHUNK_OK,
            _order(NEED_HELO=R.SEQ_NEED_MAIL, READY=R.SEQ_NEED_MAIL, MAIL=R.SEQ_NEED_RCPT),
            _S.BDAT,
        ),
        Rule("RSET", "rset", R.OK, _ANYWHERE),
        Rule("NOOP", "noop", R.OK, _ANYWHERE),
        Rule("QUIT", "quit", R.BYE, _ANYWHERE, _S.CLOSED),
        Rule("VRFY", "vrfy", R.VRFY, _ANYWHERE),
        Rule("EXPN", "expn", R.EXPN, _ANYWHERE),
        Rule("HELP", "help", R.HELP, _ANYWHERE),
        # RFC 3207 4: after EHLO; inside a transaction too (Postfix, aiosmtpd and smtp-server
        # take it there): the handshake resets the session, transaction included (4.2).
        Rule("STARTTLS", "starttls", R.TLS_GO, _order(NEED_HELO=R.SEQ_HELO_FIRST)),
        # RFC 4954 4: after EHLO, outside a mail transaction.
        Rule("AUTH", "auth", R.AUTH_FAILED, _OUTSIDE_TRANSACTION, failure=R.AUTH_HANDLER_FAILED),
        # Postfix's XCLIENT and XFORWARD: outside a mail transaction; XCLIENT starts the
        # session over (NEED_HELO), as the proxied client greets again.
        Rule("XCLIENT", "xclient", R.OK, _OUTSIDE_MAIL, _S.NEED_HELO),
        Rule("XFORWARD", "xforward", R.XFORWARD_OK, _OUTSIDE_MAIL),
    )
}

#: Any verb the table does not know: allowed in every command state, raises
#: ``unhandled_command``, 500 5.5.1 unless a handler answers.
UNKNOWN = Rule("", "unhandled_command", R.UNKNOWN, _ANYWHERE)

# The state changes no command makes, by what happened.
GREETED = "greeted"  # the 220 greeting was sent
END_OF_MESSAGE = "end of message"  # the reply to a message (accepted or not) was sent
TLS_STARTED = "tls started"  # RFC 3207 4.2: the session starts over
CLOSED = "closed"  # QUIT answered, a limit passed, the connection gone


def advance(state: State, what: str, accepted: bool = True) -> State:
    """The state after ``what`` (a verb, or one of the events above); a refused command
    (``accepted`` false) changes nothing.

    RSET ends a transaction but not the greeting exchange (RFC 5321 4.1.1.5); HELO/EHLO end a
    transaction too (4.1.4); after the reply to a message the transaction is over (4.1.1.4).
    """
    if not accepted:
        return state
    if what == "RSET":
        return _S.NEED_HELO if state is _S.NEED_HELO else _S.READY
    if what == END_OF_MESSAGE:
        return _S.READY if state in (_S.DATA, _S.BDAT, _S.RCPT) else state
    if what in (GREETED, TLS_STARTED):
        return _S.NEED_HELO
    if what == CLOSED:
        return _S.CLOSED
    rule = RULES.get(what)
    if rule is None or rule.next is None:
        return state
    return rule.next
