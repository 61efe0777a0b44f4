"""A scriptable milter (the filter side of the protocol) on 127.0.0.1, for the tests.

Real milters (rspamd, OpenDKIM, ...) cannot be made to send every response, to stall, to die
in the middle of a message or to send garbage: this one can. It decodes what the MTA sends with
:mod:`alephsmtp.milter.protocol` (the same module the client encodes with, so the byte-level
tests in test_milter_protocol.py pin both), records it, and answers per a script: for each
command byte a list of actions, one per occurrence (the last one repeats), where an action is
a list of responses, ``"close"``, ``("sleep", seconds)`` (then continue), ``"hang"`` or raw
bytes (garbage). Commands that take no answer (macros, abort, quit, and steps negotiated away
with SMFIP_NR_*) get none.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from alephsmtp.milter import protocol as p

Action = Union[Sequence[Any], str, tuple[str, float], bytes]  # noqa: UP007 (an alias, run time)
Script = dict[bytes, Action | list[Action] | Callable[[p.Command, "Conversation"], Action]]

# The steps whose answer SMFIP_NR_* leaves out.
_NO_REPLY = {
    p.SMFIC_CONNECT: p.Step.NR_CONN,
    p.SMFIC_HELO: p.Step.NR_HELO,
    p.SMFIC_MAIL: p.Step.NR_MAIL,
    p.SMFIC_RCPT: p.Step.NR_RCPT,
    p.SMFIC_DATA: p.Step.NR_DATA,
    p.SMFIC_UNKNOWN: p.Step.NR_UNKN,
    p.SMFIC_HEADER: p.Step.NR_HDR,
    p.SMFIC_EOH: p.Step.NR_EOH,
    p.SMFIC_BODY: p.Step.NR_BODY,
}
_SILENT = {p.SMFIC_MACRO, p.SMFIC_ABORT, p.SMFIC_QUIT, p.SMFIC_QUIT_NC}
_CONTENT = {p.SMFIC_HEADER, p.SMFIC_EOH, p.SMFIC_BODY, p.SMFIC_BODYEOB}
_VERDICTS = (p.Accept, p.Reject, p.Tempfail, p.Discard, p.ReplyCode)


def _decides(action: Any) -> bool:
    """Whether an action ends with a verdict on the message (libmilter goes back to HELO)."""
    return isinstance(action, list) and any(isinstance(r, _VERDICTS) for r in action)


@dataclass
class Conversation:
    """One MTA connection: every command it sent, in order."""

    commands: list[p.Command] = field(default_factory=list)
    counts: dict[bytes, int] = field(default_factory=dict)
    closed_by_mta: bool = False

    def codes(self) -> bytes:
        return b"".join(command.code for command in self.commands)

    def of(self, code: bytes) -> list[p.Command]:
        return [command for command in self.commands if command.code == code]

    def macros(self, stage: bytes) -> dict[str, str]:
        """The macros last sent for the command ``stage``."""
        for command in reversed(self.commands):
            if command.code == p.SMFIC_MACRO and command.stage == stage:
                names = command.strings[0::2]
                return dict(zip(names, command.strings[1::2], strict=True))
        return {}


class FakeMilter:
    """``async with FakeMilter(script) as milter:`` ... ``milter.endpoint``."""

    def __init__(
        self,
        script: Script | None = None,
        *,
        version: int = 6,
        actions: int = int(p.ALL_ACTIONS),
        protocol: int = 0,
        macros: dict[p.MacroStage, tuple[str, ...]] | None = None,
        negotiation: Action | None = None,
        libmilter: bool = True,
        port: int = 0,
        path: str | None = None,
    ) -> None:
        self.script: Script = script or {}
        self.answer = p.Negotiate(version, actions, protocol, macros or {})
        self.negotiation = negotiation
        # As libmilter: after a verdict on the message, the rest of its content is ignored,
        # unanswered (its state machine is back at HELO). False: answer everything.
        self.libmilter = libmilter
        self.conversations: list[Conversation] = []
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = port
        self.path = path  # a Unix socket instead of TCP

    @property
    def endpoint(self) -> str:
        return f"unix:{self.path}" if self.path else f"inet:127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeMilter:
        if self.path:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
            return self
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    @property
    def last(self) -> Conversation:
        return self.conversations[-1]

    async def wait_closed(self, count: int = 1, timeout: float = 10) -> None:
        """Until ``count`` conversations have been closed by the MTA."""
        deadline = asyncio.get_running_loop().time() + timeout
        while sum(c.closed_by_mta for c in self.conversations) < count:
            assert asyncio.get_running_loop().time() < deadline, "the MTA did not close"
            await asyncio.sleep(0.01)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conversation = Conversation()
        self.conversations.append(conversation)
        decoder = p.PacketDecoder()
        flags = self.answer.protocol
        decided = False  # a verdict was given on the current message
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    conversation.closed_by_mta = True
                    return
                for code, payload in decoder.feed(data):
                    command = p.decode_command(code, payload)
                    conversation.commands.append(command)
                    count = conversation.counts.get(code, 0)
                    conversation.counts[code] = count + 1
                    if code in _CONTENT and decided and self.libmilter:
                        continue  # libmilter: not reachable from HELO, ignored
                    if code in (p.SMFIC_MAIL, p.SMFIC_ABORT, p.SMFIC_HELO):
                        decided = False
                    if code == p.SMFIC_OPTNEG:
                        action: Action = self.negotiation or [self.answer]
                        if isinstance(action, tuple):  # ("sleep", s): answer, late
                            await asyncio.sleep(action[1])
                            action = [self.answer]
                    elif code in _SILENT or (code in _NO_REPLY and flags & _NO_REPLY[code]):
                        if code == p.SMFIC_QUIT:
                            writer.close()
                            conversation.closed_by_mta = True
                            return
                        continue
                    else:
                        action = self._action(code, count, command, conversation)
                    if code in _CONTENT and _decides(action):
                        decided = True
                    if not await self._perform(action, writer):
                        conversation.closed_by_mta = True
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            conversation.closed_by_mta = True
        finally:
            writer.close()
            self._tasks.discard(task)

    def _action(
        self, code: bytes, count: int, command: p.Command, conversation: Conversation
    ) -> Action:
        entry = self.script.get(code)
        if entry is None:
            return [p.Continue()]
        if callable(entry):
            return entry(command, conversation)
        if isinstance(entry, list) and entry and not isinstance(entry[0], p.Response):
            return entry[min(count, len(entry) - 1)]
        return entry  # type: ignore[return-value]

    async def _perform(self, action: Action, writer: asyncio.StreamWriter) -> bool:
        """False when the connection is to end."""
        if action == "close":
            writer.close()
            return False
        if action == "hang":
            await asyncio.sleep(3600)
            return False
        if isinstance(action, tuple):
            await asyncio.sleep(action[1])
            action = [p.Continue()]
        if isinstance(action, bytes):
            writer.write(action)
            await writer.drain()
            return True
        responses = list(action)
        close = bool(responses) and responses[-1] == "close"
        if close:
            responses.pop()
        writer.write(b"".join(p.encode_response(response) for response in responses))
        await writer.drain()
        if close:
            writer.close()
        return not close


class ThreadedFakeMilter:
    """A :class:`FakeMilter` in a thread of its own, for MTAs that are not in the test's event
    loop (Postfix, an alephsmtp server in a thread). Swap ``milter.script`` between messages;
    read ``milter.conversations`` once the MTA is done."""

    def __init__(self, script: Script | None = None, **options: Any) -> None:
        self.milter = FakeMilter(script, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeMilter:
        ready = threading.Event()

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with self.milter:
                ready.set()
                await self._stop.wait()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fake milter did not start"
        return self.milter

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
