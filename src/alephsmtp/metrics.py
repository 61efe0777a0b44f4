"""Counters a server keeps, and an optional hook that sees every change.

``server.metrics`` holds plain integers (connections opened and closed, messages accepted,
message bytes, replies refused by code), cheap enough to keep always. To export them (to
Prometheus, StatsD, logs), pass ``metrics_hook=callable`` to ``SmtpServer``: it is called as
``hook(name, amount, code)`` for every change, ``code`` being the reply code for
``"rejections"`` and ``None`` otherwise. A hook that raises is logged and otherwise ignored.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Metrics", "MetricsHook"]

log = logging.getLogger("alephsmtp.metrics")

MetricsHook = Callable[[str, int, "int | None"], None]


@dataclass(slots=True)
class Metrics:
    """The counters of one server (one worker process)."""

    connections_opened: int = 0
    connections_closed: int = 0
    messages: int = 0  # accepted (2xx after the end of data)
    message_bytes: int = 0  # of the accepted messages
    rejections: Counter[int] = field(default_factory=Counter)  # 4xx/5xx replies by code
    hook: MetricsHook | None = None

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self.connections_opened - self.connections_closed

    def connection_opened(self) -> None:
        self.connections_opened += 1
        self._tell("connections_opened", 1, None)

    def connection_closed(self) -> None:
        self.connections_closed += 1
        self._tell("connections_closed", 1, None)

    def message_accepted(self, size: int) -> None:
        self.messages += 1
        self.message_bytes += size
        if self.hook is not None:
            self._tell("messages", 1, None)
            self._tell("message_bytes", size, None)

    def rejected(self, code: int) -> None:
        self.rejections[code] += 1
        self._tell("rejections", 1, code)

    def _tell(self, name: str, amount: int, code: int | None) -> None:
        if self.hook is None:
            return
        try:
            self.hook(name, amount, code)
        except Exception:
            log.exception("metrics hook failed")
