"""``aiosmtpd.lmtp``: [`LMTP`][alephsmtp.compat.aiosmtpd.lmtp.LMTP], an
[`SMTP`][alephsmtp.compat.aiosmtpd.smtp.SMTP] that speaks LMTP (RFC 2033): ``LHLO`` instead of
HELO/EHLO, which are refused.

After the message alephsmtp gives one reply per accepted recipient, as RFC 2033 4.2 requires
(aiosmtpd sends one reply in all, and an LMTP client then waits for the rest); the handler's
``handle_DATA`` reply is the reply for each. ``handle_EHLO`` is the ``LHLO`` hook, as in
aiosmtpd.

Use it from a controller by overriding ``factory``::

    class LMTPController(Controller):
        def factory(self):
            return LMTP(self.handler)
"""

from __future__ import annotations

from .smtp import SMTP

__all__ = ["LMTP"]


class LMTP(SMTP):
    """An LMTP server (RFC 2033) with aiosmtpd's hooks."""

    show_smtp_greeting: bool = False
    _lmtp = True
