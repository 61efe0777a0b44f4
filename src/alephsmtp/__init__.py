"""alephsmtp: a programmable SMTP server for asyncio, with a compiled parsing core.

Every SMTP command raises an event on its session; the handler's return value is the reply::

    from alephsmtp import SmtpServer

    def on_session(session):
        session.mail += lambda sender, e: print(e.command.return_path)
        session.message_received += lambda sender, e: "250 queued"
        session.start_transaction("220 mx.example.org ESMTP")

    SmtpServer("127.0.0.1", 8025).listen(on_session)
"""

from .addresses import Address
from .auth import Credentials
from .commands import (
    AuthCommand,
    BdatCommand,
    DataCommand,
    EhloCommand,
    ExpnCommand,
    HeloCommand,
    HelpCommand,
    LhloCommand,
    MailCommand,
    NoopCommand,
    QuitCommand,
    RcptCommand,
    RsetCommand,
    SmtpCommand,
    StarttlsCommand,
    VrfyCommand,
    XclientCommand,
    XforwardCommand,
)
from .config import SessionConfig
from .controller import Controller
from .envelope import SmtpEnvelope
from .errors import SmtpError
from .events import (
    AuthEventArgs,
    CommandEventArgs,
    ConnectionLostEventArgs,
    EhloEventArgs,
    Event,
    EventArgs,
    HandlerErrorEventArgs,
    MessageChunkEventArgs,
    MessageDiscardedEventArgs,
    MessageReceivedEventArgs,
)
from .extensions import Extension
from .metrics import Metrics
from .parser import IMPLEMENTATION
from .proxy import ProxyHeader, ProxyProtocolError
from .replies import Reply
from .server import SmtpServer
from .session import SessionKey, SmtpSession, State, TlsInfo

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATION",
    "Address",
    "AuthCommand",
    "AuthEventArgs",
    "BdatCommand",
    "CommandEventArgs",
    "ConnectionLostEventArgs",
    "Controller",
    "Credentials",
    "DataCommand",
    "EhloCommand",
    "EhloEventArgs",
    "Event",
    "EventArgs",
    "ExpnCommand",
    "Extension",
    "HandlerErrorEventArgs",
    "HeloCommand",
    "HelpCommand",
    "LhloCommand",
    "MailCommand",
    "MessageChunkEventArgs",
    "MessageDiscardedEventArgs",
    "MessageReceivedEventArgs",
    "Metrics",
    "NoopCommand",
    "ProxyHeader",
    "ProxyProtocolError",
    "QuitCommand",
    "RcptCommand",
    "Reply",
    "RsetCommand",
    "SessionConfig",
    "SessionKey",
    "SmtpCommand",
    "SmtpEnvelope",
    "SmtpError",
    "SmtpServer",
    "SmtpSession",
    "StarttlsCommand",
    "State",
    "TlsInfo",
    "VrfyCommand",
    "XclientCommand",
    "XforwardCommand",
    "__version__",
]
