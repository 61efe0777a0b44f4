"""DMARC (RFC 7489): find the policy of the ``From:`` domain and evaluate alignment.

The organizational domain (3.2) comes from the Public Suffix List that the
``publicsuffixlist`` package ships (no download at run time). The record is looked up at
``_dmarc.<From domain>``, then at ``_dmarc.<organizational domain>`` (6.6.3), through the
resolver seam. DMARC passes when a passing SPF or DKIM identifier aligns with the From domain
(3.1: relaxed — same organizational domain — or strict — the same name — per ``aspf=`` and
``adkim=``).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import lru_cache

from .resolver import DnsError, Resolver
from .results import DkimResult, DmarcResult, SpfResult

__all__ = ["check_dmarc", "from_domain", "organizational_domain", "parse_record"]

_POLICIES = ("none", "quarantine", "reject")


@lru_cache(maxsize=1)
def _psl() -> object:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registered domain under the public suffix (RFC 7489 3.2); the name itself when
    it is a public suffix or unknown."""
    domain = domain.rstrip(".").lower()
    org = _psl().privatesuffix(domain)  # type: ignore[attr-defined]
    return str(org) if org else domain


def from_domain(values: Sequence[bytes]) -> tuple[str | None, str]:
    """The domain of the single author in the ``From:`` field(s), or ``(None, why)``.

    RFC 7489 6.6.1: a message with no From, several From fields or several authors gives no
    single domain to evaluate.
    """
    if len(values) != 1:
        return None, "no From header field" if not values else "several From header fields"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
    addresses = [address for _name, address in email.utils.getaddresses([text]) if address]
    if len(addresses) != 1:
        return None, "no single author address in From"
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    if not domain or "." not in domain:
        return None, "no domain in From"
    return domain, ""


def parse_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record (RFC 7489 6.3), or None when it is not one."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            if part.strip():
                return None
            continue
        tags.setdefault(name.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    return tags


async def _records(resolver: Resolver, domain: str, timeout: float) -> list[dict[str, str]]:
    texts = await asyncio.wait_for(resolver.lookup(f"_dmarc.{domain}", "TXT"), timeout)
    records = [parse_record(text) for text in texts if text.strip().startswith("v=DMARC1")]
    return [record for record in records if record is not None]


def _aligned(identifier: str, author: str, strict: bool) -> bool:
    identifier = identifier.rstrip(".").lower()
    if strict:
        return identifier == author
    return organizational_domain(identifier) == organizational_domain(author)


async def check_dmarc(
    resolver: Resolver,
    author_domain: str | None,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    author_error: str = "",
    timeout: float = 10.0,
    sample: Callable[[], float] = random.random,
) -> DmarcResult:
    """DMARC for a message whose From domain is ``author_domain``.

    ``spf`` is the MAIL FROM identity's SPF result (DMARC uses that identity, 3.1.2; for the
    null reverse-path the HELO identity stands in, as SPF itself does), ``dkim`` the results
    of every signature. ``sample`` returns a number in [0, 1) for ``pct=`` (6.6.4).
    """
    if author_domain is None:
        return DmarcResult("permerror", reason=author_error or "no From domain")
    org = organizational_domain(author_domain)
    try:
        records = await _records(resolver, author_domain, timeout)
        record_domain = author_domain
        if not records and org != author_domain:
            records = await _records(resolver, org, timeout)
            record_domain = org
    except (DnsError, asyncio.TimeoutError) as error:
        return DmarcResult(
            "temperror", author_domain, reason=f"DMARC record lookup failed: {error or 'timeout'}"
        )
    if not records:
        return DmarcResult("none", author_domain, reason="no DMARC record")
    if len(records) > 1:
        # 6.6.3: more than one record means no DMARC processing.
        return DmarcResult("none", author_domain, reason="several DMARC records")
    record = records[0]
    policy = record.get("p", "").lower()
    if policy not in _POLICIES:
        # 6.6.3: an invalid p= with a rua= is p=none; without one the record is ignored.
        if "rua" not in record:
            return DmarcResult("none", author_domain, reason="DMARC record has no valid p=")
        policy = "none"
    if record_domain != author_domain:
        # 6.6.3 / 6.3: sp= applies to subdomains that found the organizational record.
        subpolicy = record.get("sp", "").lower()
        if subpolicy in _POLICIES:
            policy = subpolicy
    strict_spf = record.get("aspf", "r").lower() == "s"
    strict_dkim = record.get("adkim", "r").lower() == "s"
    spf_aligned = bool(
        spf is not None and spf.passed and _aligned(spf.domain, author_domain, strict_spf)
    )
    dkim_aligned = any(
        result.passed and _aligned(result.domain, author_domain, strict_dkim) for result in dkim
    )
    found = DmarcResult(
        "none",
        author_domain,
        policy=policy,
        record_domain=record_domain,
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
    )
    if spf_aligned or dkim_aligned:
        which = " and ".join(
            name for name, ok in (("SPF", spf_aligned), ("DKIM", dkim_aligned)) if ok
        )
        return replace(found, result="pass", reason=f"{which} aligned")
    # Could a method that failed for a temporary reason have aligned? Then DMARC cannot
    # say "fail" yet (RFC 7489 6.6.2 / 8601 2.7.1): temperror, so the sender retries.
    spf_temp = (
        spf is not None
        and spf.result == "temperror"
        and _aligned(spf.domain, author_domain, strict_spf)
    )
    dkim_temp = any(
        result.result == "temperror" and _aligned(result.domain, author_domain, strict_dkim)
        for result in dkim
    )
    if spf_temp or dkim_temp:
        return replace(found, result="temperror", reason="an aligned identifier had a DNS error")
    disposition = policy
    try:
        pct = min(max(int(record.get("pct", "100")), 0), 100)
    except ValueError:
        pct = 100
    if pct < 100 and sample() * 100 >= pct:
        # 6.6.4: outside the sample, the next less strict policy applies.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return replace(
        found, result="fail", reason="no aligned SPF or DKIM pass", disposition=disposition
    )
