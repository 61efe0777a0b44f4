"""alephsmtp in front of the milters operators run: rspamd, OpenDKIM, OpenDMARC, ClamAV.

The real programs (Debian's packages, installed by scripts/install-peers), each started once
per module in the foreground from a configuration written to a tmp dir, on a loopback port,
and stopped at the end:

- rspamd's proxy worker in milter mode (self-scan, the stock rules with a five-entry TLD list
  so it starts in a second): GTUBE is refused with rspamd's reply, a clean message gets its
  X-Spamd-Result / X-Spam-Status headers;
- OpenDKIM as signer (mail from 127.0.0.1, an internal host) with a key made by
  opendkim-genkey, and as verifier (no internal hosts) reading that key from a TestPublicKeys
  file instead of DNS: the signature verifies (dkim=pass), a changed body does not;
- OpenDMARC behind the verifier, trusting its Authentication-Results: dmarc=none (the
  sandbox has no DNS for _dmarc records: a policy cannot be published, so only "none" and the
  header can be shown);
- clamav-milter in front of clamd, whose database is one .ndb signature for the EICAR test
  string written by the test (no download): EICAR is refused, a clean message is marked.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib

from _milterpeers import (  # the fixtures too: pytest finds them by name in this module
    CLAMAV_MILTER,
    CLAMD,
    EICAR,
    GTUBE,
    MESSAGE,
    OPENDKIM,
    OPENDKIM_GENKEY,
    OPENDMARC,
    RSPAMD,
    clamav_fixture,  # noqa: F401
    dkim_home_fixture,  # noqa: F401
    field,
    needs,
    opendkim_fixture,  # noqa: F401
    opendmarc_fixture,  # noqa: F401
    rspamd_fixture,  # noqa: F401
)
from alephsmtp import SmtpServer
from alephsmtp.milter import Milters

# --- alephsmtp in front of them ------------------------------------------------------------------


class Mx:
    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[Any] = []

    async def send(self, message: bytes = MESSAGE) -> tuple[int, str]:
        """One message; the server's reply to it (code, text)."""
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=60)
        await client.connect()
        try:
            errors, text = await client.sendmail("alice@example.org", ["bob@example.net"], message)
            assert not errors
            return 250, text
        except aiosmtplib.SMTPResponseException as error:
            return error.code, error.message
        finally:
            with contextlib.suppress(Exception):
                await client.quit()


@contextlib.asynccontextmanager
async def mx(*endpoints: str) -> AsyncIterator[Mx]:
    server = SmtpServer("127.0.0.1", 0, hostname="mx.test")
    box: Mx | None = None

    def on_session(session: Any) -> None:
        assert box is not None
        session.message_received += lambda s, e: box.received.append(e)

    milters = Milters(list(endpoints), command_timeout=30)
    await server.start(milters.wrap(on_session))
    box = Mx(server.port)
    try:
        yield box
    finally:
        await server.stop(grace=5)


# --- the tests -----------------------------------------------------------------------------------


@needs(RSPAMD)
async def test_rspamd_rejects_gtube(rspamd: str) -> None:
    async with mx(rspamd) as box:
        code, text = await box.send(MESSAGE.replace(b"this is a plain message.", GTUBE))
    assert (code, text) == (554, "5.7.1 Gtube pattern")
    assert box.received == []


@needs(RSPAMD)
async def test_rspamd_adds_its_headers_to_a_clean_message(rspamd: str) -> None:
    async with mx(rspamd) as box:
        code, _ = await box.send()
    assert code == 250
    (delivered,) = box.received
    (status,) = field(delivered.message, b"X-Spam-Status")
    assert status.startswith(b"No, score=")
    (result,) = field(delivered.message, b"X-Spamd-Result")
    assert result.startswith(b"default: False [")
    # The headers went at the end of the header section; the body is untouched.
    assert delivered.message.endswith(b"\r\n\r\nHello Bob,\r\nthis is a plain message.\r\n")
    report = delivered.envelope.milter
    assert {name for name, _ in report.added_headers} == {"X-Spamd-Result", "X-Spam-Status"}
    assert report.verdicts[-1].action == "accept"


@needs(OPENDKIM, OPENDKIM_GENKEY)
async def test_opendkim_signs_and_its_signature_verifies(opendkim: tuple[str, str]) -> None:
    signer, verifier = opendkim
    async with mx(signer) as signing:
        assert (await signing.send())[0] == 250
    signed = signing.received[0].message
    (signature,) = field(signed, b"DKIM-Signature")
    assert b"d=example.org" in signature
    assert b"s=test" in signature
    assert signed.startswith(b"DKIM-Signature: ")  # inserted at the top (index 0)
    assert signed.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])

    async with mx(verifier) as verifying:
        assert (await verifying.send(signed))[0] == 250
        assert (await verifying.send(signed.replace(b"Hello Bob", b"Hello Eve")))[0] == 250
    good, bad = (e.message for e in verifying.received)
    (results,) = field(good, b"Authentication-Results")
    assert results.startswith(b"mx.test;")
    assert b"dkim=pass" in results
    assert b"header.d=example.org" in results
    (results,) = field(bad, b"Authentication-Results")
    assert b"dkim=fail" in results


@needs(OPENDKIM, OPENDKIM_GENKEY, OPENDMARC)
async def test_opendmarc_after_opendkim(opendkim: tuple[str, str], opendmarc: str) -> None:
    signer, verifier = opendkim
    async with mx(signer) as signing:
        assert (await signing.send())[0] == 250
    signed = signing.received[0].message
    # A chain as smtpd_milters = verifier, opendmarc: the second milter reads the first's
    # Authentication-Results field, added to the message it is shown.
    async with mx(verifier, opendmarc) as box:
        assert (await box.send(signed))[0] == 250
    results = field(box.received[0].message, b"Authentication-Results")
    assert any(b"dkim=pass" in value for value in results)
    (dmarc,) = [value for value in results if b"dmarc=" in value]
    assert dmarc.startswith(b"mx.test;")
    assert b"dmarc=none" in dmarc
    assert b"header.from=example.org" in dmarc


@needs(CLAMD, CLAMAV_MILTER)
async def test_clamav_refuses_eicar_and_marks_clean_mail(clamav: tuple[str, Path]) -> None:
    endpoint, log = clamav
    async with mx(endpoint) as box:
        clean = await box.send()
        infected = await box.send(MESSAGE.replace(b"this is a plain message.", EICAR))
    assert clean[0] == 250
    assert infected[0] == 550
    (delivered,) = box.received
    assert field(delivered.message, b"X-Virus-Status") == [b"Clean"]
    assert field(delivered.message, b"X-Virus-Scanned")[0].startswith(b"clamav-milter ")
    # The test's own signature found it: the detection is not a download.
    assert "infected by Alephsmtp-Test.EICAR" in log.read_text()


@needs(RSPAMD, OPENDKIM, OPENDKIM_GENKEY, CLAMD, CLAMAV_MILTER)
async def test_three_real_milters_in_a_chain(
    rspamd: str, opendkim: tuple[str, str], clamav: tuple[str, Path]
) -> None:
    signer, _ = opendkim
    endpoint, _ = clamav
    async with mx(endpoint, rspamd, signer) as box:
        assert (await box.send())[0] == 250
        assert (await box.send(MESSAGE.replace(b"this is a plain message.", EICAR)))[0] == 550
    message = box.received[0].message
    assert field(message, b"X-Virus-Status") == [b"Clean"]
    assert field(message, b"X-Spam-Status")[0].startswith(b"No")
    assert message.startswith(b"DKIM-Signature: ")
    milters = [verdict.milter for verdict in box.received[0].envelope.milter.verdicts]
    assert milters == [endpoint, rspamd, signer]
