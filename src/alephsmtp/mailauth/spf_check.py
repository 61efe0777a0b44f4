"""SPF (RFC 7208) with pyspf, asking its DNS questions through the resolver seam.

pyspf evaluates a policy synchronously and calls its module's ``DNSLookup`` for every question.
[`check_spf()`][alephsmtp.mailauth.spf_check.check_spf] runs that evaluation in a worker thread;
while it runs, the thread's lookups are answered by the
[`Resolver`][alephsmtp.mailauth.resolver.Resolver] on the event loop (``run_coroutine_threadsafe``),
so the loop never blocks and the resolver (and its cache) is the same one DKIM and DMARC use. Other
users of pyspf in the process are unaffected: without a resolver bound to the calling thread,
pyspf's own lookup runs.

pyspf enforces RFC 7208 4.6.4's limits (strict mode): ten lookups by ``include``, ``a``,
``mx``, ``ptr``, ``exists`` and ``redirect``; ten MX and PTR names; two void lookups; an
``include`` loop ends in one of them. All give ``permerror``. A lookup that fails or the whole
evaluation running past ``timeout`` gives ``temperror``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any

import spf

from .resolver import DnsError, Resolver
from .results import SpfResult

__all__ = ["check_spf"]

_local = threading.local()
_pyspf_lookup: Callable[..., Any] = spf.DNSLookup
# Enough threads that slow DNS for some clients does not queue SPF checks for the others;
# each one only waits on the event loop's lookups.
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="spf")


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> Any:
    bridge = getattr(_local, "bridge", None)
    if bridge is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return bridge(name, qtype)


spf.DNSLookup = _dns_lookup


class _Bridge:
    """Answers pyspf's lookups in its thread from the resolver on the loop, by a deadline."""

    def __init__(
        self, resolver: Resolver, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> None:
        self.resolver = resolver
        self.loop = loop
        self.deadline = deadline

    def __call__(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise spf.TempError(f"DNS: SPF evaluation timed out before {qtype} {name}")
        future = asyncio.run_coroutine_threadsafe(self.resolver.lookup(name, qtype), self.loop)
        try:
            records = future.result(remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise spf.TempError(f"DNS: {qtype} {name} timed out") from None
        except DnsError as error:
            raise spf.TempError(f"DNS: {error}") from None
        except ValueError:
            return []  # a record type the resolver does not answer (SPF, type 99)
        # pyspf's dnspython driver's shapes: TXT as a tuple of byte strings, MX as
        # (preference, exchange), A/AAAA/PTR as text.
        key = (name, qtype)
        if qtype == "TXT":
            return [(key, (record.encode("utf-8", "surrogateescape"),)) for record in records]
        if qtype == "MX":
            answers = []
            for record in records:
                preference, _, exchange = record.partition(" ")
                answers.append((key, (int(preference), exchange)))
            return answers
        return [(key, record) for record in records]


def _evaluate(bridge: _Bridge, ip: str, sender: str, helo: str, receiver: str) -> tuple[str, str]:
    _local.bridge = bridge
    try:
        query = spf.query(
            i=ip,
            s=sender,
            h=helo,
            receiver=receiver,
            strict=True,
            querytime=max(bridge.deadline - time.monotonic(), 0.001),
        )
        result, _code, explanation = query.check()
        return str(result), str(explanation)
    finally:
        _local.bridge = None


def _client_ip(ip: str) -> str:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # a dual-stack socket's IPv4 client
    return str(address)


async def check_spf(
    resolver: Resolver,
    client_ip: str,
    sender: str,
    helo: str,
    *,
    identity: str = "mailfrom",
    receiver: str = "",
    timeout: float = 20.0,
) -> SpfResult:
    """SPF for one identity (RFC 7208 2.3, 2.4).

    ``identity="mailfrom"`` checks ``sender`` (MAIL FROM's address; the null reverse-path
    checks ``postmaster@helo`` instead, as 2.4 says); ``identity="helo"`` checks the HELO
    name alone. ``timeout`` bounds the whole evaluation (4.6.4 suggests 20 seconds).
    """
    if identity == "helo":
        sender, checked = "", helo
    else:
        checked = sender if sender else helo
    domain = checked.rpartition("@")[2].lower() if checked else ""
    facts = {"identity": "helo" if identity == "helo" or not sender else "mailfrom"}
    try:
        ip = _client_ip(client_ip)
    except ValueError:
        return SpfResult("none", domain, reason="no client IP address", sender=checked, **facts)
    if not domain or "." not in domain:
        return SpfResult(
            "none", domain, reason="no domain to check", sender=checked, client_ip=ip, **facts
        )
    loop = asyncio.get_running_loop()
    bridge = _Bridge(resolver, loop, time.monotonic() + timeout)
    try:
        result, explanation = await asyncio.wait_for(
            loop.run_in_executor(_executor, _evaluate, bridge, ip, sender, helo, receiver),
            timeout + 1.0,
        )
    except asyncio.TimeoutError:
        result, explanation = "temperror", "SPF evaluation timed out"
    if result == "ambiguous":  # only in pyspf's "harsh" mode; not used here
        result = "neutral"
    return SpfResult(result, domain, reason=explanation, sender=checked, client_ip=ip, **facts)
