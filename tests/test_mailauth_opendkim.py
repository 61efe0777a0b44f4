"""DKIM against opendkim, both ways: opendkim signs and alephsmtp verifies, alephsmtp signs
and opendkim verifies (its keys fetched from our dnsmasq through its libunbound resolver).
opendkim runs in its test mode (``-t``), which drives the real filter code on a file."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("dkim", reason="the mailauth extra is not installed")

from _mailauth import (
    Zone,
    message,
    needs_opendkim,
    opendkim_sign,
    opendkim_verify,
    running_zone,
)
from alephsmtp.mailauth import DkimSigner, DnsResolver, MessageVerifier

pytestmark = needs_opendkim

BODY = b"Line one\r\nline  two with   spaces \t\r\n\r\n  indented line\r\n\r\n\r\n"


@pytest.fixture(scope="module")
def zone() -> Iterator[Zone]:
    yield from running_zone()


@pytest.fixture(scope="module")
def resolver(zone: Zone) -> DnsResolver:
    return DnsResolver(["127.0.0.1"], port=zone.dns.port, timeout=5.0)


async def verify(resolver: DnsResolver, data: bytes, piece: int = 97) -> list[str]:
    verifier = MessageVerifier()
    for start in range(0, len(data), piece):
        verifier.feed(data[start : start + piece])
    results, _ = await verifier.verify(resolver)
    return [result.result for result in results or []]


@pytest.mark.parametrize(
    "canonicalization", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]
)
def test_opendkim_signs_alephsmtp_verifies(
    zone: Zone, resolver: DnsResolver, canonicalization: str
) -> None:
    original = message(body=BODY)
    signed = opendkim_sign(
        zone.directory,
        original,
        domain="example.test",
        selector="sel",
        key=zone.key,
        canonicalization=canonicalization,
    )
    assert f"c={canonicalization}".encode() in signed
    assert asyncio.run(verify(resolver, signed)) == ["pass"]
    # opendkim agrees with itself through our DNS (the set-up is sound)...
    assert "dkim=pass" in opendkim_verify(zone.directory, signed, zone.dns.port)
    # ...and both see a body changed in transit.
    changed = signed.replace(b"Line one", b"Line 1")
    assert asyncio.run(verify(resolver, changed)) == ["fail"]
    assert "dkim=fail" in opendkim_verify(zone.directory, changed, zone.dns.port)


def test_opendkim_length_tag(zone: Zone, resolver: DnsResolver) -> None:
    # BodyLengthDB signs with l= for the domains it lists; extra text after it still passes.
    db = zone.directory / "bodylength.db"
    db.write_text("*\n")
    signed = opendkim_sign(
        zone.directory,
        message(body=BODY),
        domain="example.test",
        selector="sel",
        key=zone.key,
        extra=f"BodyLengthDB refile:{db}\n",
    )
    assert b" l=" in signed or b";l=" in signed or b"\tl=" in signed
    assert asyncio.run(verify(resolver, signed + b"appended footer\r\n")) == ["pass"]


@pytest.mark.parametrize("canonicalization", [("relaxed", "relaxed"), ("simple", "simple")])
def test_alephsmtp_signs_opendkim_verifies(zone: Zone, canonicalization: tuple[str, str]) -> None:
    signer = DkimSigner("example.test", "sel", zone.key, canonicalization=canonicalization)
    original = message(body=BODY)
    signed = signer.sign(original) + original
    verdict = opendkim_verify(zone.directory, signed, zone.dns.port)
    assert "dkim=pass" in verdict, verdict
    assert "header.d=example.test" in verdict
    tampered = signed.replace(b"indented line", b"indented lime")
    assert "dkim=fail" in opendkim_verify(zone.directory, tampered, zone.dns.port)
