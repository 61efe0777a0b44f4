"""Compatibility layers: programs written for another SMTP server library, run on alephsmtp.

[`alephsmtp.compat.aiosmtpd`][alephsmtp.compat.aiosmtpd] runs an aiosmtpd 1.4 program (its handler
classes, controllers and ``SMTP`` parameters) on alephsmtp's engine; the program changes one import
line. See ``docs/aiosmtpd.md``.
"""

__all__: list[str] = []
