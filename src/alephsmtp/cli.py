"""``alephsmtp`` / ``python -m alephsmtp``: a working SMTP server from the shell.

By default it listens on 127.0.0.1:8025 and prints every message it receives; options store
them instead (Maildir, mbox, a directory of ``.eml`` files), relay them to another server, or
discard them. TLS, AUTH, LMTP, limits, workers and the PROXY protocol are all options.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import __version__, _cli_handler, _mailauth_cli
from . import _cli_checks as _checks
from ._cli_checks import CliError
from .events import AuthEventArgs
from .handlers import Deliver, EmlDirectory, MaildirStore, MboxStore, PrintMessage, Relay, sink
from .parser import IMPLEMENTATION
from .server import SmtpServer
from .session import SmtpSession
from .workers import WorkersFailed

__all__ = ["DEFAULT_PORT", "build_parser", "check_credentials", "load_credentials", "main"]

log = logging.getLogger("alephsmtp.cli")

DEFAULT_PORT = 8025

_EXAMPLES = """\
examples:
  alephsmtp                                   print every message (127.0.0.1:8025)
  alephsmtp --maildir ~/Maildir               store messages in a Maildir
  alephsmtp --port 587 --tls-cert cert.pem --tls-key key.pem \\
            --auth-file users.txt --auth-require      submission with STARTTLS and AUTH
  alephsmtp --lmtp --port 24 --eml-dir /var/spool/lmtp   an LMTP server
  alephsmtp --lmtp --unix /run/alephsmtp/lmtp.sock --handler mymail:on_session
                                              LMTP on a socket, your own handler
  alephsmtp --host 0.0.0.0 --port 25 --workers 4 --proxy-protocol   behind HAProxy
  alephsmtp --milter inet:127.0.0.1:11332 --milter inet:127.0.0.1:8891   rspamd, then OpenDKIM
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    parser = _checks.ArgumentParser(
        prog="alephsmtp",
        description="Run an SMTP (or LMTP) server that prints, stores or relays every message.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen = parser.add_argument_group("listening")
    listen.add_argument(
        "--host",
        action="append",
        default=None,
        help="address to listen on; repeat for several (default: 127.0.0.1)",
    )
    listen.add_argument(
        "--port",
        type=_checks.whole_number(0, 65535),
        default=None,  # 8025; None tells that it was not given (--unix excludes it)
        help=f"port to listen on, 0 for one the OS picks (default: {DEFAULT_PORT})",
    )
    listen.add_argument(
        "--unix",
        metavar="PATH",
        help="listen on this Unix-domain socket instead of --host/--port",
    )
    listen.add_argument(
        "--unix-mode",
        type=_checks.permissions,
        default=None,
        metavar="MODE",
        help="with --unix: the socket file's permissions, in octal (default: 660)",
    )
    listen.add_argument(
        "--hostname",
        type=_checks.hostname,
        default=None,
        help="name in the greeting and the EHLO reply (default: this host's FQDN)",
    )
    listen.add_argument("--lmtp", action="store_true", help="speak LMTP (RFC 2033), not SMTP")
    listen.add_argument(
        "--workers",
        type=_checks.whole_number(1),
        default=1,
        metavar="N",
        help="serve from N processes sharing the port (SO_REUSEPORT; default: 1)",
    )
    listen.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="expect a PROXY protocol v1/v2 header from a load balancer",
    )
    listen.add_argument(
        "--proxy-trusted",
        action="append",
        type=_checks.network,
        default=None,
        metavar="NETWORK",
        help="with --proxy-protocol: networks the header may come from; repeatable "
        "(default: loopback)",
    )
    listen.add_argument(
        "--xclient-from",
        action="append",
        type=_checks.network,
        default=None,
        metavar="NETWORK",
        help="networks whose clients may send XCLIENT (an SMTP proxy naming the client); "
        "repeatable (default: nobody)",
    )
    listen.add_argument(
        "--xforward-from",
        action="append",
        type=_checks.network,
        default=None,
        metavar="NETWORK",
        help="networks whose clients may send XFORWARD (an MTA forwarding the original "
        "client's attributes); repeatable (default: nobody)",
    )
    listen.add_argument(
        "--no-uvloop", action="store_true", help="use asyncio's own loop even if uvloop is there"
    )

    output = parser.add_argument_group(
        "what happens to each message (default: print it; several may be combined, in order)"
    )
    output.add_argument("--maildir", metavar="DIR", help="store in this Maildir")
    output.add_argument("--mbox", metavar="FILE", help="append to this mbox file")
    output.add_argument("--eml-dir", metavar="DIR", help="one .eml file per message in DIR")
    output.add_argument(
        "--relay", metavar="HOST[:PORT]", help="forward to this SMTP server (port 25)"
    )
    output.add_argument("--sink", action="store_true", help="accept and discard")
    output.add_argument("--relay-starttls", action="store_true", help="use STARTTLS to the relay")
    output.add_argument(
        "--relay-ca-file",
        metavar="PEM",
        help="with --relay-starttls: trust these CA certificates for the relay "
        "(default: the system's)",
    )
    output.add_argument("--relay-user", metavar="USER", help="AUTH user name at the relay")
    output.add_argument(
        "--relay-password-file",
        metavar="FILE",
        help="file holding the relay's password (or set ALEPHSMTP_RELAY_PASSWORD)",
    )

    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-cert", metavar="PEM", help="certificate chain: offers STARTTLS")
    tls.add_argument("--tls-key", metavar="PEM", help="private key (default: in --tls-cert)")
    tls.add_argument(
        "--implicit-tls", action="store_true", help="TLS from the first byte (port 465 style)"
    )
    tls.add_argument("--require-tls", action="store_true", help="refuse MAIL before STARTTLS")

    auth = parser.add_argument_group("AUTH")
    auth.add_argument(
        "--auth-file",
        metavar="FILE",
        help="offer AUTH; FILE holds 'user:password' lines ('#' starts a comment)",
    )
    auth.add_argument("--auth-require", action="store_true", help="refuse MAIL before AUTH")
    auth.add_argument(
        "--auth-over-plaintext",
        "--auth-plaintext",  # its first name, kept
        action="store_true",
        help="offer AUTH without TLS too (for tests; RFC 4954 4 says SHOULD NOT)",
    )

    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-message-size",
        type=_checks.whole_number(0),
        default=32 << 20,
        metavar="BYTES",
        help="largest message, 0 for no limit (default: %(default)s)",
    )
    limits.add_argument(
        "--max-recipients",
        type=_checks.whole_number(0),
        default=1000,
        metavar="N",
        help="per message, 0 for no limit (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=_checks.whole_number(0),
        default=10000,
        metavar="N",
        help="at once, 0 for no limit but the descriptor limit's (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections-per-ip",
        type=_checks.whole_number(0),
        default=50,
        metavar="N",
        help="loopback exempt, 0 for no limit (default: %(default)s)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=_checks.seconds(zero=True),
        default=300.0,
        metavar="SECONDS",
        help="for each command line, whole; 0 for none (default: 300)",
    )
    limits.add_argument(
        "--data-timeout",
        type=_checks.seconds(zero=False),
        default=180.0,
        metavar="SECONDS",
        help="between reads of a message (default: 180)",
    )
    limits.add_argument(
        "--write-timeout",
        type=_checks.seconds(zero=True),
        default=60.0,
        metavar="SECONDS",
        help="a client that takes none of its replies this long is cut; 0 for never (default: 60)",
    )
    limits.add_argument(
        "--backlog",
        type=_checks.whole_number(1),
        default=1024,
        metavar="N",
        help="connections the kernel queues before they are accepted (default: 1024)",
    )
    limits.add_argument(
        "--forbid-unauth-pipelining",
        action="store_true",
        help="close clients that pipeline past EHLO/DATA/NOOP... before AUTH (Postfix 3.9)",
    )
    limits.add_argument(
        "--bare-newline",
        choices=["reject", "normalize"],
        default="reject",
        help="bare CR/LF policy, as Postfix's smtpd_forbid_bare_newline (default: reject)",
    )

    _mailauth_cli.add_arguments(parser)
    _cli_handler.add_arguments(parser)
    milters = parser.add_argument_group("milters (Postfix's smtpd_milters: rspamd, OpenDKIM, ...)")
    milters.add_argument(
        "--milter",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="a milter, inet:HOST:PORT or unix:PATH; repeat for several (in this order)",
    )
    milters.add_argument(
        "--milter-default-action",
        choices=["tempfail", "accept", "reject"],
        default="tempfail",
        help="when a milter cannot be used (default: %(default)s)",
    )

    parser.add_argument(
        "--metrics",
        type=_metrics_address,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics, for every worker "
        "(needs the metrics extra)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level, in any case (default: %(default)s)",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"alephsmtp {__version__} ({IMPLEMENTATION} parser)",
    )
    return parser


def _metrics_address(text: str) -> tuple[str | None, int]:
    """``--metrics``: HOST:PORT, checked now (and that prometheus-client is installed)."""
    try:
        from .prometheus import parse_address
    except ImportError:
        raise argparse.ArgumentTypeError(
            "needs prometheus-client: pip install 'alephsmtp[metrics]'"
        ) from None
    try:
        return parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def load_credentials(path: str) -> dict[str, str]:
    """``user:password`` lines; blank lines and ``#`` comments skipped."""
    credentials: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as file:
            for number, raw in enumerate(file, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                user, colon, password = line.partition(":")
                if not colon or not user:
                    raise CliError(f"{path}:{number}: expected 'user:password'")
                credentials[user] = password
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from None
    return credentials


# Checked for a user name the file does not know, so that an unknown user costs the same
# HMAC or comparison as a wrong password: no timing tells them apart (CRAM-MD5 would by 9 us).
_DUMMY_SECRET = secrets.token_urlsafe(24)


def check_credentials(credentials: dict[str, str], e: AuthEventArgs) -> bool:
    """Whether the AUTH exchange proved a password of ``credentials`` (user: password)."""
    secret = credentials.get(e.username)
    proved = e.check_password(_DUMMY_SECRET if secret is None else secret)
    return proved and secret is not None


def _message_handlers(args: argparse.Namespace) -> list[Callable[..., Any]]:
    """The outputs asked for, in a fixed order: stores first, the relay last."""
    handlers: list[Callable[..., Any]] = []
    try:
        if args.maildir:
            handlers.append(MaildirStore(args.maildir))
        if args.mbox:
            handlers.append(MboxStore(args.mbox))
        if args.eml_dir:
            handlers.append(EmlDirectory(args.eml_dir))
    except OSError as error:
        # Said as what it is, not as "cannot listen on ..." by main's OSError branch.
        raise CliError(f"cannot open {error.filename}: {error.strerror or error}") from None
    if args.relay:
        handlers.append(_relay(args))
    if args.sink:
        handlers.append(sink)
    if len(handlers) > 1:
        # All or nothing: when the relay fails, what was stored is taken back, so the
        # client's retry does not store the message twice.
        return [Deliver(*handlers)]
    # With a --handler of your own and no output, your handler is the whole behaviour.
    return handlers or ([] if args.handler else [PrintMessage()])


def _relay(args: argparse.Namespace) -> Relay:
    host, port = _checks.host_port(args.relay)
    password = os.environ.get("ALEPHSMTP_RELAY_PASSWORD") if args.relay_user else None
    if args.relay_password_file:
        try:
            with open(args.relay_password_file, encoding="utf-8") as file:
                password = file.read().strip()
        except OSError as error:
            raise CliError(f"cannot read {args.relay_password_file}: {error}") from None
    if (args.relay_user is None) != (password is None):
        raise CliError("--relay-user needs --relay-password-file or ALEPHSMTP_RELAY_PASSWORD")
    return Relay(
        host,
        port,
        starttls=args.relay_starttls,
        username=args.relay_user,
        password=password,
        tls_context=_checks.relay_tls_context(args.relay_ca_file) if args.relay_ca_file else None,
    )


def _build(
    args: argparse.Namespace,
) -> tuple[SmtpServer, Callable[[SmtpSession], Awaitable[None] | None]]:
    _checks.refuse_what_cannot_work(args)
    own = _cli_handler.load(args.handler, args.handler_arg) if args.handler else None
    handlers = _message_handlers(args)
    # Verification first (its header is what stores and the signer see), signing next.
    authenticate, signer = _mailauth_cli.build(args, CliError)
    if signer is not None:
        handlers.insert(0, signer)
    credentials = load_credentials(args.auth_file) if args.auth_file else None
    options: dict[str, Any] = {
        "max_message_size": args.max_message_size,
        "max_recipients": args.max_recipients,
        "max_connections": args.max_connections,
        "max_connections_per_ip": args.max_connections_per_ip,
        "idle_timeout": args.idle_timeout,
        "data_timeout": args.data_timeout,
        "write_timeout": args.write_timeout,
        "bare_newline": args.bare_newline,
        "forbid_unauth_pipelining": args.forbid_unauth_pipelining,
        "lmtp": args.lmtp,
        "require_tls": args.require_tls,
        "auth_require": args.auth_require,
        "auth_over_plaintext": args.auth_over_plaintext,
    }
    if args.hostname:
        options["hostname"] = args.hostname
    if args.tls_cert:
        options["tls_context"] = _checks.tls_context(args.tls_cert, args.tls_key)
    if args.proxy_trusted:
        options["proxy_trusted_networks"] = tuple(args.proxy_trusted)
    if args.xclient_from:
        options["xclient_networks"] = tuple(args.xclient_from)
    if args.xforward_from:
        options["xforward_networks"] = tuple(args.xforward_from)
    if args.unix:
        where: dict[str, Any] = {"path": args.unix}
        if args.unix_mode is not None:
            where["path_mode"] = args.unix_mode
    else:
        hosts = args.host or ["127.0.0.1"]
        port = DEFAULT_PORT if args.port is None else args.port
        where = {"host": hosts[0] if len(hosts) == 1 else hosts, "port": port}
    try:
        server = SmtpServer(
            **where,
            implicit_tls=args.implicit_tls,
            workers=args.workers,
            backlog=args.backlog,
            proxy_protocol=args.proxy_protocol,
            metrics=args.metrics,
            **options,
        )
    except ValueError as error:
        raise CliError(str(error)) from None

    def add_outputs(session: SmtpSession) -> None:
        for handler in handlers:
            session.message_received += handler

    async def outputs_after(pending: Awaitable[None], session: SmtpSession) -> None:
        await pending
        add_outputs(session)

    def on_session(session: SmtpSession) -> Awaitable[None] | None:
        if credentials is not None:
            session.auth += lambda s, e: check_credentials(credentials, e)
        if authenticate is not None:
            authenticate(session)
        if own is not None:
            # --handler: after the checks (its message_received sees the verification's
            # header), before the outputs (the first reply decides: it may answer instead).
            result = own(session)
            if inspect.isawaitable(result):
                return outputs_after(result, session)
        add_outputs(session)
        return None

    if args.milter:
        # The milters come first in every session; the greeting waits for their connect stage.
        from .milter import Milters

        try:
            milters = Milters(args.milter, default_action=args.milter_default_action)
        except ValueError as error:
            raise CliError(str(error)) from None
        return server, milters.wrap(on_session)
    return server, on_session


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted; returns the exit status (2: could not start,
    1: every worker failed)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        # Under --workers every line names its process: the supervisor's or a worker's.
        format="%(asctime)s "
        + ("[%(process)d] " if args.workers > 1 else "")
        + "%(name)s %(levelname)s %(message)s",
    )
    try:
        server, on_session = _build(args)
        server.run(on_session, loop="asyncio" if args.no_uvloop else "auto")
    except CliError as error:
        print(f"alephsmtp: {error}", file=sys.stderr)
        return 2
    except WorkersFailed as error:  # the log above says why each worker failed
        print(f"alephsmtp: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if args.unix:
            where = f"unix:{args.unix}"
        else:
            port = DEFAULT_PORT if args.port is None else args.port
            where = f"{', '.join(args.host or ['127.0.0.1'])} port {port}"
        print(f"alephsmtp: cannot listen on {where}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
