"""aiosmtpd 1.4, on alephsmtp's engine: change ``aiosmtpd`` to ``alephsmtp.compat.aiosmtpd``.

::

    from alephsmtp.compat.aiosmtpd.controller import Controller   # was: aiosmtpd.controller

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if not address.endswith("@example.com"):
                return "550 not relaying to that domain"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    controller = Controller(Handler())
    controller.start()

The submodules mirror aiosmtpd's: [`controller`][alephsmtp.compat.aiosmtpd.controller],
[`smtp`][alephsmtp.compat.aiosmtpd.smtp], [`handlers`][alephsmtp.compat.aiosmtpd.handlers],
[`lmtp`][alephsmtp.compat.aiosmtpd.lmtp],
[`proxy_protocol`][alephsmtp.compat.aiosmtpd.proxy_protocol]. What differs from aiosmtpd, and why,
is listed in ``docs/aiosmtpd.md``.
"""

from alephsmtp import __version__ as _alephsmtp_version

__all__ = ["ALEPHSMTP_VERSION", "__version__"]

# The aiosmtpd release whose API this layer follows; code that checks aiosmtpd.__version__
# for a feature sees the one it gets.
__version__ = "1.4.6"
ALEPHSMTP_VERSION = _alephsmtp_version
