"""SmtpServer: listen on an address, hand every new session to ``on_session``, stop gracefully.

The seed's shape (``SmtpServer(address, port)``, ``listen(on_session)``) on asyncio::

    server = SmtpServer("127.0.0.1", 8025)
    server.listen(on_session)            # blocks when no event loop runs (like the seed + Run)

    async with SmtpServer("127.0.0.1", 0, on_session=on_session) as server:
        print(server.port)               # the port the OS chose
        await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from .replies import Reply
from .session import OnSession, SessionConfig, SmtpSession, _Pools

__all__ = ["SmtpServer"]

log = logging.getLogger("alephsmtp.server")

Host = str | ipaddress.IPv4Address | ipaddress.IPv6Address | Sequence[str] | None


class SmtpServer:
    """An SMTP server on ``host``:``port`` (port 0: the OS picks one; see :attr:`port`).

    Keyword options are the :class:`~alephsmtp.session.SessionConfig` fields
    (``hostname``, ``max_message_size``, ``max_recipients``, ``idle_timeout``,
    ``bare_newline``, ``tls_context``, ``lmtp``, ...), plus ``on_session``, ``backlog``,
    ``reuse_port``, ``implicit_tls`` (TLS from the first byte, RFC 8314, port 465 style, with
    ``tls_context``) and ``shutdown_grace`` (seconds a transaction in progress may take to
    finish on :meth:`stop`).
    """

    def __init__(
        self,
        host: Host = "127.0.0.1",
        port: int = 25,
        *,
        on_session: OnSession | None = None,
        backlog: int = 100,
        reuse_port: bool = False,
        implicit_tls: bool = False,
        shutdown_grace: float = 30.0,
        config: SessionConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TypeError("pass either config or session options, not both")
        self.config = config if config is not None else SessionConfig(**options)
        if implicit_tls and self.config.tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.implicit_tls = implicit_tls
        self.host = (
            str(host) if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else host
        )
        self._port = port
        self.on_session = on_session
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.shutdown_grace = shutdown_grace
        self.sessions: set[SmtpSession] = set()
        self._admitted: set[SmtpSession] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._exempt = [ipaddress.ip_network(net) for net in self.config.connection_limit_exempt]
        self._pools = _Pools(self.config)
        self._server: asyncio.Server | None = None
        self._stopped: asyncio.Event | None = None
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the OS's choice when 0 was asked for)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def is_serving(self) -> bool:
        """Accepting connections now."""
        return self._server is not None and self._server.is_serving()

    @property
    def buffer_pools(self) -> tuple[Any, Any]:
        """The (command, data) buffer pools, for metrics and leak checks."""
        return self._pools.command, self._pools.data

    async def start(self, on_session: OnSession | None = None) -> None:
        """Bind and start accepting; returns once listening."""
        if on_session is not None:
            self.on_session = on_session
        if self._server is not None:
            raise RuntimeError("server already started")
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await loop.create_server(
            self._new_session,
            self.host,
            self._port,
            backlog=self.backlog,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            ssl=self.config.tls_context if self.implicit_tls else None,
            ssl_handshake_timeout=(
                self.config.tls_handshake_timeout if self.implicit_tls else None
            ),
        )
        log.info("listening on %s", ", ".join(_format(s.getsockname()) for s in self.sockets))

    def _new_session(self) -> SmtpSession:
        return SmtpSession(
            self.config,
            self.on_session,
            pools=self._pools,
            on_close=self._session_closed,
            admit=self._admit,
        )

    def _admit(self, session: SmtpSession) -> Reply | None:
        """Connection limits, checked at connect (421 4.7.0, RFC 5321 3.8 / RFC 3463).

        A session counts from here (its ``connection_made``), not from its creation: with
        implicit TLS a connection whose handshake fails never reaches the session at all.
        """
        self.sessions.add(session)
        self._no_sessions.clear()
        config = self.config
        if config.max_connections and len(self._admitted) >= config.max_connections:
            return _R_TOO_MANY_CONNECTIONS
        ip = _peer_ip(session.peer)
        if (
            ip is not None
            and config.max_connections_per_ip
            and self._per_ip[ip] >= config.max_connections_per_ip
            and not self._is_exempt(ip)
        ):
            return _R_TOO_MANY_FROM_IP
        self._admitted.add(session)
        if ip is not None:
            self._per_ip[ip] += 1
        return None

    def _is_exempt(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._exempt)

    def _session_closed(self, session: SmtpSession) -> None:
        if session in self._admitted:
            self._admitted.discard(session)
            ip = _peer_ip(session.peer)
            if ip is not None:
                self._per_ip[ip] -= 1
                if self._per_ip[ip] <= 0:
                    del self._per_ip[ip]
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` or :meth:`stop` (starts first if needed)."""
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    def close(self) -> None:
        """Stop accepting and ask every session to end (421 4.3.2 between transactions).

        Returns at once; :meth:`wait_closed` waits for the sessions, :meth:`stop` does both
        with a grace period.
        """
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.shutdown()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until every session has ended; past ``timeout`` the rest are aborted."""
        if self.sessions:
            try:
                await asyncio.wait_for(self._no_sessions.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("aborting %d session(s) after the grace period", len(self.sessions))
                for session in list(self.sessions):
                    session.abort()
                await asyncio.sleep(0)  # let connection_lost run
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: stop accepting, let transactions finish, then close."""
        self.close()
        await self.wait_closed(self.shutdown_grace if grace is None else grace)

    async def __aenter__(self) -> SmtpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- blocking entry points -------------------------------------------------------------

    def run(self, on_session: OnSession | None = None) -> None:
        """Serve until SIGINT/SIGTERM (or :meth:`close`), then shut down gracefully."""
        asyncio.run(self._run(on_session))

    def listen(self, on_session: OnSession) -> None:
        """The seed's ``Listen``: accept clients and hand each new session to ``on_session``.

        Inside a running event loop it starts listening in that loop and returns at once (keep
        the loop running). Called from plain code it serves until stopped, like :meth:`run`.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.run(on_session)
            return
        self.on_session = on_session
        task = loop.create_task(self.start())
        task.add_done_callback(_log_failure)

    async def _run(self, on_session: OnSession | None) -> None:
        await self.start(on_session)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, non-main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.close)
        try:
            await self.serve_forever()
        finally:
            await self.stop()


_R_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
_R_TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address")


def _peer_ip(peer: Any) -> str | None:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def _format(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("server failed to start", exc_info=task.exception())
