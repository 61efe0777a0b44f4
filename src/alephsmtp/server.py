"""SmtpServer: listen on an address, hand every new session to ``on_session``, stop gracefully.

The seed's shape (``SmtpServer(address, port)``, ``listen(on_session)``) on asyncio::

    server = SmtpServer("127.0.0.1", 8025)
    server.listen(on_session)            # blocks when no event loop runs (like the seed + Run)

    async with SmtpServer("127.0.0.1", 0, on_session=on_session) as server:
        print(server.port)               # the port the OS chose
        await server.serve_forever()

At scale: ``run()`` uses uvloop when it is installed, ``workers=N`` runs N processes on one port
(SO_REUSEPORT), and ``proxy_protocol=True`` reads the PROXY protocol header a load balancer
sends ([`alephsmtp.proxy`][alephsmtp.proxy]), so sessions see the original client's address.

On one host, ``SmtpServer(path="/run/alephsmtp/lmtp.sock", lmtp=True)`` listens on a Unix-domain
socket instead (LMTP from Postfix or Dovecot);
[`SmtpServer.protocol_factory()`][alephsmtp.server.SmtpServer.protocol_factory] gives its sessions
to an asyncio server of your own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import importlib
import ipaddress
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from . import replies as R
from .metrics import Metrics, MetricsHook
from .proxy import ProxyHeader, ProxyProtocolReceiver, address_in_networks
from .replies import Reply
from .session import OnSession, SessionConfig, SmtpSession, _Pools
from .tls import TlsAcceptor
from .workers import WorkerSupervisor
from .workers import supported as _workers_supported

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from typing_extensions import Unpack

    from .config import SessionOptions
    from .prometheus import PrometheusExporter
    from .tracing import SessionTracer

__all__ = ["LoopName", "SmtpServer", "connection_capacity"]

log = logging.getLogger("alephsmtp.server")

Host = str | ipaddress.IPv4Address | ipaddress.IPv6Address | Sequence[str] | None
LoopName = Literal["auto", "asyncio", "uvloop"]
PathLike = str | os.PathLike[str]
_Runner = Callable[[Coroutine[Any, Any, None]], None]
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class _Default(enum.Enum):
    """``host`` and ``port`` not given: 127.0.0.1 and 25, or nothing with ``path``."""

    UNSET = enum.auto()


_UNSET = _Default.UNSET
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 25


class SmtpServer:
    """An SMTP server on ``host``:``port`` (port 0: the OS picks one; see
    [`port`][alephsmtp.server.SmtpServer.port]), by default 127.0.0.1 port 25; or on the Unix-domain
    socket ``path``.

    Keyword options are the [`SessionConfig`][alephsmtp.config.SessionConfig] fields
    (``hostname``, ``max_message_size``, ``max_recipients``, ``idle_timeout``,
    ``bare_newline``, ``tls_context``, ``lmtp``, ...), plus ``on_session``, ``backlog``,
    ``reuse_port``, ``implicit_tls`` (TLS from the first byte, RFC 8314, port 465 style, with
    ``tls_context``) and ``shutdown_grace`` (seconds a transaction in progress may take to
    finish on [`stop()`][alephsmtp.server.SmtpServer.stop]).

    Behind a TCP load balancer, ``proxy_protocol=True`` makes every connection from
    ``proxy_trusted_networks`` start with a PROXY protocol header (version 1 or 2, told apart
    by its first byte), read within ``proxy_header_timeout`` seconds before the greeting.
    The session then sees the original client as ``session.peer`` (and ``envelope.peer``,
    the per-IP connection limit, the logs) and the whole header as ``session.proxy``; a LOCAL
    header (a health check) keeps the real peer. A connection from elsewhere, a malformed
    header or none in time is closed without a greeting. With ``implicit_tls`` the header
    comes first and the TLS handshake after it, as HAProxy sends them.

    ``workers=N`` (N > 1) makes [`run()`][alephsmtp.server.SmtpServer.run] serve from N processes
    sharing the port; see [`run()`][alephsmtp.server.SmtpServer.run]. The asynchronous API
    ([`start()`][alephsmtp.server.SmtpServer.start], ``async with``) always serves from the calling
    process.

    ``server.metrics`` counts connections, accepted messages and their bytes, and refusals by
    reply code; ``metrics_hook=hook`` sees every change ([`alephsmtp.metrics`][alephsmtp.metrics]).

    ``path`` (instead of ``host`` and ``port``, which it excludes) listens on a Unix-domain socket:
    for LMTP from an MTA on the same host (``lmtp=True``), or a local submission service. The socket
    file gets the permissions ``path_mode`` (0o660: owner and group may connect; None: as the umask
    leaves them) before anyone can connect. A socket file left by a server that is gone is replaced
    at start; one that a live server answers on is not (``OSError`` EADDRINUSE), nor anything at
    ``path`` that is not a socket. [`close()`][alephsmtp.server.SmtpServer.close] removes the file
    again (unless another server has replaced it since). A path starting with a NUL character is a
    Linux abstract socket: no file at all. A Unix connection has no IP address: ``session.peer`` is
    the socket's ``path`` (a ``str``, as a milter is told of such a connection) and the per-IP limit
    does not apply; who may connect is decided by the file's permissions, so a PROXY protocol header
    (``proxy_protocol=True``) is read from every client of the socket. With ``workers=N`` the parent
    listens on the socket and the forked workers share it, each accepting from it (one socket file
    has one listener: ``SO_REUSEPORT`` does not apply).

    ``metrics="HOST:PORT"`` (or a [`PrometheusExporter`][alephsmtp.prometheus.PrometheusExporter])
    serves them to Prometheus on ``/metrics``, for every worker at once with ``workers=N``, and
    turns ``measure_latency`` on; ``tracing=True`` (or a ``TracerProvider``) makes an OpenTelemetry
    span per session and per transaction ([`alephsmtp.tracing`][alephsmtp.tracing]).
    """

    def __init__(
        self,
        host: Host | _Default = _UNSET,
        port: int | _Default = _UNSET,
        *,
        path: PathLike | None = None,
        path_mode: int | None = 0o660,
        on_session: OnSession | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
        implicit_tls: bool = False,
        shutdown_grace: float = 30.0,
        proxy_protocol: bool = False,
        proxy_trusted_networks: Sequence[str] = ("127.0.0.0/8", "::1/128"),
        proxy_header_timeout: float = 10.0,
        workers: int = 1,
        metrics_hook: MetricsHook | None = None,
        metrics: str | tuple[str | None, int] | PrometheusExporter | None = None,
        tracing: bool | TracerProvider | SessionTracer | None = None,
        config: SessionConfig | None = None,
        **options: Unpack[SessionOptions],
    ) -> None:
        if config is not None and options:
            raise TypeError("pass either config or session options, not both")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if proxy_header_timeout <= 0:
            raise ValueError("proxy_header_timeout must be positive")
        if path is not None:
            if host is not _UNSET or port is not _UNSET:
                raise ValueError("path (a Unix-domain socket) excludes host and port: give one")
            if reuse_port:
                raise ValueError("reuse_port does not apply to a Unix-domain socket")
            path = os.fspath(path)
            if not path:
                raise ValueError("path must not be empty")
        if path_mode is not None and not 0 <= path_mode <= 0o777:
            raise ValueError("path_mode must be permission bits, from 0o000 to 0o777")
        self.config = config if config is not None else SessionConfig(**options)
        self.exporter: PrometheusExporter | None = None
        if metrics is not None:  # Prometheus (alephsmtp.prometheus, the "metrics" extra)
            from .prometheus import exporter_for

            self.exporter = exporter_for(metrics)
            if self.exporter.latency and not self.config.measure_latency:
                self.config = dataclasses.replace(self.config, measure_latency=True)
        if implicit_tls and self.config.tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.implicit_tls = implicit_tls
        host = DEFAULT_HOST if host is _UNSET else host
        self.host = (
            str(host) if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else host
        )
        self._port = DEFAULT_PORT if port is _UNSET else port
        #: The Unix-domain socket listened on (``None``: TCP on ``host``:``port``).
        self.path: str | None = path
        self.path_mode = path_mode
        self._unix = _UnixListener(path, path_mode) if path is not None else None
        self.on_session = on_session
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.shutdown_grace = shutdown_grace
        self.proxy_protocol = proxy_protocol
        if isinstance(proxy_trusted_networks, str):  # one network, not its characters
            proxy_trusted_networks = (proxy_trusted_networks,)
        self.proxy_trusted_networks = tuple(
            ipaddress.ip_network(network) for network in proxy_trusted_networks
        )
        self.proxy_header_timeout = proxy_header_timeout
        self.workers = workers
        self.sessions: set[SmtpSession] = set()
        # Connections before their session: waiting for a PROXY header or a TLS handshake.
        self._receivers: set[ProxyProtocolReceiver | TlsAcceptor] = set()
        # The sessions counted, each with the address it counts against: the one it came
        # from, or the client XCLIENT named since.
        self._admitted: dict[SmtpSession, str | None] = {}
        self._capacity = self.config.max_connections  # set from the descriptor limit at start
        self._accept_errors = _AcceptErrors()
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._exempt = [ipaddress.ip_network(net) for net in self.config.connection_limit_exempt]
        self.metrics: Metrics = Metrics(hook=metrics_hook)  # see alephsmtp.metrics
        self._pools = _Pools(self.config, self.metrics)
        if tracing is not None and tracing is not False:  # OpenTelemetry (alephsmtp.tracing)
            from .tracing import tracer_for

            self._pools.tracer = tracer_for(tracing)
        self._server: asyncio.Server | None = None
        self._stopped: asyncio.Event | None = None
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the OS's choice when 0 was asked for); 0 on a Unix socket."""
        if self._unix is not None:
            return 0
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
    def open_connections(self) -> int:
        """Connections open now: sessions, and those still before their session (reading a
        PROXY header, in a TLS handshake). ``max_connections`` bounds this number."""
        return len(self._admitted) + len(self._receivers)

    @property
    def capacity(self) -> int:
        """How many connections this server takes at once: ``max_connections``, lowered to
        what the descriptor limit allows (known once started; 0: no limit)."""
        return self._capacity

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
        if self.workers > 1:
            log.warning("workers=%d applies to run(); serving from this process", self.workers)
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._capacity, spare = connection_capacity(self.config.max_connections)
        self._accept_errors.install(loop)
        # asyncio accepts up to ``backlog`` connections in one go before any protocol runs,
        # each a descriptor: past the spare ones that would fail with EMFILE however early
        # the extra clients get their 421. So asyncio gets a smaller batch, and the kernel's
        # queue its full length (listen() again, below).
        batch = max(1, min(self.backlog, spare // 2))
        try:
            self._server = await self._listen(loop, batch)
        except BaseException:
            self._accept_errors.uninstall()  # the loop's handler as it was
            raise
        if batch < self.backlog:
            for listening in self.sockets:
                # listen() again sets the kernel's queue; on a duplicate descriptor, as the
                # loop's socket wrappers do not offer it (it is the same socket).
                with socket.socket(fileno=os.dup(listening.fileno())) as sock:
                    sock.listen(self.backlog)
        log.info("listening on %s", ", ".join(_format(s.getsockname()) for s in self.sockets))
        if self.exporter is not None:
            try:
                await self.exporter.start(self)
            except BaseException:  # its port in use, say: not serving half
                self.close()
                await self.wait_closed(0)
                raise

    async def _listen(self, loop: asyncio.AbstractEventLoop, batch: int) -> asyncio.Server:
        # TLS (implicit, RFC 8314) runs in a protocol of its own before the session, after
        # the PROXY header if there is one: every connection counts from its accept.
        if self._unix is None:
            return await loop.create_server(
                self._new_connection,
                self.host,
                self._port,
                backlog=batch,
                # asyncio's default: on for POSIX (TIME_WAIT); on Windows SO_REUSEADDR would
                # let a second server bind the same port instead of failing "address in use".
                reuse_address=None,
                reuse_port=self.reuse_port or None,
            )
        # Bound here, not by asyncio, which would delete whatever socket file is at the path,
        # a live server's too; under workers, the one socket the parent listens on.
        sock = self._unix.socket()
        try:
            return await loop.create_unix_server(self._new_connection, sock=sock, backlog=batch)
        except BaseException:
            sock.close()
            self._unix.remove()
            raise

    def protocol_factory(
        self, on_session: OnSession | None = None
    ) -> Callable[[], asyncio.BaseProtocol]:
        """What makes this server's connections, for an asyncio server of your own::

            server = SmtpServer(lmtp=True, hostname="mx.example.org")
            listener = await loop.create_unix_server(server.protocol_factory(), path)

        Each call of the factory is one connection as [`start()`][alephsmtp.server.SmtpServer.start]
        would serve it: this server's configuration, buffer pools, metrics, connection limits, PROXY
        protocol receiver and implicit TLS, counted in `sessions` and ended by
        [`close()`][alephsmtp.server.SmtpServer.close] and
        [`stop()`][alephsmtp.server.SmtpServer.stop] (your listener you close yourself).
        ``on_session`` replaces the server's for these connections. A TCP server's sessions see the
        socket's peer; a Unix-domain listener's see its peer name (usually ``""``) unless this
        server has a ``path``.
        """
        if on_session is None:
            return self._new_connection
        return functools.partial(self._new_connection, on_session)

    def _new_connection(self, on_session: OnSession | None = None) -> asyncio.BaseProtocol:
        receiver: ProxyProtocolReceiver | TlsAcceptor
        make_session = (
            self._new_session
            if on_session is None
            else functools.partial(self._new_session, on_session=on_session)
        )
        if self.proxy_protocol:
            receiver = ProxyProtocolReceiver(
                make_session,
                trusted_networks=self.proxy_trusted_networks,
                timeout=self.proxy_header_timeout,
                tls_context=self.config.tls_context if self.implicit_tls else None,
                tls_handshake_timeout=self.config.tls_handshake_timeout,
                on_close=self._receivers.discard,
                admit=self._has_room,
                metrics=self.metrics,
            )
        elif self.implicit_tls:
            assert self.config.tls_context is not None
            receiver = TlsAcceptor(
                make_session,
                self.config.tls_context,
                handshake_timeout=self.config.tls_handshake_timeout,
                on_close=self._receivers.discard,
                admit=self._has_room,
                metrics=self.metrics,
            )
        else:
            return make_session()
        self._receivers.add(receiver)
        return receiver

    def _has_room(self) -> bool:
        """Whether a connection before its session (counted already) fits the capacity."""
        if not self._capacity or self.open_connections <= self._capacity:
            return True
        self.metrics.connections_refused["capacity"] += 1
        return False

    def _new_session(
        self, proxy: ProxyHeader | None = None, *, on_session: OnSession | None = None
    ) -> SmtpSession:
        # The client a PROXY header names; None keeps the socket's peer (LOCAL, UNKNOWN; on
        # a Unix socket, whose clients have no name, the socket's path).
        peer = proxy.source if proxy is not None else None
        return SmtpSession(
            self.config,
            self.on_session if on_session is None else on_session,
            pools=self._pools,
            on_close=self._session_closed,
            admit=self._admit,
            repoint=self._repoint,
            peer=peer,
            proxy=proxy,
        )

    def _admit(self, session: SmtpSession) -> Reply | None:
        """Connection limits, checked at connect (421 4.7.0, RFC 5321 3.8 / RFC 3463).

        A session counts from here (its ``connection_made``), not from its creation: with
        implicit TLS a connection whose handshake fails never reaches the session at all.
        """
        self.sessions.add(session)
        self._no_sessions.clear()
        config = self.config
        if self._capacity and self.open_connections >= self._capacity:
            self.metrics.connections_refused["capacity"] += 1
            return R.TOO_MANY_CONNECTIONS
        ip = _peer_ip(session.peer)
        if (
            ip is not None
            and config.max_connections_per_ip
            and self._per_ip[ip] >= config.max_connections_per_ip
            and not self._is_exempt(ip)
        ):
            self.metrics.connections_refused["per-ip"] += 1
            return R.TOO_MANY_FROM_IP
        self._admitted[session] = ip
        if ip is not None:
            self._per_ip[ip] += 1
        return None

    def _repoint(self, session: SmtpSession) -> Reply | None:
        """XCLIENT named another client: the session counts against its address from now on
        (and is refused, 421 4.7.0, when that address is at its limit)."""
        if session not in self._admitted:
            return None
        old, new = self._admitted[session], _peer_ip(session.peer)
        if old == new:
            return None
        if old is not None:
            self._per_ip[old] -= 1
            if self._per_ip[old] <= 0:
                del self._per_ip[old]
        self._admitted[session] = None
        limit = self.config.max_connections_per_ip
        if new is None:
            return None
        if limit and self._per_ip[new] >= limit and not self._is_exempt(new):
            self.metrics.connections_refused["per-ip"] += 1
            return R.TOO_MANY_FROM_IP
        self._per_ip[new] += 1
        self._admitted[session] = new
        return None

    def _is_exempt(self, ip: str) -> bool:
        return address_in_networks(ip, self._exempt)

    def _session_closed(self, session: SmtpSession) -> None:
        if session in self._admitted:
            ip = self._admitted.pop(session)
            if ip is not None:
                self._per_ip[ip] -= 1
                if self._per_ip[ip] <= 0:
                    del self._per_ip[ip]
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()

    async def serve_forever(self) -> None:
        """Serve until [`close()`][alephsmtp.server.SmtpServer.close] or
        [`stop()`][alephsmtp.server.SmtpServer.stop] (starts first if needed)."""
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    def close(self) -> None:
        """Stop accepting and ask every session to end (421 4.3.2 between transactions).

        Returns at once; [`wait_closed()`][alephsmtp.server.SmtpServer.wait_closed] waits for the
        sessions, [`stop()`][alephsmtp.server.SmtpServer.stop] does both with a grace period.
        """
        if self._server is not None:
            self._server.close()
        if self._unix is not None:
            self._unix.remove()  # new clients get ENOENT, not a socket nobody accepts on
        for receiver in list(self._receivers):
            receiver.abort()  # no session yet: nothing to say
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
        self._accept_errors.uninstall()
        if self.exporter is not None:
            await self.exporter.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: stop accepting, let transactions finish, then close."""
        log.info("stopping (%d session(s) open)", len(self.sessions))
        self.close()
        await self.wait_closed(self.shutdown_grace if grace is None else grace)
        log.info("stopped")

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

    def run(
        self,
        on_session: OnSession | None = None,
        *,
        loop: LoopName = "auto",
        supervisor: WorkerSupervisor | None = None,
    ) -> None:
        """Serve until SIGINT/SIGTERM (or [`close()`][alephsmtp.server.SmtpServer.close]), then shut
        down gracefully.

        ``loop`` chooses the event loop: ``"auto"`` (the default) runs on uvloop when it is
        installed (``pip install alephsmtp[uvloop]``) and on asyncio's own loop otherwise;
        ``"uvloop"`` insists on uvloop (``ImportError`` without it); ``"asyncio"`` opts out.

        With ``workers=N`` (N > 1) it runs N worker processes, each with its own event loop and its
        own listening socket on the same address (``SO_REUSEPORT``: the kernel spreads connections
        over them), under a [`WorkerSupervisor`][alephsmtp.workers.WorkerSupervisor]
        (``supervisor``, default: the default restart policy). The parent binds the address first,
        without listening, so that port 0 becomes one concrete port for every worker and an address
        in use fails here (``OSError``). Workers are forked, not spawned: ``on_session`` may be any
        callable (a closure, a lambda), nothing is pickled, and the caller should have no other
        threads running. SIGINT/SIGTERM to the parent stops every worker gracefully (each as
        [`stop()`][alephsmtp.server.SmtpServer.stop] does) and ``run`` returns once all have exited;
        a worker that dies unasked is restarted with a backoff, and when every worker keeps failing
        ``run`` raises [`WorkersFailed`][alephsmtp.workers.WorkersFailed] (a ``RuntimeError``).
        Without ``SO_REUSEPORT`` or ``fork`` (Windows) one process serves, with a warning.
        """
        runner = _loop_runner(loop)
        if self.workers > 1:
            if _workers_supported():
                supervisor = supervisor if supervisor is not None else WorkerSupervisor()
                serve = functools.partial(self._serve_worker, on_session, runner)
                if self._unix is not None:
                    # One listening socket, opened here and inherited by every worker.
                    with self._unix.shared(), self._metrics_for_workers() as on_exit:
                        supervisor.run(serve, self.workers, unix_path=self.path, on_exit=on_exit)
                    return
                with self._metrics_for_workers() as on_exit:
                    supervisor.run(
                        serve, self.workers, host=self.host, port=self._port, on_exit=on_exit
                    )
                return
            log.warning("workers need SO_REUSEPORT and fork; serving from one process")
            self.workers = 1
        runner(self._run(on_session))

    def _metrics_for_workers(self) -> contextlib.AbstractContextManager[Any]:
        """The exporter's one /metrics for every worker (its ``on_exit`` for the supervisor),
        or nothing to do (``None``)."""
        if self.exporter is not None:
            return self.exporter.serving_workers()
        return contextlib.nullcontext()

    def listen(self, on_session: OnSession) -> None:
        """The seed's ``Listen``: accept clients and hand each new session to ``on_session``.

        Inside a running event loop it starts listening in that loop and returns at once (keep the
        loop running). Called from plain code it serves until stopped, like
        [`run()`][alephsmtp.server.SmtpServer.run].
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.run(on_session)
            return
        self.on_session = on_session
        task = loop.create_task(self.start())
        task.add_done_callback(_log_failure)

    async def _run(self, on_session: OnSession | None, *, worker: bool = False) -> None:
        await self.start(on_session)
        loop = asyncio.get_running_loop()
        log.debug("event loop: %s.%s", type(loop).__module__, type(loop).__qualname__)
        try:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, not main
                for sig in _STOP_SIGNALS:
                    loop.add_signal_handler(sig, self.close)
        finally:
            if worker:
                # A worker starts with these blocked (alephsmtp.workers): the loop takes them now.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        try:
            await self.serve_forever()
        finally:
            await self.stop()

    # --- worker processes (alephsmtp.workers runs them) -----------------------------------------

    def _serve_worker(self, on_session: OnSession | None, runner: _Runner, port: int) -> None:
        """In a forked worker: its own loop and listening socket; SIGINT/SIGTERM still blocked."""
        self._port = port
        self.reuse_port = True
        self.workers = 1
        runner(self._run(on_session, worker=True))


class _UnixListener:
    """The socket file of a server on a Unix-domain socket: made at start with its mode,
    replacing a stale one, and removed at the end by the process that made it."""

    def __init__(self, path: str, mode: int | None) -> None:
        self.path = path
        self.mode = mode
        self._abstract = path.startswith("\0")  # Linux: a name, no file
        self._shared: socket.socket | None = None  # listened on by the parent of workers
        self._made: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we made
        self._maker = 0  # the pid that made it: forked workers never remove it

    def socket(self) -> socket.socket:
        """A socket bound to the path (not listening yet), or the one the workers share."""
        if self._shared is not None:
            return self._shared
        if not self._abstract:
            self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(self.path)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                # Made since the check: another server's.
                raise OSError(errno.EADDRINUSE, f"{self.path}: address in use") from None
            if not self._abstract:
                made = os.stat(self.path)
                self._made, self._maker = (made.st_dev, made.st_ino), os.getpid()
                # Before listen(): until then a client's connect() is refused, so nobody gets
                # in under the umask's permissions.
                if self.mode is not None:
                    os.chmod(self.path, self.mode)
        except BaseException:
            sock.close()
            self.remove()
            raise
        return sock

    @contextlib.contextmanager
    def shared(self) -> Any:
        """Listen in this process (the workers' parent) for the forked workers to share."""
        sock = self.socket()
        try:
            sock.listen()
            self._shared = sock
            yield
        finally:
            self._shared = None
            sock.close()
            self.remove()

    def remove(self) -> None:
        """Remove the socket file, if this process made it and it is still the one it made
        (another server may have replaced it since: that one is left alone)."""
        made, self._made = self._made, None
        if made is None or self._maker != os.getpid():
            return
        with contextlib.suppress(OSError):
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == made:
                os.unlink(self.path)

    def _remove_stale(self) -> None:
        """A socket file nobody listens on (a server that died) goes; a live server's stays
        and so does anything that is not a socket (OSError either way)."""
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(found.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                log.info("replacing the stale socket file %s (nobody listens on it)", self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as error:
                # No permission to connect, a full backlog (EAGAIN), a timeout: someone may
                # be serving; it is not ours to delete.
                raise OSError(
                    errno.EADDRINUSE,
                    f"{self.path}: address in use (cannot tell whether a server listens: "
                    f"{error.strerror or error})",
                ) from None
        raise OSError(errno.EADDRINUSE, f"{self.path}: address in use (a server answers on it)")


# Descriptors kept free for what is not a connection: listening sockets, logs, stores, the
# event loop's own. Of the rest, a quarter stays free for what a connection may open besides
# its socket (a spooled message's file, a relay's connection, a milter's).
_RESERVED_DESCRIPTORS = 64


def connection_capacity(max_connections: int) -> tuple[int, int]:
    """How many connections this process can take: ``max_connections`` (0: no limit), within
    what the descriptor limit (RLIMIT_NOFILE) allows; and how many descriptors stay spare
    beyond those.

    The soft limit is raised towards the hard one when ``max_connections`` needs it; if it
    still falls short, the capacity is lowered to fit, with a warning, so that a client past
    it gets ``421 4.7.0`` rather than an accept() that fails with EMFILE.
    """
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        return max_connections, _NO_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = _descriptors_in_use()

    def fitting(limit: int) -> int:
        return max((limit - in_use - _RESERVED_DESCRIPTORS) * 3 // 4, 1)

    if max_connections and fitting(soft) < max_connections and hard != soft:
        wanted = in_use + _RESERVED_DESCRIPTORS + (max_connections * 4 + 2) // 3
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        except (ValueError, OSError) as error:
            log.warning("cannot raise the descriptor limit from %d: %s", soft, error)
        else:
            log.info("descriptor limit raised from %d to %d", soft, new_soft)
            soft = new_soft
    if soft == resource.RLIM_INFINITY:
        return max_connections, _NO_LIMIT
    capacity = fitting(soft)
    if max_connections and capacity >= max_connections:
        capacity = max_connections
    elif max_connections:
        log.warning(
            "the descriptor limit (%d) allows %d connections, not max_connections=%d: "
            "serving %d (raise it with ulimit -n or LimitNOFILE=)",
            soft,
            capacity,
            max_connections,
            capacity,
        )
    return capacity, max(soft - in_use - capacity, 0)


_NO_LIMIT = 1 << 30


def _descriptors_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return 32


class _AcceptErrors:
    """Says once a minute that accept() fails for want of resources (EMFILE and the like),
    with how often, where the event loop would log a traceback per failure.

    Installed as the loop's exception handler while the server runs; everything else goes to
    the handler that was there before (or the loop's default).
    """

    PERIOD = 60.0

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None
        self._last = -self.PERIOD
        self._count = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self) -> None:
        loop = self._loop
        if loop is not None and loop.get_exception_handler() is self:
            loop.set_exception_handler(self._previous)
        self._loop = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if (
            isinstance(error, OSError)
            and error.errno in _ACCEPT_RESOURCE_ERRORS
            and ("accept" in str(context.get("message", "")).lower())
        ):
            self._count += 1
            now = loop.time()
            if now - self._last >= self.PERIOD:
                log.error(
                    "accepting connections fails: %s (%d time(s) since the last report); "
                    "lower max_connections or raise the descriptor limit",
                    error.strerror or error,
                    self._count,
                )
                self._last = now
                self._count = 0
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _peer_ip(peer: Any) -> str | None:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def _format(address: Any) -> str:
    if isinstance(address, (str, bytes)):  # a Unix-domain socket
        text = address.decode(errors="replace") if isinstance(address, bytes) else address
        return "unix:" + (text.replace("\0", "@", 1) if text.startswith("\0") else text)
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _loop_runner(loop: str) -> _Runner:
    """``asyncio.run`` or ``uvloop.run`` (uvloop's loop, same shutdown), as ``loop`` asks."""
    if loop not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', not {loop!r}")
    if loop != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            run: _Runner = uvloop.run
            return run
    return asyncio.run


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("server failed to start", exc_info=task.exception())
