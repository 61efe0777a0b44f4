"""``MailAuth``: SPF, DKIM, ARC and DMARC on a session, through its public events.

``MailAuth(...).attach(session)`` adds handlers:

- ``mail``: SPF for MAIL FROM and for the HELO name (RFC 7208 2.3, 2.4), with the client's
  address from the socket or the PROXY header (``session.peer``);
- ``rcpt``: puts the SPF results on ``envelope.auth_results`` for later RCPT handlers;
- ``message_chunk`` (only when the session streams, i.e. other ``message_chunk`` handlers are
  connected when MAIL arrives): feeds the DKIM/ARC verifier as the message arrives;
- ``message_received``: DKIM and ARC on the complete message, DMARC from those results,
  ``envelope.auth_results`` completed, an ``Authentication-Results`` header prepended to
  ``e.message`` (not for streamed messages: there is no ``e.message`` to change), and the
  policy's reply.

Attach it before the handlers that store or relay the message, so they see the header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any, Literal

from alephsmtp import replies as R
from alephsmtp.events import (
    CommandEventArgs,
    MessageChunkEventArgs,
    MessageDiscardedEventArgs,
    MessageReceivedEventArgs,
)
from alephsmtp.replies import Reply

from .dmarc_check import check_dmarc, from_domain
from .resolver import DnsResolver, Resolver
from .results import AuthResults, SpfResult
from .spf_check import check_spf
from .verifier import MalformedHeader, MessageVerifier, parse_headers

__all__ = ["METHODS", "MailAuth", "Policy"]

log = logging.getLogger("alephsmtp.mailauth")

Policy = Literal["annotate", "enforce"]
METHODS = ("spf", "dkim", "arc", "dmarc")

# RFC 7372 / 3463: X.7.1 delivery not authorized (DMARC p=reject, RFC 7489 10.3 and 15.4's
# example); a lookup that failed is temporary (4.7.5 as the project asks), never a bounce.
_R_DMARC_REJECT = "Message rejected per DMARC policy of {domain}"


class MailAuth:
    """Sender authentication for the sessions it is attached to.

    ``resolver`` answers the DNS questions (default: a
    [`DnsResolver`][alephsmtp.mailauth.resolver.DnsResolver] on the system's name servers, shared by
    every session, so its cache is warm). ``methods`` chooses among ``spf``, ``dkim``, ``arc`` and
    ``dmarc``. ``policy="annotate"`` (default) only records and annotates; ``policy="enforce"`` also
    answers per DMARC: ``p=reject`` (after ``pct=``) gets ``550 5.7.1``, a DMARC verdict that DNS
    trouble kept from being made gets ``451 4.7.5`` — never a permanent refusal for a lookup error;
    ``p=quarantine`` is accepted and left to the next handler
    (``envelope.auth_results.dmarc.disposition``). ``authserv_id`` names this server in the header
    (default: the session's hostname). ``timeout`` bounds each DNS lookup, ``spf_timeout`` a whole
    SPF evaluation. ``header=False`` adds no ``Authentication-Results`` field; by default existing
    ones that claim this ``authserv_id`` are removed first (RFC 8601 5: they are forged).
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        methods: Iterable[str] = METHODS,
        policy: Policy = "annotate",
        authserv_id: str | None = None,
        timeout: float = 10.0,
        spf_timeout: float = 20.0,
        header: bool = True,
        remove_forged: bool = True,
        min_key_bits: int = 1024,
        max_header_size: int = 1 << 20,
        sample: Callable[[], float] = random.random,
    ) -> None:
        chosen = tuple(method.strip().lower() for method in methods)
        unknown = set(chosen) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s): {', '.join(sorted(unknown))}")
        if policy not in ("annotate", "enforce"):
            raise ValueError("policy must be 'annotate' or 'enforce'")
        self.resolver: Resolver = resolver if resolver is not None else DnsResolver(timeout=timeout)
        self.methods = frozenset(chosen)
        self.policy = policy
        self.authserv_id = authserv_id
        self.timeout = timeout
        self.spf_timeout = spf_timeout
        self.header = header
        self.remove_forged = remove_forged
        self.min_key_bits = min_key_bits
        self.max_header_size = max_header_size
        self.sample = sample

    def __repr__(self) -> str:
        return f"<MailAuth {','.join(sorted(self.methods))} policy={self.policy}>"

    def attach(self, session: Any) -> None:
        """Add this session's handlers (see the module's documentation)."""
        _SessionAuth(self, session)

    # --- the steps, usable without a session --------------------------------------------

    async def check_spf(
        self, client_ip: str, mail_from: str, helo: str
    ) -> tuple[SpfResult | None, SpfResult | None]:
        """SPF for the MAIL FROM identity (the HELO identity for ``<>``) and for the HELO
        identity: ``(spf, spf_helo)``; ``(None, None)`` when SPF is not among the methods."""
        if "spf" not in self.methods:
            return None, None
        helo_checked = _checkable_helo(helo)
        mail = check_spf(self.resolver, client_ip, mail_from, helo, timeout=self.spf_timeout)
        if not mail_from or not helo_checked:
            spf = await mail
            return spf, (spf if not mail_from and helo_checked else None)
        helo_check = check_spf(
            self.resolver, client_ip, "", helo, identity="helo", timeout=self.spf_timeout
        )
        spf, spf_helo = await asyncio.gather(mail, helo_check)
        return spf, spf_helo

    def verifier(self) -> MessageVerifier:
        """A new DKIM/ARC verifier with this configuration, to
        [`feed()`][alephsmtp.mailauth.verifier.MessageVerifier.feed]."""
        return MessageVerifier(
            dkim="dkim" in self.methods or "dmarc" in self.methods,
            arc="arc" in self.methods,
            max_header_size=self.max_header_size,
            min_key_bits=self.min_key_bits,
        )

    async def evaluate(
        self,
        verifier: MessageVerifier,
        results: AuthResults,
    ) -> AuthResults:
        """DKIM and ARC from a fed ``verifier``, then DMARC, into ``results``."""
        dkim_results, arc = await verifier.verify(self.resolver, timeout=self.timeout)
        if "dkim" in self.methods and dkim_results is not None:
            results.dkim = dkim_results
            results.dkim_checked = True
        results.arc = arc
        if "dmarc" in self.methods:
            if verifier.header_too_large:
                domain, why = None, f"header section larger than {self.max_header_size} octets"
            elif verifier.malformed:
                domain, why = None, f"malformed header section: {verifier.malformed}"
            else:
                domain, why = from_domain(verifier.from_header())
            results.dmarc = await check_dmarc(
                self.resolver,
                domain,
                results.spf,
                dkim_results or [],
                author_error=why,
                timeout=self.timeout,
                sample=self.sample,
            )
        return results

    async def check(
        self,
        message: bytes,
        *,
        client_ip: str,
        helo: str,
        mail_from: str,
        authserv_id: str = "localhost",
    ) -> AuthResults:
        """Every method on a whole message, outside any session."""
        spf, spf_helo = await self.check_spf(client_ip, mail_from, helo)
        results = AuthResults(self.authserv_id or authserv_id, spf=spf, spf_helo=spf_helo)
        verifier = self.verifier()
        verifier.feed(message)
        return await self.evaluate(verifier, results)

    def reply(self, results: AuthResults) -> Reply | None:
        """The policy's answer to a message with these results (``None``: accept)."""
        dmarc = results.dmarc
        if self.policy != "enforce" or dmarc is None:
            return None
        if dmarc.result == "fail" and dmarc.disposition == "reject":
            return Reply(550, "5.7.1", _R_DMARC_REJECT.format(domain=dmarc.domain))
        if dmarc.result == "temperror":
            return R.MAILAUTH_TEMPFAIL
        return None

    def annotate(self, message: bytes, results: AuthResults) -> bytes:
        """``message`` with the ``Authentication-Results`` header on top (and forged ones
        claiming this authserv-id removed)."""
        if self.remove_forged:
            message = remove_results_of(message, results.authserv_id)
        return results.header() + message


def _checkable_helo(helo: str) -> bool:
    """A HELO name SPF can check: a dotted domain, not an address literal (RFC 7208 2.3)."""
    if not helo or "." not in helo or helo.startswith("["):
        return False
    try:
        ipaddress.ip_address(helo)
    except ValueError:
        return True
    return False


def remove_results_of(message: bytes, authserv_id: str) -> bytes:
    """``message`` without the ``Authentication-Results`` fields whose authserv-id is
    ``authserv_id`` (RFC 8601 5: a border MTA removes such fields, which only it may add)."""
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep or b"uthentication-" not in head:
        return message
    wanted = authserv_id.lower().encode("utf-8", "replace")
    kept: list[bytes] = []
    try:
        fields = parse_headers(head + b"\r\n")
    except MalformedHeader:
        return message
    changed = False
    for name, value in fields:
        if name.lower() == b"authentication-results":
            first = value.split(b";", 1)[0].split()
            if first and first[0].lower() == wanted:
                changed = True
                continue
        kept.append(name + b":" + value)
    if not changed:
        return message
    return b"".join(kept) + b"\r\n" + body


class _SessionAuth:
    """One session's state: its SPF results and the verifier of the message streaming in."""

    __slots__ = ("auth", "session", "spf", "spf_helo", "stream_handler", "verifier")

    def __init__(self, auth: MailAuth, session: Any) -> None:
        self.auth = auth
        self.session = session
        self.spf: SpfResult | None = None
        self.spf_helo: SpfResult | None = None
        self.verifier: MessageVerifier | None = None
        self.stream_handler: Any = None
        session.mail += self.on_mail
        session.rcpt += self.on_rcpt
        session.message_received += self.on_message
        session.message_discarded += self.on_discarded

    def _authserv_id(self) -> str:
        if self.auth.authserv_id:
            return self.auth.authserv_id
        config = getattr(self.session, "config", None)
        return str(getattr(config, "hostname", None) or "localhost")

    def _results(self) -> AuthResults:
        return AuthResults(self._authserv_id(), spf=self.spf, spf_helo=self.spf_helo)

    async def on_mail(self, session: Any, e: CommandEventArgs[Any]) -> None:
        self.spf = self.spf_helo = None
        self.verifier = None
        # Stream along when the session streams (someone else takes message_chunk); else the
        # whole message comes to message_received and adding a chunk handler would take it.
        chunk_handlers = session.message_chunk.handlers
        if chunk_handlers and self.stream_handler not in chunk_handlers:
            self.stream_handler = self.on_chunk
            session.message_chunk += self.stream_handler
        peer = session.peer
        client_ip = peer[0] if isinstance(peer, tuple) else str(peer or "")
        mail_from = str(e.command.return_path or "")
        try:
            self.spf, self.spf_helo = await self.auth.check_spf(
                client_ip, mail_from, session.helo_name or ""
            )
        except Exception:
            session.log.exception("SPF check failed")
            self.spf = SpfResult("temperror", reason="local error", sender=mail_from)

    def on_rcpt(self, session: Any, e: CommandEventArgs[Any]) -> None:
        envelope = getattr(session, "envelope", None)
        if envelope is not None and envelope.auth_results is None:
            envelope.auth_results = self._results()

    def on_chunk(self, session: Any, e: MessageChunkEventArgs) -> None:
        if e.offset == 0 or self.verifier is None:
            self.verifier = self.auth.verifier()
        self.verifier.feed(e.chunk)

    def on_discarded(self, session: Any, e: MessageDiscardedEventArgs) -> None:
        self.verifier = None

    async def on_message(self, session: Any, e: MessageReceivedEventArgs) -> Reply | None:
        auth = self.auth
        if e.streamed:
            verifier = self.verifier if self.verifier is not None else auth.verifier()
        else:
            verifier = auth.verifier()
            verifier.feed(e.message)
        self.verifier = None
        results = self._results()
        try:
            await auth.evaluate(verifier, results)
        except Exception:
            session.log.exception("mail authentication failed")
            return R.MAILAUTH_LOCAL_ERROR if auth.policy == "enforce" else None
        e.envelope.auth_results = results
        if auth.header and not e.streamed:
            e.message = auth.annotate(e.message, results)
        reply = auth.reply(results)
        if reply is not None:
            session.log.info("message refused: %s (%s)", reply, results.dmarc)
        return reply
