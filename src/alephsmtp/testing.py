"""A real SMTP server for tests: in a background thread, capturing every message it accepts.

For any test, with any client, synchronous or not::

    from alephsmtp.testing import SmtpTestServer

    with SmtpTestServer() as server:             # 127.0.0.1, a port the OS chose
        with smtplib.SMTP(server.host, server.port) as client:
            client.sendmail("a@example.org", ["b@example.net"], b"Subject: hi\\r\\n\\r\\nhi\\r\\n")
        (captured,) = server.messages
        assert captured.envelope.recipients == ["b@example.net"]
        assert captured.message["Subject"] == "hi"

And as a pytest plugin (``-p alephsmtp.testing``, or the installed entry point): the
``smtp_server`` fixture is a started [`SmtpTestServer`][alephsmtp.testing.SmtpTestServer],
stopped after the test; the ``smtp_server`` marker gives its options, and
``smtp_server_factory`` starts as many as needed::

    @pytest.mark.smtp_server(tls=True, auth={"alice": "s3cret"}, max_message_size=1 << 20)
    def test_submission(smtp_server):
        with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
            client.starttls(context=smtp_server.client_context)
            client.login("alice", "s3cret")
            ...

The server runs the library's own [`SmtpServer`][alephsmtp.server.SmtpServer] on an event loop of
its own (an [`alephsmtp.Controller`][alephsmtp.controller.Controller], which adds the capture), so
the code under test may be synchronous, or ``async`` on another loop.

PYTEST_DONT_REWRITE: the plugin asserts nothing, and a test module may import this module before
it names it in ``pytest_plugins``; this marker keeps pytest from warning that it cannot rewrite.
"""

from __future__ import annotations

import email
import email.policy
import functools
import inspect
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from email.message import EmailMessage
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import replies as R
from .controller import _LOOPBACK, Controller
from .envelope import SmtpEnvelope
from .events import AuthEventArgs, MessageReceivedEventArgs, Pending, run_chain
from .replies import coerce_reply
from .server import SmtpServer
from .session import OnSession, SmtpSession, TlsInfo

if TYPE_CHECKING:
    import trustme

__all__ = ["CapturedMessage", "SmtpTestServer"]


class CapturedMessage:
    """A message the test server accepted: its envelope, its bytes, and the parsed message.

    ``data`` (also ``message_bytes``) is the message exactly as received: unstuffed, CRLF line
    endings, no trace headers added (empty if your ``on_session`` added ``message_chunk``
    handlers, which take the body as it streams in). ``message`` parses it on first use with
    ``email.policy.default``. ``tls`` and ``authenticated_as`` are what the session knew when
    the message arrived.
    """

    __slots__ = ("_message", "authenticated_as", "data", "envelope", "tls")

    def __init__(
        self,
        envelope: SmtpEnvelope,
        data: bytes,
        *,
        tls: TlsInfo | None = None,
        authenticated_as: str | None = None,
    ) -> None:
        self.envelope = envelope
        self.data = data
        self.tls = tls
        self.authenticated_as = authenticated_as
        self._message: EmailMessage | None = None

    @property
    def message_bytes(self) -> bytes:
        """The raw message (the same as `data`)."""
        return self.data

    @property
    def message(self) -> EmailMessage:
        """The message parsed by `email` with ``email.policy.default``."""
        if self._message is None:
            # Two threads may parse at once; both get an equal result, so no lock.
            self._message = email.message_from_bytes(self.data, policy=email.policy.default)
        return self._message

    def __repr__(self) -> str:
        envelope = self.envelope
        return (
            f"<CapturedMessage from <{envelope.return_path or ''}> "
            f"to {[str(r) for r in envelope.recipients]} ({len(self.data)} bytes)>"
        )


class SmtpTestServer:
    """An [`SmtpServer`][alephsmtp.server.SmtpServer] in a background thread with its own event
    loop.

    ``start()`` returns once it listens (on ``host``; ``port`` 0 lets the OS choose, see
    [`port`][alephsmtp.testing.SmtpTestServer.port]), ``stop()`` shuts it down gracefully and joins
    the thread; or use it as a context manager. Every message the server accepts lands in
    `messages`.

    ``on_session(session)`` is called for every session, as with ``SmtpServer``, to add
    handlers of your own: refuse a recipient, answer a message with ``452``, look at EHLO.
    Whatever your ``message_received`` handlers answer, a message is captured only when the
    client was told it was accepted (2xx).

    TLS and AUTH: ``tls=True`` makes a certificate for ``localhost``, ``127.0.0.1`` and ``::1``
    signed by a test CA (with ``trustme``, in the ``testing`` extra) and offers STARTTLS;
    `client_context` trusts it. Or give your own ``tls_context``. ``credentials``
    (``{"user": "password"}``) accepts those users on AUTH, after your own ``auth`` handlers
    had their say; without TLS it also sets ``auth_over_plaintext=True`` unless you gave it,
    as AUTH would never be offered otherwise. ``require_tls``, ``auth_mechanisms``,
    ``auth_require`` and ``auth_over_plaintext`` are passed on when given.

    Every other keyword goes to ``SmtpServer`` (``max_message_size``, ``lmtp``,
    ``implicit_tls``, ...). ``hostname`` defaults to ``localhost`` here (the server's own
    default asks DNS for this host's name, which can stall a test run for seconds),
    ``shutdown_grace`` to 1 second, and password guessing is neither slowed down nor cut
    (``auth_failure_delay=0``, ``max_auth_failures=0``) unless you ask.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_session: OnSession | None = None,
        tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool | None = None,
        auth_mechanisms: Sequence[str] | None = None,
        auth_require: bool | None = None,
        auth_over_plaintext: bool | None = None,
        credentials: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        if tls and tls_context is not None:
            raise ValueError("give tls=True or a tls_context, not both")
        self.host = host
        self.on_session = on_session
        self.credentials: dict[str, str] = dict(credentials or {})
        #: An SSL context that trusts the server's certificate (``tls=True`` only).
        self.client_context: ssl.SSLContext | None = None
        #: The test CA's certificate in PEM, for clients that want a file (``tls=True`` only).
        self.ca_pem: bytes | None = None
        if tls:
            ca = _test_ca()
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            _server_certificate().configure_cert(tls_context)
            self.client_context = ssl.create_default_context()
            ca.configure_trust(self.client_context)
            self.ca_pem = ca.cert_pem.bytes()
        # The TLS and AUTH keywords go to SmtpServer only when given, so a server without
        # them still serves every test that does not ask for them.
        given = {
            "tls_context": tls_context,
            "require_tls": require_tls,
            "auth_mechanisms": tuple(auth_mechanisms) if auth_mechanisms is not None else None,
            "auth_require": auth_require,
            "auth_over_plaintext": auth_over_plaintext,
        }
        if self.credentials and tls_context is None and auth_over_plaintext is None:
            given["auth_over_plaintext"] = True
        options.setdefault("hostname", "localhost")
        options.setdefault("shutdown_grace", 1.0)
        # A test may try wrong passwords as often as it likes, without waiting.
        options.setdefault("auth_failure_delay", 0.0)
        options.setdefault("max_auth_failures", 0)
        options.update({name: value for name, value in given.items() if value is not None})
        #: Every message accepted since the start (or the last ``clear()``), in order. The
        #: server thread appends; list operations are atomic, so reading it is safe.
        self.messages: list[CapturedMessage] = []
        self._arrived = threading.Condition()
        # The server is made now, so that a wrong option fails here, in the caller's thread.
        # asyncio's own loop, as tests expect of a loop they did not choose; daemon, so that
        # a test run that forgot stop() still exits.
        self._controller = Controller(
            self._on_session,
            host,
            port,
            name="alephsmtp-test-server",
            daemon=True,
            loop="asyncio",
            **options,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def controller(self) -> Controller:
        """The [`Controller`][alephsmtp.controller.Controller] that runs the server."""
        return self._controller

    @property
    def server(self) -> SmtpServer:
        """The running (or last) ``SmtpServer``: its ``config``, ``sessions``, buffer pools."""
        return self._controller.server

    @property
    def port(self) -> int:
        """The port listened on (the OS's choice when 0 was asked for); a new one per start."""
        return self._controller.port

    @property
    def connect_host(self) -> str:
        """Where a client on this host connects: ``host``, or loopback for a wildcard."""
        return _LOOPBACK.get(self.host, self.host)

    @property
    def address(self) -> tuple[str, int]:
        """``(connect_host, port)``."""
        return self.connect_host, self.port

    @property
    def is_running(self) -> bool:
        """Between [`start()`][alephsmtp.testing.SmtpTestServer.start] and
        [`stop()`][alephsmtp.testing.SmtpTestServer.stop]."""
        return self._controller.is_running

    def start(self) -> SmtpTestServer:
        """Start listening in a new thread; returns (itself) once it accepts connections.

        Each start makes a fresh ``SmtpServer`` (and, for port 0, a fresh port).
        """
        if self._controller.is_running:
            raise RuntimeError("the test server is already running")
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop gracefully (idle clients get ``421 4.3.2``) and join the thread.

        Safe to call when not running. Captured messages stay until
        [`clear()`][alephsmtp.testing.SmtpTestServer.clear].
        """
        self._controller.stop()

    def __enter__(self) -> SmtpTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<SmtpTestServer {self.host}:{self.port} {state}, {len(self.messages)} message(s)>"

    # --- messages ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget the captured messages."""
        with self._arrived:
            self.messages.clear()

    def wait_for_messages(self, count: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """Wait until at least ``count`` messages were captured; returns them all.

        Raises `TimeoutError` after ``timeout`` seconds. Not needed after a client's
        send returns: the message is captured before the client gets its ``250``.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(
                    f"{len(self.messages)} message(s) captured, {count} expected within {timeout} s"
                )
            return list(self.messages)

    def _capture(self, session: SmtpSession, e: MessageReceivedEventArgs) -> None:
        captured = CapturedMessage(
            e.envelope, e.message, tls=session.tls, authenticated_as=session.authenticated_as
        )
        with self._arrived:
            self.messages.append(captured)
            self._arrived.notify_all()

    # --- the server thread's side --------------------------------------------------------

    def _on_session(self, session: SmtpSession) -> Awaitable[None] | None:
        # The capturing handler goes first, so it sees the message before anyone answers, and
        # decides the reply by running the handlers added after it (by on_session or later).
        session.message_received += self._run_message_handlers
        hook = self.on_session
        result = hook(session) if hook is not None else None
        if inspect.isawaitable(result):
            return self._after(result, session)
        self._add_credentials(session)
        return None

    async def _after(self, pending: Awaitable[None], session: SmtpSession) -> None:
        await pending
        self._add_credentials(session)

    def _add_credentials(self, session: SmtpSession) -> None:
        # Last, so the test's own auth handlers decide first.
        if self.credentials:
            session.auth += self._check_credentials
        # The capturing handler goes before any that on_session put first (Event.prepend,
        # as the milters do), so that it still sees every answer.
        event = session.message_received
        if event.handlers[0] != self._run_message_handlers:
            event -= self._run_message_handlers
            event.prepend(self._run_message_handlers)

    def _check_credentials(self, session: SmtpSession, e: AuthEventArgs) -> bool:
        password = self.credentials.get(e.username)
        return password is not None and e.check_password(password)

    def _run_message_handlers(self, session: SmtpSession, e: MessageReceivedEventArgs) -> Any:
        """Run the other handlers as the session would (the one handler chain); capture the
        message if their answer accepts it."""
        others = [h for h in session.message_received.handlers if h != self._run_message_handlers]
        result = run_chain(others, session, e)
        if type(result) is Pending:
            return self._decided_later(result, session, e)
        return self._decided(result, session, e)

    async def _decided_later(
        self, pending: Pending, session: SmtpSession, e: MessageReceivedEventArgs
    ) -> Any:
        return self._decided(await pending.coroutine, session, e)

    def _decided(self, result: Any, session: SmtpSession, e: MessageReceivedEventArgs) -> Any:
        if _accepts(result):
            self._capture(session, e)
        return R.QUEUED if result is None else result


def _accepts(result: Any) -> bool:
    """Whether a ``message_received`` answer tells the client the message was accepted."""
    if result is None:
        return True
    if isinstance(result, (list, tuple)):  # LMTP: one reply per recipient
        return any(_accepts(each) for each in result)
    try:
        return coerce_reply(result).code // 100 == 2
    except (TypeError, ValueError):
        return False  # the session refuses it (554 5.3.0); so do we


@functools.lru_cache(maxsize=1)
def _test_ca() -> trustme.CA:
    # One CA per process: making keys is the slow part of TLS set-up, and tests may start
    # many TLS servers. trustme is imported here, as only tls=True needs it.
    try:
        import trustme
    except ImportError as error:
        raise ImportError(
            "SmtpTestServer(tls=True) makes its certificates with trustme: "
            "pip install 'alephsmtp[testing]'"
        ) from error
    return trustme.CA()


@functools.lru_cache(maxsize=1)
def _server_certificate() -> trustme.LeafCert:
    return _test_ca().issue_cert("localhost", "127.0.0.1", "::1")


# --- the pytest plugin -----------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the server above needs no pytest; only the fixtures below do
    _HAVE_PYTEST = False
else:
    _HAVE_PYTEST = True

if _HAVE_PYTEST:

    def pytest_configure(config: pytest.Config) -> None:
        """Register the ``smtp_server`` marker (so ``--strict-markers`` accepts it)."""
        config.addinivalue_line(
            "markers",
            "smtp_server(**options): options of the smtp_server fixture, the keywords of "
            "alephsmtp.testing.SmtpTestServer (tls=True, auth={'user': 'password'}, "
            "max_message_size=..., any SmtpServer option)",
        )

    @pytest.fixture
    def smtp_server_factory() -> Iterator[Callable[..., SmtpTestServer]]:
        """Start test servers: ``smtp_server_factory(**options)``; all stop after the test.

        The options are [`SmtpTestServer`][alephsmtp.testing.SmtpTestServer]'s keywords; ``auth`` is
        ``credentials``.
        """
        servers: list[SmtpTestServer] = []

        def start(**options: Any) -> SmtpTestServer:
            if "auth" in options:
                options["credentials"] = options.pop("auth")
            server = SmtpTestServer(**options)
            server.start()
            servers.append(server)
            return server

        yield start
        for server in reversed(servers):
            server.stop()

    @pytest.fixture
    def smtp_server(
        request: pytest.FixtureRequest, smtp_server_factory: Callable[..., SmtpTestServer]
    ) -> SmtpTestServer:
        """A started [`SmtpTestServer`][alephsmtp.testing.SmtpTestServer], stopped after the test.

        Options come from the ``@pytest.mark.smtp_server(...)`` marker nearest the test, and
        from ``request.param`` (a dict, for ``indirect`` parametrization), which wins.
        """
        options: dict[str, Any] = {}
        marker = request.node.get_closest_marker("smtp_server")
        if marker is not None:
            if marker.args:
                raise TypeError("the smtp_server marker takes keyword options only")
            options.update(marker.kwargs)
        param = getattr(request, "param", None)
        if param is not None:
            if not isinstance(param, Mapping):
                raise TypeError("an indirect smtp_server parameter must be a dict of options")
            options.update(param)
        return smtp_server_factory(**options)
