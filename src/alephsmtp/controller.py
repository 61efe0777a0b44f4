"""Controller: an [`SmtpServer`][alephsmtp.server.SmtpServer] in a background thread, for
synchronous programs (a web application, a desktop program, a script, a test suite)::

    from alephsmtp import Controller

    controller = Controller(on_session, "127.0.0.1", 8025, hostname="mx.example.org")
    controller.start()               # returns once it listens; raises here if it cannot
    ...                              # the program goes on; sessions run in the thread
    controller.stop()                # graceful: idle clients get 421, transactions finish

    with Controller(on_session, path="/run/alephsmtp/lmtp.sock", lmtp=True) as controller:
        ...

The thread runs its own event loop (uvloop when installed, as
:meth:`SmtpServer.run <alephsmtp.server.SmtpServer.run>` does) with the library's own ``SmtpServer``
on it: every option, limit and behaviour is the server's, and nothing is kept of the messages (that
is [`alephsmtp.testing.SmtpTestServer`][alephsmtp.testing.SmtpTestServer], which is built on this
class). ``on_session`` and every handler run in that thread: what they share with the rest of the
program needs the usual care (a lock, a queue, ``loop.call_soon_threadsafe`` the other way). A
stopped controller can be started again: each start makes a new ``SmtpServer`` (and, for port 0, a
new port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from types import TracebackType
from typing import Any

from .server import _UNSET, Host, LoopName, SmtpServer, _Default, _loop_runner
from .session import OnSession

__all__ = ["Controller"]

log = logging.getLogger("alephsmtp.controller")

# Where a client on this host reaches a server listening on a wildcard address.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class Controller:
    """Runs an [`SmtpServer`][alephsmtp.server.SmtpServer] in a thread of its own.

    ``host``, ``port``, ``path`` and every other keyword are
    [`SmtpServer`][alephsmtp.server.SmtpServer]'s (the server is made here, so a wrong option fails
    in the caller). ``name`` is the thread's name; ``daemon=True`` (the default) lets the
    interpreter exit while the server still runs (its connections then die with the process: call
    [`stop()`][alephsmtp.controller.Controller.stop] first to end them gracefully); ``loop`` chooses
    the event loop as ``SmtpServer.run`` does (``"auto"``: uvloop when installed). ``workers`` is
    refused: worker processes are for [`SmtpServer.run()`][alephsmtp.server.SmtpServer.run] in the
    main thread.
    """

    def __init__(
        self,
        on_session: OnSession | None = None,
        host: Host | _Default = _UNSET,
        port: int | _Default = _UNSET,
        *,
        name: str = "alephsmtp-server",
        daemon: bool = True,
        loop: LoopName = "auto",
        **options: Any,
    ) -> None:
        if options.get("workers", 1) != 1:
            raise ValueError("a controller serves from its thread: workers are for run()")
        if "on_session" in options:
            raise TypeError("on_session is the first argument")
        self.on_session = on_session
        self.name = name
        self.daemon = daemon
        self._runner = _loop_runner(loop)  # checks the name now
        self._host = host
        self._port = port
        self._options = options
        self._server = self._make_server()
        self._server_used = False
        self._lock = threading.Lock()  # start() and stop() from several threads, one at a time
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._grace: float | None = None
        self._start_error: BaseException | None = None

    def _make_server(self) -> SmtpServer:
        return SmtpServer(self._host, self._port, on_session=self._on_session, **self._options)

    def _on_session(self, session: Any) -> Any:
        # Read at each session, so that assigning controller.on_session takes effect at once.
        hook = self.on_session
        return hook(session) if hook is not None else None

    # --- where it listens --------------------------------------------------------------------

    @property
    def server(self) -> SmtpServer:
        """The running (or last) ``SmtpServer``: its ``config``, ``sessions``, ``metrics``."""
        return self._server

    @property
    def host(self) -> Host:
        """The address (or addresses) listened on; ``None`` with a Unix-domain socket."""
        return None if self._server.path is not None else self._server.host

    @property
    def port(self) -> int:
        """The port listened on (the OS's choice when 0 was asked for; a new one at each
        start); 0 with a Unix-domain socket."""
        return self._server.port

    @property
    def path(self) -> str | None:
        """The Unix-domain socket listened on, if any."""
        return self._server.path

    @property
    def address(self) -> tuple[str, int] | str:
        """Where a client on this host connects: ``(host, port)``, with loopback for a
        wildcard address (the first of several); or the socket's path."""
        server = self._server
        if server.path is not None:
            return server.path
        host = server.host
        if host is None:
            first = ""
        elif isinstance(host, str):
            first = host
        else:
            first = next(iter(host), "")
        return _LOOPBACK.get(first, first), server.port

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server thread's event loop while running (for ``call_soon_threadsafe`` and
        ``asyncio.run_coroutine_threadsafe``); ``None`` otherwise."""
        return self._loop

    @property
    def is_running(self) -> bool:
        """Between [`start()`][alephsmtp.controller.Controller.start] and
        [`stop()`][alephsmtp.controller.Controller.stop]."""
        return self._thread is not None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Controller:
        """Start serving in a new thread; returns (the controller) once the server listens.

        Whatever keeps it from listening (an address in use, a bad host, no permission) is
        raised here, in the caller's thread, and no thread is left behind.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the controller is already running")
            if self._server_used:
                # A server starts once: each start gets a fresh one (and for port 0 a new port).
                self._server = self._make_server()
            self._server_used = True
            self._start_error = None
            listening = threading.Event()
            thread = threading.Thread(
                target=self._main, args=(self._server, listening), name=self.name
            )
            thread.daemon = self.daemon
            thread.start()
            listening.wait()
            if self._start_error is not None:
                thread.join()
                self._loop = self._stop_requested = None
                error, self._start_error = self._start_error, None
                raise error
            self._thread = thread
        return self

    def _main(self, server: SmtpServer, listening: threading.Event) -> None:
        try:
            self._runner(self._serve(server, listening))
        except BaseException:
            # After the start (a failing start is raised in the caller): said, not lost.
            log.exception("the server thread failed")
            listening.set()

    async def _serve(self, server: SmtpServer, listening: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = stop_requested = asyncio.Event()
        try:
            await server.start()
        except BaseException as error:  # handed to start(), raised in the caller's thread
            self._start_error = error
            return
        finally:
            listening.set()
        await stop_requested.wait()
        await server.stop(self._grace)

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully and join the thread; returns once every connection is closed.

        Idle clients are told ``421 4.3.2``; a transaction in progress may finish within
        ``grace`` seconds (default: the server's ``shutdown_grace``, 30 s unless given) and
        is aborted after that. Safe to call when not running; refused from the server's own
        thread (a handler), where it would wait for itself.
        """
        if self._thread is threading.current_thread():
            # Checked before the lock, which a stop() in another thread may hold while it
            # waits for this very thread.
            raise RuntimeError("stop() from the server's own thread (a handler) would deadlock")
        with self._lock:
            thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
            if thread is None:
                return
            self._grace = grace
            if loop is not None and stop_requested is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone already
                    loop.call_soon_threadsafe(stop_requested.set)
            thread.join()
            self._thread = self._loop = self._stop_requested = None

    def __enter__(self) -> Controller:
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
        where = self.address
        shown = f"unix:{where}" if isinstance(where, str) else f"{where[0]}:{where[1]}"
        return f"<Controller {shown} {state}>"
