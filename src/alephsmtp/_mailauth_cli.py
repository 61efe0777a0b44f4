"""The command line's mail-authentication options (``--verify``, ``--dmarc-policy``,
``--dkim-sign``, ``--arc-seal``, ``--dns-server``), kept apart from
[`alephsmtp.cli`][alephsmtp.cli].

Nothing of the ``mailauth`` extra is imported until one of these options is used, so the
command line works without it.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from typing import Any

__all__ = ["add_arguments", "build"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "mail authentication (needs the extra: pip install 'alephsmtp[mailauth]')"
    )
    group.add_argument(
        "--verify",
        metavar="METHODS",
        help="check these of spf,dkim,dmarc,arc; record them in an Authentication-Results header",
    )
    group.add_argument(
        "--dmarc-policy",
        choices=["annotate", "enforce"],
        default="annotate",
        help="annotate only, or refuse per DMARC (p=reject: 550 5.7.1; DNS trouble: "
        "451 4.7.5) (default: %(default)s)",
    )
    group.add_argument(
        "--dkim-sign",
        metavar="DOMAIN:SELECTOR:KEYFILE",
        help="DKIM-sign messages from DOMAIN (and its subdomains) before they are relayed",
    )
    group.add_argument(
        "--arc-seal", action="store_true", help="with --dkim-sign: also add an ARC set"
    )
    group.add_argument(
        "--dns-server",
        metavar="ADDRESS[:PORT]",
        help="ask the DNS server at this address (default: the system's resolvers)",
    )


def _dns_server(text: str) -> tuple[list[str], int]:
    """``192.0.2.53``, ``192.0.2.53:5353``, ``2001:db8::53`` or ``[2001:db8::53]:5353``;
    ValueError for anything else."""
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(text)
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address, port = text, "53"
    ipaddress.ip_address(address)
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(port)
    return [address], int(port)


def build(
    args: argparse.Namespace, error: Callable[[str], Exception]
) -> tuple[Callable[[Any], None] | None, Callable[..., Any] | None]:
    """``(attach, signer)`` from the options: ``attach(session)`` adds verification; the
    signer is a ``message_received`` handler. ``error`` makes the CLI's error."""
    if not args.verify and not args.dkim_sign:
        if args.arc_seal or args.dns_server or args.dmarc_policy != "annotate":
            raise error(
                "--dmarc-policy, --arc-seal and --dns-server go with --verify or --dkim-sign"
            )
        return None, None
    try:
        from .mailauth import DkimSigner, DnsResolver, MailAuth
    except ImportError as missing:
        raise error(str(missing)) from None
    resolver = None
    if args.dns_server:
        try:
            nameservers, port = _dns_server(args.dns_server)
            resolver = DnsResolver(nameservers, port=port)
        except ValueError:
            raise error(
                f"--dns-server wants ADDRESS[:PORT] or [IPv6]:PORT (name servers are asked by "
                f"address), not {args.dns_server!r}"
            ) from None
    attach = None
    if args.verify:
        methods = [method for method in args.verify.split(",") if method.strip()]
        if not methods:
            raise error("--verify wants one or more of spf,dkim,dmarc,arc")
        try:
            auth = MailAuth(resolver, methods=methods, policy=args.dmarc_policy)
        except ValueError as bad:
            raise error(f"--verify: {bad}") from None
        attach = auth.attach
    elif args.dmarc_policy != "annotate":
        raise error("--dmarc-policy needs --verify")
    signer = None
    if args.dkim_sign:
        domain, _, rest = args.dkim_sign.partition(":")
        selector, _, keyfile = rest.partition(":")
        if not domain or not selector or not keyfile:
            raise error("--dkim-sign wants DOMAIN:SELECTOR:KEYFILE")
        try:
            signer = DkimSigner(domain, selector, keyfile, arc_seal=args.arc_seal)
        except (OSError, ValueError) as bad:
            raise error(f"--dkim-sign: {bad}") from None
    elif args.arc_seal:
        raise error("--arc-seal needs --dkim-sign")
    return attach, signer
