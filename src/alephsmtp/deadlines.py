"""A session's timeouts without a timer per command.

A session keeps one [`LazyTimer`][alephsmtp.deadlines.LazyTimer]. What is due and when (the idle
deadline of the command line it waits for, the data timeout and rate checks while a message streams
in, a handler's timeout) is the session's to compute from a few floats it stamps as it goes; the
timer is only asked to wake the session *no later than* some time. Asking for a later time than the
one armed does nothing: the timer fires early, the session sees nothing is due and asks again. So a
command costs an assignment, not a ``call_later`` and a ``cancel``; a timer is re-armed once per
deadline, or when a deadline moves earlier (a message starts, a handler starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["LazyTimer"]


class LazyTimer:
    """Calls ``callback()`` at the earliest time asked for with
    [`wake_by()`][alephsmtp.deadlines.LazyTimer.wake_by] (once; ask again from the callback for the
    next)."""

    __slots__ = ("_callback", "_handle", "_loop", "at")

    def __init__(self, loop: Any, callback: Callable[[], None]) -> None:
        self._loop: asyncio.AbstractEventLoop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        #: When the pending wake-up is (loop time); infinity when none is. A hot path may
        #: compare with it before calling ``wake_by()`` (which then has nothing to do).
        self.at = _NEVER

    @property
    def armed(self) -> bool:
        """Whether a wake-up is pending."""
        return self._handle is not None

    def wake_by(self, when: float) -> None:
        """Make sure the callback runs no later than ``when`` (loop time)."""
        handle = self._handle
        if handle is not None:
            if when >= self.at:
                return  # armed earlier already: it will ask again then
            handle.cancel()
        self.at = when
        self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        """No wake-up pending any more."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.at = _NEVER

    def _fire(self) -> None:
        self._handle = None
        self.at = _NEVER
        self._callback()


_NEVER = float("inf")
