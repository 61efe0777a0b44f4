"""``aiosmtpd.controller`` on alephsmtp: start and stop a server around an aiosmtpd handler.

[`Controller`][alephsmtp.compat.aiosmtpd.controller.Controller] runs an
[`SmtpServer`][alephsmtp.server.SmtpServer] on an event loop in a thread of its own (``start()``
returns once it listens, ``stop()`` stops it gracefully: idle sessions are told ``421`` and closed,
a transaction in progress gets
[`BaseController.stop_grace`][alephsmtp.compat.aiosmtpd.controller.BaseController.stop_grace]
seconds); [`UnthreadedController`][alephsmtp.compat.aiosmtpd.controller.UnthreadedController] leaves
the loop to you (``begin()`` / ``end()``). The Unix-socket variants serve the same handlers on a
socket file (``SmtpServer(path=...)``). Every controller is also a context manager
(``with Controller(handler) as controller: ...``).

Each connection gets a fresh [`SMTP`][alephsmtp.compat.aiosmtpd.smtp.SMTP] from
[`BaseController.factory()`][alephsmtp.compat.aiosmtpd.controller.BaseController.factory], as in
aiosmtpd, so a subclass that overrides ``factory`` (an LMTP server, an ``SMTP`` subclass with
commands of its own) works unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import threading
from abc import ABCMeta, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from warnings import warn

from alephsmtp.replies import Reply
from alephsmtp.server import SmtpServer
from alephsmtp.session import SmtpSession

from .smtp import SMTP

__all__ = [
    "DEFAULT_READY_TIMEOUT",
    "IP6_IS",
    "BaseController",
    "BaseThreadedController",
    "BaseUnthreadedController",
    "Controller",
    "InetMixin",
    "UnixSocketController",
    "UnixSocketMixin",
    "UnixSocketUnthreadedController",
    "UnthreadedController",
    "get_localhost",
]

log = logging.getLogger("alephsmtp.compat.aiosmtpd")

DEFAULT_READY_TIMEOUT: float = 5.0
# PROXY protocol: aiosmtpd reads a header from any peer and lets handle_PROXY judge it.
_ANY_NETWORK = ("0.0.0.0/0", "::/0")
_R_UNAVAILABLE = Reply(421, "", "4.3.0 Service not available, closing connection")


class IP6_IS:
    """The ``errno`` values that tell whether binding ``::1`` failed for want of IPv6."""

    NO = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}
    YES = {errno.EADDRINUSE}


def get_localhost() -> Literal["::1", "127.0.0.1"]:
    """``"::1"`` when this host can bind it (IPv6 loopback), else ``"127.0.0.1"``."""
    if not socket.has_ipv6:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        if error.errno in IP6_IS.NO:
            return "127.0.0.1"
        if error.errno in IP6_IS.YES:
            return "::1"
        raise
    return "::1"


class BaseController(metaclass=ABCMeta):
    """What every controller shares: the handler, the loop, the ``SMTP`` parameters."""

    smtpd: SMTP | None = None
    server: Any = None
    server_coro: Any = None
    _thread_exception: BaseException | None = None
    stop_grace: float = 1.0
    """Seconds a transaction in progress may take to finish when the controller stops."""

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        **SMTP_parameters: Any,
    ) -> None:
        self.handler = handler
        self.loop = asyncio.new_event_loop() if loop is None else loop
        self.ssl_context = ssl_context
        self.SMTP_kwargs: dict[str, Any] = {}
        if "server_kwargs" in SMTP_parameters:
            warn(
                "server_kwargs will be removed in version 2.0. Just specify the keyword "
                "arguments to forward to SMTP as kwargs to this __init__ method.",
                DeprecationWarning,
                stacklevel=2,
            )
            self.SMTP_kwargs = dict(SMTP_parameters.pop("server_kwargs") or {})
        self.SMTP_kwargs.update(SMTP_parameters)
        if server_hostname:
            self.SMTP_kwargs["hostname"] = server_hostname
        # aiosmtpd's controllers offer SMTPUTF8 unless told not to (its SMTP class does not).
        self.SMTP_kwargs.setdefault("enable_SMTPUTF8", True)
        self._factory_invoked = threading.Event()

    def factory(self) -> SMTP:
        """One connection's ``SMTP``; override to serve another class (``LMTP``, a subclass)."""
        return SMTP(self.handler, **self.SMTP_kwargs)

    def _factory_invoker(self) -> SMTP:
        try:
            self.smtpd = self.factory()
            if self.smtpd is None:
                raise RuntimeError("factory() returned None")
            return self.smtpd
        finally:
            self._factory_invoked.set()

    @abstractmethod
    async def _create_server(self) -> Any:
        """Start listening (on the running loop); returns the server."""

    async def _start_server(self, **where: Any) -> SmtpServer:
        """An alephsmtp server at ``where`` (host and port, or path) for this controller's
        ``SMTP`` objects: one per connection, from
        [`factory()`][alephsmtp.compat.aiosmtpd.controller.BaseController.factory]."""
        template = self._factory_invoker()  # a factory that fails, fails here
        proxy_timeout = template._proxy_timeout
        server = SmtpServer(
            **where,
            config=template.session_config(self.ssl_context),
            implicit_tls=self.ssl_context is not None,
            proxy_protocol=proxy_timeout is not None,
            proxy_header_timeout=proxy_timeout or 10.0,
            proxy_trusted_networks=_ANY_NETWORK,
            on_session=self._on_session,
        )
        await server.start()
        return server

    def _on_session(self, session: SmtpSession) -> Any:
        try:
            smtp = self.factory()
        except Exception:
            log.exception("factory() failed")
            session.start_transaction(_R_UNAVAILABLE)  # not 220: sent, then closed
            return None
        self.smtpd = smtp
        return smtp.attach(session)

    async def _close_server(self) -> None:
        """Stop listening and end the sessions (gracefully, within
        [`stop_grace`][alephsmtp.compat.aiosmtpd.controller.BaseController.stop_grace])."""
        server = self.server
        if isinstance(server, SmtpServer):
            await server.stop(self.stop_grace)

    def _trigger_server(self) -> None:
        """aiosmtpd connects once to make its server build the first SMTP object; here the
        first one is built when the server starts, so there is nothing to trigger."""
        return

    def _cleanup(self) -> None:
        self._thread_exception = None
        self._factory_invoked.clear()
        self.server_coro = None
        self.server = None
        self.smtpd = None

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        """Stop the loop (when ``stop_loop``) and cancel all its tasks; call it with
        ``loop.call_soon_threadsafe``."""
        if stop_loop:
            self.loop.stop()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()


class BaseThreadedController(BaseController, metaclass=ABCMeta):
    """A controller whose event loop runs in a thread of its own."""

    _thread: threading.Thread | None = None

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        **SMTP_parameters: Any,
    ) -> None:
        super().__init__(
            handler,
            loop,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            **SMTP_parameters,
        )
        self.ready_timeout = float(os.getenv("AIOSMTPD_CONTROLLER_TIMEOUT", ready_timeout))

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server_coro = self._create_server()
            self.server = self.loop.run_until_complete(self.server_coro)
        except Exception as error:
            self._thread_exception = error
            ready.set()
            return
        self.loop.call_soon(ready.set)
        self.loop.run_forever()
        # stop() stopped the loop: close the server on it, then the loop.
        try:
            self.loop.run_until_complete(self._close_server())
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.loop.close()
            self.server = None

    def start(self) -> None:
        """Start the server in a thread; returns once it listens (or raises why it cannot)."""
        assert self._thread is None, "SMTP daemon already running"
        self._factory_invoked.clear()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(self.ready_timeout):
            raise TimeoutError(
                "SMTP server failed to start within allotted time. This might happen if the "
                "system is too busy. Try increasing the `ready_timeout` parameter."
            )
        if self._thread_exception is not None:
            raise self._thread_exception
        if self.smtpd is None:  # pragma: no cover - _create_server always makes one
            raise RuntimeError("Unknown Error, failed to init SMTP server")

    def stop(self, no_assert: bool = False) -> None:
        """Stop the server and its thread (sessions are ended gracefully, see stop_grace)."""
        assert no_assert or self._thread is not None, "SMTP daemon not running"
        if self._thread is not None:
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self._thread = None
        self._cleanup()

    def __enter__(self) -> BaseThreadedController:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class BaseUnthreadedController(BaseController, metaclass=ABCMeta):
    """A controller on a loop you run yourself: ``begin()``, run the loop, ``end()``."""

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        **SMTP_parameters: Any,
    ) -> None:
        super().__init__(
            handler,
            loop,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            **SMTP_parameters,
        )
        self.ended = threading.Event()

    def begin(self) -> None:
        """Start listening; the loop must then be run (and must not be running now)."""
        asyncio.set_event_loop(self.loop)
        self.server_coro = self._create_server()
        self.server = self.loop.run_until_complete(self.server_coro)

    async def finalize(self) -> None:
        """Stop listening and end the sessions; await it on the loop."""
        self.ended.clear()
        await self._close_server()
        self._cleanup()
        self.ended.set()

    def end(self) -> None:
        """[`finalize()`][alephsmtp.compat.aiosmtpd.controller.BaseUnthreadedController.finalize] as
        a task when the loop runs, else run to completion now."""
        self.ended.clear()
        if self.loop.is_running():
            task = self.loop.create_task(self.finalize())
            _TASKS.add(task)  # held: the loop keeps tasks only weakly
            task.add_done_callback(_TASKS.discard)
        else:
            self.loop.run_until_complete(self.finalize())

    def __enter__(self) -> BaseUnthreadedController:
        self.begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()


_TASKS: set[asyncio.Task[None]] = set()


class InetMixin(BaseController, metaclass=ABCMeta):
    """Listen on ``hostname``:``port`` (``None``: ``::1`` or ``127.0.0.1``; ``""``: every
    interface; port 0: the OS picks one, and `port` tells which)."""

    def __init__(
        self,
        handler: Any,
        hostname: str | None = None,
        port: int = 8025,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self._localhost = get_localhost()
        self.hostname = self._localhost if hostname is None else hostname
        self.port = port

    async def _create_server(self) -> SmtpServer:
        # "" is every interface to asyncio's create_server (None to alephsmtp).
        server = await self._start_server(host=self.hostname or None, port=self.port)
        if self.port == 0:
            self.port = server.port
        return server


class UnixSocketMixin(BaseController, metaclass=ABCMeta):
    """Listen on the Unix-domain socket ``unix_socket`` (a path)."""

    def __init__(
        self,
        handler: Any,
        unix_socket: str | Path,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self.unix_socket = str(unix_socket)

    async def _create_server(self) -> SmtpServer:
        # The socket file's mode as the umask makes it, as aiosmtpd leaves it; it is removed
        # when the controller stops. A stale file is replaced; a live server's is not.
        return await self._start_server(path=self.unix_socket, path_mode=None)


class Controller(InetMixin, BaseThreadedController):
    """A server on a TCP port, in a thread: ``start()``, ``stop()``."""


class UnixSocketController(UnixSocketMixin, BaseThreadedController):
    """A server on a Unix-domain socket, in a thread: ``start()``, ``stop()``."""


class UnthreadedController(InetMixin, BaseUnthreadedController):
    """A server on a TCP port, on a loop you run: ``begin()``, ``end()``."""


class UnixSocketUnthreadedController(UnixSocketMixin, BaseUnthreadedController):
    """A server on a Unix-domain socket, on a loop you run: ``begin()``, ``end()``."""
