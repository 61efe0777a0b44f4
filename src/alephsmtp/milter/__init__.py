"""Milters for alephsmtp: rspamd, OpenDKIM, OpenDMARC, ClamAV... in front of your handlers.

An MTA-side client of the Sendmail milter protocol (version 6), wired into sessions the way
Postfix's ``smtpd_milters`` is::

    from alephsmtp import SmtpServer
    from alephsmtp.milter import Milters

    milters = Milters(["inet:127.0.0.1:11332", "inet:127.0.0.1:8891"], default_action="tempfail")


    def on_session(session):
        session.message_received += store  # sees the message as the milters left it


    SmtpServer("0.0.0.0", 25).run(milters.wrap(on_session))

Modules: [`protocol`][alephsmtp.milter.protocol] (packets, sans-I/O),
[`message`][alephsmtp.milter.message] (header fields, edits), [`client`][alephsmtp.milter.client]
(one asyncio connection), [`chain`][alephsmtp.milter.chain] (the session wiring),
[`report`][alephsmtp.milter.report] (``envelope.milter``).
"""

from .chain import DefaultAction, Milter, Milters, MilterSession
from .client import (
    Endpoint,
    MilterClosed,
    MilterConnection,
    MilterError,
    MilterProtocolError,
    MilterTimeout,
    MilterUnavailable,
)
from .report import MilterEdit, MilterReport, MilterVerdict

__all__ = [
    "DefaultAction",
    "Endpoint",
    "Milter",
    "MilterClosed",
    "MilterConnection",
    "MilterEdit",
    "MilterError",
    "MilterProtocolError",
    "MilterReport",
    "MilterSession",
    "MilterTimeout",
    "MilterUnavailable",
    "MilterVerdict",
    "Milters",
]
