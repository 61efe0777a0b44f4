"""Sender authentication: SPF, DKIM, ARC and DMARC verification, DKIM signing and ARC sealing.

Optional: ``pip install alephsmtp[mailauth]`` brings dkimpy, pyspf, dnspython, authres and
publicsuffixlist. ``import alephsmtp`` never imports this package.

::

    from alephsmtp.mailauth import MailAuth

    auth = MailAuth(policy="enforce")          # DNS through the system's resolver

    def on_session(session):
        auth.attach(session)                    # first, so later handlers see the header
        session.message_received += store

See ``docs/mailauth.md``.
"""

from __future__ import annotations

try:
    import authres  # noqa: F401
    import dkim  # noqa: F401
    import dns.asyncresolver  # noqa: F401
    import publicsuffixlist  # noqa: F401
    import spf  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"alephsmtp.mailauth needs the 'mailauth' extra: pip install 'alephsmtp[mailauth]' "
        f"({error})"
    ) from error

from .bodyhash import BodyCanonicalizer, BodyHasher
from .dmarc_check import check_dmarc, from_domain, organizational_domain
from .handler import METHODS, MailAuth, Policy, remove_results_of
from .resolver import DnsError, DnsResolver, Resolver, StaticResolver
from .results import ArcResult, AuthResults, DkimResult, DmarcResult, MethodResult, SpfResult
from .signer import DEFAULT_SIGNED_HEADERS, DkimSigner
from .spf_check import check_spf
from .verifier import MessageVerifier

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "METHODS",
    "ArcResult",
    "AuthResults",
    "BodyCanonicalizer",
    "BodyHasher",
    "DkimResult",
    "DkimSigner",
    "DmarcResult",
    "DnsError",
    "DnsResolver",
    "MailAuth",
    "MessageVerifier",
    "MethodResult",
    "Policy",
    "Resolver",
    "SpfResult",
    "StaticResolver",
    "check_dmarc",
    "check_spf",
    "from_domain",
    "organizational_domain",
    "remove_results_of",
]
