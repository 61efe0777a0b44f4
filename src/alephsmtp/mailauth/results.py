"""What mail authentication found, as values, and the ``Authentication-Results`` header.

Every method's result has the same four facts (``result``, ``domain``, ``selector``,
``reason``) and a few of its own. Result words are RFC 8601's (2.7): ``pass``, ``fail``,
``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``. The header is rendered by
``authres`` (RFC 8601 2.2 syntax) and folded one method per line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ArcResult",
    "AuthResults",
    "DkimResult",
    "DmarcResult",
    "MethodResult",
    "SpfResult",
]


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One method's verdict: ``result`` (RFC 8601 2.7), the ``domain`` it is about, the DKIM
    or ARC ``selector`` (``""`` where there is none) and a human ``reason``."""

    result: str
    domain: str = ""
    selector: str = ""
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.result == "pass"


@dataclass(frozen=True, slots=True)
class SpfResult(MethodResult):
    """SPF (RFC 7208) for one identity: ``identity`` is ``"mailfrom"`` or ``"helo"``,
    ``sender`` the address (or HELO name) checked, ``client_ip`` the address it was checked
    for. ``domain`` is the domain whose policy decided."""

    identity: str = "mailfrom"
    sender: str = ""
    client_ip: str = ""


@dataclass(frozen=True, slots=True)
class DkimResult(MethodResult):
    """One DKIM signature (RFC 6376): ``domain`` is its ``d=``, ``selector`` its ``s=``;
    ``identity`` its ``i=``, ``algorithm`` its ``a=``, ``signature`` the first characters of
    ``b=`` (``header.b``, RFC 6008), ``key_bits`` the key's size when it was found."""

    identity: str = ""
    algorithm: str = ""
    signature: str = ""
    key_bits: int | None = None


@dataclass(frozen=True, slots=True)
class ArcResult(MethodResult):
    """The ARC chain (RFC 8617): ``instances`` sets were present; ``domain`` and ``selector``
    are the newest ARC-Seal's; ``oldest_pass`` is the lowest instance whose AMS still
    validates (0 when all do)."""

    instances: int = 0
    oldest_pass: int = 0


@dataclass(frozen=True, slots=True)
class DmarcResult(MethodResult):
    """DMARC (RFC 7489) for the ``From:`` domain (``domain``).

    ``policy`` is the policy that applies (``p=``, or ``sp=`` for a subdomain whose record was
    found at the organizational domain): ``"none"``, ``"quarantine"`` or ``"reject"``;
    ``disposition`` is what to do after ``pct=`` sampling (RFC 7489 6.6.4). ``record_domain``
    is where the record was found; ``spf_aligned`` / ``dkim_aligned`` say which passing
    identifier aligned.
    """

    policy: str = "none"
    disposition: str = "none"
    record_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False


@dataclass(slots=True)
class AuthResults:
    """All the results of one message, kept on ``envelope.auth_results``.

    ``spf`` is the SPF result that counts for the message (MAIL FROM's, or the HELO identity's
    for the null reverse-path, RFC 7208 2.4); ``spf_helo`` the HELO identity's check
    (RFC 7208 2.3), when made. ``dkim`` has one entry per ``DKIM-Signature``, top to bottom.
    ``None`` means the method was not run.
    """

    authserv_id: str
    spf: SpfResult | None = None
    spf_helo: SpfResult | None = None
    dkim: list[DkimResult] = field(default_factory=list)
    dkim_checked: bool = False
    arc: ArcResult | None = None
    dmarc: DmarcResult | None = None

    def header(self) -> bytes:
        """The ``Authentication-Results:`` header field (RFC 8601), CRLF-terminated."""
        from authres import AuthenticationResultsHeader

        results = list(self._clauses())
        if not results:
            # RFC 8601 2.2: "none" when no method was applied.
            text = str(AuthenticationResultsHeader(authserv_id=self.authserv_id))
            return (text + "\r\n").encode("utf-8", "surrogateescape")
        head = str(AuthenticationResultsHeader(authserv_id=self.authserv_id, results=[]))
        # authres renders "Authentication-Results: id; none" without results: keep the name
        # and the authserv-id, then fold one method per line (RFC 5322 2.2.3).
        prefix = head.rsplit(";", 1)[0]
        text = prefix + ";\r\n\t" + ";\r\n\t".join(str(clause) for clause in results)
        return (text + "\r\n").encode("utf-8", "surrogateescape")

    def _clauses(self) -> list[object]:
        clauses: list[object] = []
        spf = self.spf
        if spf is not None:
            ptype = "helo" if spf.identity == "helo" else "mailfrom"
            clauses.append(_clause("spf", spf.result, spf.reason, [("smtp", ptype, spf.sender)]))
        if self.dkim_checked and not self.dkim:
            clauses.append(_clause("dkim", "none", "", []))
        for dkim in self.dkim:
            clauses.append(
                _clause(
                    "dkim",
                    dkim.result,
                    "" if dkim.passed else dkim.reason,
                    [
                        ("header", "d", dkim.domain),
                        ("header", "i", dkim.identity),
                        ("header", "s", dkim.selector),
                        ("header", "a", dkim.algorithm),
                        ("header", "b", dkim.signature),
                    ],
                )
            )
        arc = self.arc
        if arc is not None:
            clauses.append(
                _clause(
                    "arc",
                    arc.result,
                    "" if arc.result in ("pass", "none") else arc.reason,
                    [
                        ("header", "as.d", arc.domain),
                        ("header", "as.s", arc.selector),
                        ("header", "oldest-pass", str(arc.oldest_pass) if arc.passed else ""),
                    ],
                )
            )
        dmarc = self.dmarc
        if dmarc is not None:
            clauses.append(
                _clause(
                    "dmarc",
                    dmarc.result,
                    "" if dmarc.passed else dmarc.reason,
                    [
                        ("header", "from", dmarc.domain),
                        ("policy", "dmarc", dmarc.disposition if dmarc.result == "fail" else ""),
                    ],
                )
            )
        return clauses


def _clause(
    method: str, result: str, reason: str, properties: list[tuple[str, str, str]]
) -> object:
    """One ``method=result reason="..." ptype.property=value`` clause (RFC 8601 2.2)."""
    from authres import AuthenticationResult, AuthenticationResultProperty

    return AuthenticationResult(
        method,
        result=result,
        reason=_reason(reason),
        properties=[
            AuthenticationResultProperty(ptype, name, value)
            for ptype, name, value in properties
            if value
        ],
    )


def _reason(text: str) -> str | None:
    # A reason is a quoted string (RFC 8601 2.2 "reasonspec"): keep it printable and short.
    if not text:
        return None
    cleaned = " ".join(text.replace('"', "'").replace("\\", "/").split())
    return cleaned[:200]
