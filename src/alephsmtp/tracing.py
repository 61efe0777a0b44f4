"""OpenTelemetry tracing: a span per session and a span per mail transaction.

``SmtpServer(..., tracing=True)`` traces with the global tracer provider (set up by the
application, or by ``opentelemetry-instrument``); ``tracing=provider`` with a
``TracerProvider`` of its own. Needs the ``tracing`` extra (``pip install
alephsmtp[tracing]``: the OpenTelemetry API; an SDK and an exporter are the application's
choice).

Spans (never an address, a subject or any other part of a message):

- ``smtp.session`` (kind SERVER, a new trace per connection): from the connection's start to
  its end. Attributes: ``client.address`` and ``client.port`` (the peer, or the client a
  PROXY header named), ``smtp.session.id``, ``smtp.lmtp``; at its end ``tls.protocol.name``
  and ``tls.protocol.version`` (once TLS is up), ``smtp.authenticated`` (bool) and
  ``smtp.transactions`` (how many MAIL commands were accepted).
- ``smtp.transaction`` (a child of the session's): from an accepted MAIL to the reply to its
  message, or to the RSET (a new EHLO, STARTTLS) or the close that ends it. Attributes:
  ``smtp.tls``, ``smtp.authenticated``, ``smtp.smtputf8``, ``smtp.body_type``; at its end
  ``smtp.recipients`` (how many were accepted), ``smtp.message.size`` (octets),
  ``smtp.reply.code`` (``smtp.reply.codes`` for LMTP's replies per recipient) and
  ``smtp.transaction.outcome``: ``accepted``, ``refused``, ``abandoned`` or ``closed``.

To follow a message into your own services, start their spans from
[`context_of()`][alephsmtp.tracing.context_of]::

    from opentelemetry import propagate, trace
    from alephsmtp.tracing import context_of

    tracer = trace.get_tracer("my.store")

    def store(session, e):
        with tracer.start_as_current_span("store", context=context_of(session)):
            headers = {}
            propagate.inject(headers)  # traceparent for the HTTP call to the mail store
            ...

The session calls the four methods of [`SessionTracer`][alephsmtp.tracing.SessionTracer] at its four
moments; each call is behind an ``if tracer is not None`` in the session, so an untraced server pays
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "alephsmtp.tracing needs the OpenTelemetry API: pip install 'alephsmtp[tracing]'"
    ) from error

from . import __version__

if TYPE_CHECKING:
    from .envelope import SmtpEnvelope
    from .events import MessageReceivedEventArgs
    from .replies import Reply
    from .session import SmtpSession

__all__ = ["SessionTracer", "context_of", "tracer_for"]

SESSION_SPAN = "smtp.session"
TRANSACTION_SPAN = "smtp.transaction"


class _Spans:
    """One traced session: its span, and its open transaction's span and envelope."""

    __slots__ = ("envelope", "session", "transaction", "transactions")

    def __init__(self, session: trace.Span) -> None:
        self.session = session
        self.transaction: trace.Span | None = None
        self.envelope: SmtpEnvelope | None = None
        self.transactions = 0


class SessionTracer:
    """Makes the spans of a server's sessions, with a tracer of ``tracer_provider`` (default:
    the global one). One per server; the session calls it at four moments."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("alephsmtp", __version__, tracer_provider=tracer_provider)
        self._open: dict[SmtpSession, _Spans] = {}

    def session_started(self, session: SmtpSession) -> None:
        attributes: dict[str, Any] = {"smtp.session.id": session.id, "smtp.lmtp": session.lmtp}
        peer = session.peer
        if isinstance(peer, tuple) and len(peer) >= 2:
            attributes["client.address"] = str(peer[0])
            attributes["client.port"] = int(peer[1])
        # A trace of its own (an empty parent context): SMTP carries no trace context, and
        # the loop's context is whatever was current when the server started.
        span = self.tracer.start_span(
            SESSION_SPAN,
            context=otel_context.Context(),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )
        self._open[session] = _Spans(span)

    def session_ended(self, session: SmtpSession) -> None:
        spans = self._open.pop(session, None)
        if spans is None:
            return
        if spans.transaction is not None:
            self._end_transaction(spans, "closed", None)
        # One call: each attribute set on an SDK span takes its lock and checks its value.
        attributes: dict[str, Any] = {
            "smtp.authenticated": session.authenticated_as is not None,
            "smtp.transactions": spans.transactions,
        }
        tls = session.tls
        if tls is not None and tls.version:
            # Semantic conventions: tls.protocol.name "tls", tls.protocol.version "1.3".
            name, _, version = tls.version.partition("v")
            attributes["tls.protocol.name"] = name.lower()
            attributes["tls.protocol.version"] = version or tls.version
        spans.session.set_attributes(attributes)
        spans.session.end()

    def transaction_started(self, session: SmtpSession, envelope: SmtpEnvelope) -> None:
        spans = self._open.get(session)
        if spans is None:
            return
        spans.transactions += 1
        if not spans.session.is_recording():
            # A session the sampler left out: its transactions would be left out too (the
            # SDKs' default, parent-based sampling), so no span is made for them at all.
            return
        if spans.transaction is not None:  # not ended by the session: end it here
            self._end_transaction(spans, "abandoned", None)
        attributes: dict[str, Any] = {
            "smtp.tls": envelope.tls,
            "smtp.authenticated": envelope.auth_identity is not None,
            "smtp.smtputf8": envelope.smtputf8,
        }
        if envelope.body_type:
            attributes["smtp.body_type"] = envelope.body_type
        spans.envelope = envelope
        spans.transaction = self.tracer.start_span(
            TRANSACTION_SPAN,
            context=trace.set_span_in_context(spans.session),
            attributes=attributes,
        )

    def transaction_ended(
        self,
        session: SmtpSession,
        reply: Reply | list[Reply] | None,
        message: MessageReceivedEventArgs | None,
    ) -> None:
        """The reply to the message (``None``: the default 250; a list: LMTP's, one per
        recipient); ``message`` is None when it was refused while it was read."""
        spans = self._open.get(session)
        if spans is None or spans.transaction is None:
            return
        attributes: dict[str, Any] = {}
        if message is not None:
            attributes["smtp.message.size"] = message.size
        if reply is None:
            codes = [250]
        elif isinstance(reply, list):
            codes = [each.code for each in reply]
            attributes["smtp.reply.codes"] = codes
        else:
            codes = [reply.code]
        accepted = any(code // 100 == 2 for code in codes)
        self._end_transaction(spans, "accepted" if accepted else "refused", codes[0], attributes)

    def transaction_abandoned(self, session: SmtpSession) -> None:
        """RSET, a new EHLO or STARTTLS ended the transaction before its message's reply."""
        spans = self._open.get(session)
        if spans is not None and spans.transaction is not None:
            self._end_transaction(spans, "abandoned", None)

    def context(self, session: SmtpSession) -> otel_context.Context | None:
        """A context whose current span is the session's open transaction's (else the
        session's): the parent for spans of your own. None for a session not traced."""
        spans = self._open.get(session)
        if spans is None:
            return None
        span = spans.transaction if spans.transaction is not None else spans.session
        return trace.set_span_in_context(span)

    def _end_transaction(
        self,
        spans: _Spans,
        outcome: str,
        code: int | None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        span = spans.transaction
        assert span is not None
        attributes = attributes if attributes is not None else {}
        attributes["smtp.transaction.outcome"] = outcome
        envelope = spans.envelope
        if envelope is not None:
            attributes["smtp.recipients"] = len(envelope.recipients)
        if code is not None:
            attributes["smtp.reply.code"] = code
        span.set_attributes(attributes)
        span.end()
        spans.transaction = None
        spans.envelope = None


def tracer_for(tracing: bool | trace.TracerProvider | SessionTracer) -> SessionTracer:
    """What ``SmtpServer(tracing=...)`` takes: True (the global provider), a
    ``TracerProvider``, or a [`SessionTracer`][alephsmtp.tracing.SessionTracer]."""
    if isinstance(tracing, SessionTracer):
        return tracing
    if tracing is True:
        return SessionTracer()
    if isinstance(tracing, trace.TracerProvider):
        return SessionTracer(tracing)
    raise TypeError(
        f"tracing must be True, a TracerProvider or a SessionTracer, not {type(tracing).__name__}"
    )


def context_of(session: SmtpSession) -> otel_context.Context | None:
    """The OpenTelemetry context of ``session``'s open transaction (else of the session): pass
    it as ``context=`` to start a span of yours under it, or to ``propagate.inject``. None
    when the session's server does not trace."""
    tracer = session._pools.tracer
    return tracer.context(session) if tracer is not None else None
