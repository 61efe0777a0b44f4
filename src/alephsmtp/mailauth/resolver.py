"""The resolver seam: every DNS question mail authentication asks goes through one method.

[`Resolver`][alephsmtp.mailauth.resolver.Resolver] is the protocol —
``await resolver.lookup(name, rdtype)`` returns the records as text — so tests, and users with a
cache of their own, can answer from anything.
[`DnsResolver`][alephsmtp.mailauth.resolver.DnsResolver] is the real one (dnspython's asyncio
resolver with a bounded LRU cache that keeps positive and negative answers for their TTL);
[`StaticResolver`][alephsmtp.mailauth.resolver.StaticResolver] answers from a mapping and can be
told to fail, for tests and for records a deployment pins.

Answers, one string per record:

- ``TXT``: the record's character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2), decoded as
  UTF-8 with ``surrogateescape`` so any bytes survive;
- ``A`` / ``AAAA``: the address; ``PTR``: the name without the final dot;
- ``MX``: ``"preference exchange"``.

A name that does not exist (NXDOMAIN) and a name without records of the type (NODATA) both answer
``[]``: every caller treats them alike (a "void lookup", RFC 7208 4.6.4). A lookup that could not be
answered (SERVFAIL, REFUSED, a timeout) raises [`DnsError`][alephsmtp.mailauth.resolver.DnsError]: a
temporary failure, which the callers turn into ``temperror`` and never into a permanent verdict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

__all__ = ["DnsError", "DnsResolver", "Resolver", "StaticResolver"]

RDTYPES = frozenset({"TXT", "A", "AAAA", "MX", "PTR"})


class DnsError(Exception):
    """A lookup that could not be answered (SERVFAIL, REFUSED, timeout): try again later."""


@runtime_checkable
class Resolver(Protocol):
    """Anything that answers ``await lookup(name, rdtype)`` with a list of records as text."""

    async def lookup(self, name: str, rdtype: str) -> list[str]:
        """The records of type ``rdtype`` (``TXT``, ``A``, ``AAAA``, ``MX``, ``PTR``) at
        ``name``; ``[]`` when there are none; [`DnsError`][alephsmtp.mailauth.resolver.DnsError]
        when DNS could not say."""
        ...


class DnsResolver:
    """DNS over the network, with dnspython's asyncio resolver.

    ``nameservers`` (addresses) and ``port`` choose the servers; by default the system's
    (``/etc/resolv.conf``). ``timeout`` bounds each lookup, retries included. Answers are kept
    in an LRU cache of ``cache_size`` entries for their TTL, negative answers too (dnspython
    caches NXDOMAIN and NODATA by the zone's SOA minimum, RFC 2308), so a warm cache asks the
    network nothing. SERVFAIL is not retried and not cached.
    """

    def __init__(
        self,
        nameservers: Iterable[str] | None = None,
        *,
        port: int = 53,
        timeout: float = 5.0,
        cache_size: int = 4096,
    ) -> None:
        import dns.asyncresolver
        import dns.resolver

        servers = list(nameservers) if nameservers is not None else None
        resolver = dns.asyncresolver.Resolver(configure=servers is None)
        if servers is not None:
            resolver.nameservers = servers
        resolver.port = port
        resolver.timeout = timeout
        resolver.lifetime = timeout
        resolver.retry_servfail = False
        resolver.cache = dns.resolver.LRUCache(cache_size) if cache_size > 0 else None
        self._resolver = resolver
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<DnsResolver {self._resolver.nameservers} port {self._resolver.port}>"

    async def lookup(self, name: str, rdtype: str) -> list[str]:
        import dns.exception
        import dns.resolver

        if rdtype not in RDTYPES:
            raise ValueError(f"unsupported record type {rdtype!r}")
        qname = name if name.endswith(".") else name + "."
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
            raise DnsError(f"{rdtype} {name}: {error}") from None
        except dns.exception.DNSException as error:
            # EmptyLabel, LabelTooLong, NameTooLong...: a name DNS cannot hold has no records.
            if isinstance(error, (dns.resolver.YXDOMAIN,)):
                raise DnsError(f"{rdtype} {name}: {error}") from None
            return []
        rrset = answer.rrset
        if rrset is None:
            return []
        return [_render(rdtype, record) for record in rrset]


def _render(rdtype: str, record: object) -> str:
    if rdtype == "TXT":
        return b"".join(record.strings).decode("utf-8", "surrogateescape")  # type: ignore[attr-defined]
    if rdtype in ("A", "AAAA"):
        return str(record.address)  # type: ignore[attr-defined]
    if rdtype == "MX":
        exchange = record.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
        return f"{record.preference} {exchange}"  # type: ignore[attr-defined]
    return str(record.target.to_text(omit_final_dot=True))  # type: ignore[attr-defined]


class StaticResolver:
    """Answers from a mapping ``{(name, rdtype): [record, ...]}``; absent means none.

    ``failures`` is a set of ``(name, rdtype)`` that raise
    [`DnsError`][alephsmtp.mailauth.resolver.DnsError] (a SERVFAIL), and ``delay`` seconds pass
    before each answer (to show timeouts). ``queries`` lists every question asked, in order. Names
    match without case and without the final dot.
    """

    def __init__(
        self,
        records: Mapping[tuple[str, str], Iterable[str]] | None = None,
        *,
        failures: Iterable[tuple[str, str]] = (),
        delay: float = 0.0,
    ) -> None:
        self.records = {
            (_key(name), rdtype.upper()): list(values)
            for (name, rdtype), values in (records or {}).items()
        }
        self.failures = {(_key(name), rdtype.upper()) for name, rdtype in failures}
        self.delay = delay
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> list[str]:
        key = (_key(name), rdtype.upper())
        self.queries.append(key)
        if self.delay:
            await asyncio.sleep(self.delay)
        if key in self.failures:
            raise DnsError(f"{rdtype} {name}: SERVFAIL")
        return list(self.records.get(key, ()))


def _key(name: str) -> str:
    return name.rstrip(".").lower()
