"""Command order, without I/O: the only place that knows which command may come when.

RFC 5321 4.1.4 and 3.3: a mail transaction is MAIL, one or more RCPT, then DATA; HELO/EHLO
first; RSET, NOOP, HELP, VRFY, EXPN and QUIT at any time. The session asks :func:`check` before
it raises a command's event (so an out-of-order command never reaches a handler: 503 5.5.1),
and :func:`advance` once the command was answered.
"""

from __future__ import annotations

import enum

from .replies import Reply

__all__ = ["State", "advance", "check", "end_of_message"]


class State(enum.Enum):
    """Where a session is in the protocol."""

    GREETING = "greeting"  # connected, greeting not yet sent: nothing is read
    NEED_HELO = "need-helo"  # greeted; HELO/EHLO not yet accepted
    READY = "ready"  # HELO/EHLO accepted, no transaction open
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    BDAT = "bdat"  # at least one BDAT chunk accepted, LAST not yet (RFC 3030)
    DATA = "data"  # 354 sent: the message is being read
    CLOSED = "closed"  # QUIT answered, or the connection is gone


_S = State
_HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
_BDAT_STARTED = Reply(503, "5.5.1", "Error: BDAT in progress")

_ANY = frozenset({_S.NEED_HELO, _S.READY, _S.MAIL, _S.RCPT, _S.BDAT})
_OUTSIDE_TRANSACTION: dict[State, Reply | None] = {
    _S.NEED_HELO: _HELO_FIRST,
    _S.READY: None,
    _S.MAIL: _IN_TRANSACTION,
    _S.RCPT: _IN_TRANSACTION,
    _S.BDAT: _IN_TRANSACTION,
}

# verb -> {state it may come in: None} or {state: the 503 it gets there}. Verbs not listed here
# are allowed in every command state (RSET, NOOP, QUIT, VRFY, EXPN, HELP, unknown verbs).
_ORDER: dict[str, dict[State, Reply | None]] = {
    "HELO": dict.fromkeys(_ANY),
    "EHLO": dict.fromkeys(_ANY),
    "LHLO": dict.fromkeys(_ANY),
    "MAIL": {
        _S.NEED_HELO: _HELO_FIRST,
        _S.READY: None,
        _S.MAIL: _NESTED_MAIL,
        _S.RCPT: _NESTED_MAIL,
        _S.BDAT: _NESTED_MAIL,
    },
    "RCPT": {
        _S.NEED_HELO: _NEED_MAIL,
        _S.READY: _NEED_MAIL,
        _S.MAIL: None,
        _S.RCPT: None,
        _S.BDAT: _BDAT_STARTED,
    },
    # RFC 3030 2: DATA and BDAT cannot be used in the same transaction.
    "DATA": {
        _S.NEED_HELO: _NEED_MAIL,
        _S.READY: _NEED_MAIL,
        _S.MAIL: _NEED_RCPT,
        _S.RCPT: None,
        _S.BDAT: _BDAT_STARTED,
    },
    "BDAT": {
        _S.NEED_HELO: _NEED_MAIL,
        _S.READY: _NEED_MAIL,
        _S.MAIL: _NEED_RCPT,
        _S.RCPT: None,
        _S.BDAT: None,
    },
    # RFC 4954 4: AUTH after EHLO, outside a mail transaction. RFC 3207 4: STARTTLS after EHLO;
    # inside a transaction too (Postfix, aiosmtpd and smtp-server take it there): the
    # handshake resets the session, transaction included (4.2).
    "STARTTLS": {_S.NEED_HELO: _HELO_FIRST, **dict.fromkeys((_S.READY, _S.MAIL, _S.RCPT, _S.BDAT))},
    "AUTH": _OUTSIDE_TRANSACTION,
}

# (verb, accepted) -> next state; "accepted" means a 2xx (354 for DATA).
_NEXT: dict[str, State] = {
    "HELO": _S.READY,
    "EHLO": _S.READY,
    "LHLO": _S.READY,
    "MAIL": _S.MAIL,
    "RCPT": _S.RCPT,
    "DATA": _S.DATA,
    "BDAT": _S.BDAT,
    "QUIT": _S.CLOSED,
}


def check(state: State, verb: str) -> Reply | None:
    """``None`` when ``verb`` may come now, else the 503 reply it gets (RFC 5321 4.3.2)."""
    allowed = _ORDER.get(verb)
    if allowed is None:
        return None
    return allowed.get(state, _NEED_MAIL)


def advance(state: State, verb: str, accepted: bool) -> State:
    """The state after ``verb`` was answered; a refused command changes nothing.

    RSET ends a transaction but not the greeting exchange (RFC 5321 4.1.1.5); HELO/EHLO end
    a transaction too (4.1.4).
    """
    if not accepted:
        return state
    if verb == "RSET":
        return _S.NEED_HELO if state is _S.NEED_HELO else _S.READY
    return _NEXT.get(verb, state)


def end_of_message(state: State) -> State:
    """After the reply to a message (accepted or not) the transaction is over (4.1.1.4)."""
    return _S.READY if state in (_S.DATA, _S.BDAT, _S.RCPT) else state
