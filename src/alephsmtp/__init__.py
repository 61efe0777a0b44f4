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
from .commands import (
    DataCommand,
    EhloCommand,
    ExpnCommand,
    HeloCommand,
    HelpCommand,
    MailCommand,
    NoopCommand,
    QuitCommand,
    RcptCommand,
    RsetCommand,
    SmtpCommand,
    VrfyCommand,
)
from .envelope import SmtpEnvelope
from .errors import SmtpError
from .events import (
    CommandEventArgs,
    ConnectionLostEventArgs,
    Event,
    EventArgs,
    MessageReceivedEventArgs,
)
from .parser import IMPLEMENTATION
from .replies import Reply
from .server import SmtpServer
from .session import SessionConfig, SmtpSession

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATION",
    "Address",
    "CommandEventArgs",
    "ConnectionLostEventArgs",
    "DataCommand",
    "EhloCommand",
    "Event",
    "EventArgs",
    "ExpnCommand",
    "HeloCommand",
    "HelpCommand",
    "MailCommand",
    "MessageReceivedEventArgs",
    "NoopCommand",
    "QuitCommand",
    "RcptCommand",
    "Reply",
    "RsetCommand",
    "SessionConfig",
    "SmtpCommand",
    "SmtpEnvelope",
    "SmtpError",
    "SmtpServer",
    "SmtpSession",
    "VrfyCommand",
    "__version__",
]
