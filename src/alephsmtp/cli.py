"""``alephsmtp`` / ``python -m alephsmtp``: a working SMTP server from the shell.

By default it listens on 127.0.0.1:8025 and prints every message it receives; ``--maildir``
stores them in a Maildir instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .handlers import MaildirStore, PrintMessage
from .parser import IMPLEMENTATION
from .server import SmtpServer
from .session import SmtpSession

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    parser = argparse.ArgumentParser(
        prog="alephsmtp",
        description="Run an SMTP server that prints (or stores) every message it receives.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8025, help="port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--hostname",
        default=None,
        help="name the server gives in its greeting (default: this host's FQDN)",
    )
    parser.add_argument(
        "--maildir",
        metavar="DIR",
        default=None,
        help="store messages in this Maildir instead of printing them",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=32 << 20,
        metavar="BYTES",
        help="largest message accepted, 0 for no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )
    parser.add_argument(
        "--version", action="version", version=f"alephsmtp {__version__} ({IMPLEMENTATION} parser)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    handler = MaildirStore(args.maildir) if args.maildir else PrintMessage()
    options = {"max_message_size": args.max_message_size}
    if args.hostname:
        options["hostname"] = args.hostname
    server = SmtpServer(args.host, args.port, **options)

    def on_session(session: SmtpSession) -> None:
        session.message_received += handler

    try:
        server.run(on_session)
    except OSError as error:
        print(
            f"alephsmtp: cannot listen on {args.host}:{args.port}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        pass
    return 0
