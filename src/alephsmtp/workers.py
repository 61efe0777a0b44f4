"""The worker supervisor: N forked processes serving one port, restarted when they die.

``SmtpServer(..., workers=N).run(on_session)`` hands its serving to a
[`WorkerSupervisor`][alephsmtp.workers.WorkerSupervisor], which can also run any other serving
function::

    WorkerSupervisor(max_failures=10).run(serve, 4, host="0.0.0.0", port=25)

Every worker opens its own listening socket on the same address with ``SO_REUSEPORT`` and the
kernel spreads connections over them. The supervisor binds the address first, without
listening, so that port 0 becomes one concrete port for every worker and an address in use
fails in the caller (``OSError``). Workers of a Unix-domain socket (``unix_path``) share the
one listening socket the caller opened before: each inherits it and accepts from it. Workers
are forked, not spawned: nothing is pickled, and the caller should have no other threads
running.

SIGINT or SIGTERM to the supervisor stops the workers (each gets SIGTERM and stops as
``SmtpServer.stop()`` does) and [`WorkerSupervisor.run()`][alephsmtp.workers.WorkerSupervisor.run]
returns once all have exited. A worker that exits unasked (a crash, ``os._exit``, a signal) is
restarted after a delay that doubles with each failure in a row; a worker that fails
``max_failures`` times in a row, each time within ``stable_after`` seconds of its start, is given up
on, and when every worker has been,
[`WorkerSupervisor.run()`][alephsmtp.workers.WorkerSupervisor.run] raises
[`WorkersFailed`][alephsmtp.workers.WorkersFailed].

In a worker, every log record carries the worker's number as ``record.worker`` (1 to N)
besides the process id every record has (``%(process)d``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["WorkerSupervisor", "WorkersFailed", "supported"]

log = logging.getLogger("alephsmtp.workers")

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class WorkersFailed(RuntimeError):
    """Every worker failed too often in a row and was given up on."""


def supported() -> bool:
    """Whether this platform has what workers need: ``SO_REUSEPORT`` and ``fork``."""
    return hasattr(socket, "SO_REUSEPORT") and "fork" in multiprocessing.get_all_start_methods()


class _Slot:
    """One worker's place: its process now, and how its last runs ended."""

    __slots__ = ("failures", "given_up", "number", "process", "restart_at", "started")

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: BaseProcess | None = None
        self.started = 0.0  # time.monotonic() at the last start
        self.failures = 0  # unasked exits in a row, each before stable_after
        self.restart_at: float | None = None  # time.monotonic() when due to start again
        self.given_up = False


class WorkerSupervisor:
    """Runs N worker processes on one port and restarts those that die.

    The restart policy, all keyword options:

    - ``restart_delay`` (0.5 s): the wait before restarting a worker after its first failure;
      it doubles with each further failure in a row, up to ``max_restart_delay`` (30 s).
    - ``stable_after`` (60 s): a worker that ran this long before it exited starts a new
      count of failures (and the delay starts again from ``restart_delay``).
    - ``max_failures`` (5): a worker that failed this many times in a row, each time within
      ``stable_after`` seconds of its start, is not restarted again (logged at ERROR).

    Each restart is logged at WARNING with the worker's number, its old pid, how it ended
    (exit status or signal) and the delay.
    """

    def __init__(
        self,
        *,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        stable_after: float = 60.0,
        max_failures: int = 5,
    ) -> None:
        if restart_delay < 0 or max_restart_delay < restart_delay:
            raise ValueError("restart delays must be 0 <= restart_delay <= max_restart_delay")
        if stable_after < 0:
            raise ValueError("stable_after must not be negative")
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stable_after = stable_after
        self.max_failures = max_failures
        # One run's state (run() is not reentrant).
        self._slots: list[_Slot] = []
        self._signals = 0  # stop signals received
        self._signal_name = ""
        self._wake: tuple[int, int] | None = None  # a pipe the signal handler writes to
        self._reservation: socket.socket | None = None
        self._context = multiprocessing.get_context("fork") if supported() else None
        self._serve: Callable[[int], object] = _nothing
        self._port = 0
        self._where = ""  # "port 25" or "unix:/path", for the log
        self._on_exit: Callable[[int], object] | None = None

    def backoff(self, failures: int) -> float | None:
        """The delay before a restart after ``failures`` failures in a row; None: give up."""
        if failures >= self.max_failures:
            return None
        return float(min(self.restart_delay * 2 ** max(failures - 1, 0), self.max_restart_delay))

    def run(
        self,
        serve: Callable[[int], object],
        workers: int,
        *,
        host: str | Sequence[str] | None = None,
        port: int = 0,
        unix_path: str | None = None,
        on_exit: Callable[[int], object] | None = None,
    ) -> None:
        """Serve from ``workers`` processes, each calling ``serve(port)``, until SIGINT/SIGTERM.

        ``port`` may be 0: the port the OS picks is passed to every worker. With
        ``unix_path`` nothing is bound here: the workers serve a Unix-domain socket the caller
        listens on already (and that each forked worker inherits); ``serve(0)`` is called.
        ``serve`` runs in the forked worker with SIGINT and SIGTERM blocked: it must unblock them
        (``signal.pthread_sigmask``) once it handles them, so that a stop signal arriving
        early waits for the worker to be ready to stop gracefully (``SmtpServer`` unblocks
        them once its event loop handles them). An ``OSError`` from ``serve`` is logged in one
        line, any other exception with its traceback; either is the worker's failure.
        ``on_exit(pid)``, in the supervisor, hears of every worker that has exited, for
        whatever reason (the Prometheus exporter drops its live gauges there).

        Raises ``OSError`` when the address cannot be bound,
        [`WorkersFailed`][alephsmtp.workers.WorkersFailed] when every worker has been given up on.
        """
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if self._context is None:
            raise RuntimeError("workers need SO_REUSEPORT and fork")
        if unix_path is None:
            self._reservation = _reserve_port(host, port)
            self._port = int(self._reservation.getsockname()[1])
            self._where = f"port {self._port}"
        else:
            self._reservation, self._port, self._where = None, 0, f"unix:{unix_path}"
        self._serve = serve
        self._on_exit = on_exit
        self._slots = [_Slot(number) for number in range(1, workers + 1)]
        self._signals = 0
        self._wake = os.pipe()
        for fd in self._wake:
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        failed = True
        try:
            for slot in self._slots:
                self._start(slot)
            if not self._signals:
                started = sum(1 for slot in self._slots if slot.process is not None)
                log.info("started %d workers on %s", started, self._where)
            failed = self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._reservation is not None:
                self._reservation.close()
            for fd in self._wake:
                os.close(fd)
            self._wake = None
            # Only after an error of our own: no worker is left serving without a supervisor.
            for slot in self._slots:
                if slot.process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.terminate()
                    slot.process.join()
        if failed:
            raise WorkersFailed(
                f"every worker failed {self.max_failures} times in a row, each within "
                f"{self.stable_after:g} s of its start; giving up (see the log for why)"
            )
        log.info("stopped")

    # --- in the supervisor -------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only note it and wake the loop: logging and killing happen there, not in a handler.
        self._signals += 1
        self._signal_name = signal.Signals(signum).name
        if self._wake is not None:
            with contextlib.suppress(OSError):  # full (woken already) or closed
                os.write(self._wake[1], b"\0")

    def _supervise(self) -> bool:
        """Reap, restart and stop workers until none is left; True if all were given up on."""
        assert self._wake is not None
        stops_seen = 0
        # Bounded: each round reaps a worker, starts one that is due, or handles a signal;
        # once stopping, nothing starts and every worker exits after its SIGTERM.
        while True:
            if self._signals != stops_seen:
                if not stops_seen:
                    serving = sum(1 for slot in self._slots if slot.process is not None)
                    log.info("stopping %d workers (%s)", serving, self._signal_name)
                stops_seen = self._signals
                self._stop_all()
            live = [slot for slot in self._slots if slot.process is not None]
            if not live:
                if stops_seen:
                    return False
                if all(slot.given_up for slot in self._slots):
                    return True
            due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            timeout = max(min(due) - time.monotonic(), 0.0) if due else None
            waiting: list[int] = [self._wake[0]]
            waiting += [slot.process.sentinel for slot in live if slot.process is not None]
            ready = multiprocessing.connection.wait(waiting, timeout)
            if self._wake[0] in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake[0], 512):
                        pass
            for slot in live:
                assert slot.process is not None
                if slot.process.sentinel in ready:
                    self._reap(slot, stopping=bool(stops_seen or self._signals))
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now and not self._signals:
                    self._start(slot)

    def _start(self, slot: _Slot) -> None:
        # Forked with SIGINT/SIGTERM blocked: the child inherits _on_signal and must not run
        # it; it resets them, and serve() lets them in once it handles them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if self._signals:
                return
            assert self._context is not None
            process = self._context.Process(
                target=self._worker_main,
                args=(slot.number,),
                name=f"alephsmtp-worker-{slot.number}",
            )
            slot.restart_at = None
            slot.started = time.monotonic()
            try:
                process.start()
            except OSError as error:  # out of processes or memory: a failure like any other
                self._failed(slot, None, f"could not start ({error})")
                return
            slot.process = process
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("worker %d started (pid %s) on %s", slot.number, process.pid, self._where)

    def _stop_all(self) -> None:
        for slot in self._slots:
            slot.restart_at = None
            process = slot.process
            if process is not None and process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _reap(self, slot: _Slot, *, stopping: bool) -> None:
        process = slot.process
        assert process is not None
        process.join()
        slot.process = None
        pid, exitcode = process.pid, process.exitcode
        process.close()  # its sentinel now, not whenever the object is collected
        if self._on_exit is not None and pid is not None:
            try:
                self._on_exit(pid)
            except Exception:  # the supervisor goes on whatever a hook does
                log.exception("on_exit hook failed for pid %s", pid)
        ended = _describe_exit(exitcode)
        if stopping:
            if exitcode == 0:
                log.info("worker %d (pid %s) stopped", slot.number, pid)
            else:
                log.warning("worker %d (pid %s) %s while stopping", slot.number, pid, ended)
            return
        self._failed(slot, pid, ended)

    def _failed(self, slot: _Slot, pid: int | None, ended: str) -> None:
        """An exit nobody asked for: restart after the backoff, or give up on this slot."""
        ran = time.monotonic() - slot.started
        if ran >= self.stable_after:
            slot.failures = 0  # it had been serving well: a fresh start
        slot.failures += 1
        delay = self.backoff(slot.failures)
        if delay is None:
            slot.given_up = True
            serving = sum(1 for other in self._slots if other.process is not None)
            log.error(
                "worker %d (pid %s) %s after %.1f s: %d failures in a row, each within %g s "
                "of its start; not restarting it (%d of %d workers running)",
                slot.number,
                pid,
                ended,
                ran,
                slot.failures,
                self.stable_after,
                serving,
                len(self._slots),
            )
            return
        slot.restart_at = time.monotonic() + delay
        log.warning(
            "worker %d (pid %s) %s after %.1f s; restarting it in %g s (failure %d of %d)",
            slot.number,
            pid,
            ended,
            ran,
            delay,
            slot.failures,
            self.max_failures,
        )

    # --- in a worker -------------------------------------------------------------------------

    def _worker_main(self, number: int) -> None:
        """A forked worker: the supervisor's handles closed, its logs tagged, then serve."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._reservation is not None:
            self._reservation.close()  # the supervisor's; serve() opens its own
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        _tag_log_records(number)
        try:
            self._serve(self._port)
        except OSError as error:
            # Cannot listen, and the like: the cause, in one line, is what an operator needs.
            log.error("worker %d cannot serve: %s", number, error)
            sys.exit(1)
        except Exception:
            log.critical("worker %d failed", number, exc_info=True)
            sys.exit(1)


def _nothing(port: int) -> None:
    """The serving function before run() is given one."""


def _tag_log_records(number: int) -> None:
    """Every record made in this process from now on carries ``worker`` = ``number``."""
    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make(*args, **kwargs)
        made.__dict__["worker"] = number
        return made

    logging.setLogRecordFactory(record)


def _describe_exit(exitcode: int | None) -> str:
    """How a process ended: ``multiprocessing`` gives -N for a signal N."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


def _reserve_port(host: str | Sequence[str] | None, port: int) -> socket.socket:
    """Bind (not listen) the first address with SO_REUSEPORT: a concrete port, early."""
    hosts = [host] if host is None or isinstance(host, str) else host
    first = next(iter(hosts), None) or None  # None, "" or []: every interface
    family, kind, proto, _, address = socket.getaddrinfo(
        first, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
