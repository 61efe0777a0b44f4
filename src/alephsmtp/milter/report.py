"""What the milters did to one message: ``envelope.milter``, a
[`MilterReport`][alephsmtp.milter.report.MilterReport]."""

from __future__ import annotations

from dataclasses import dataclass

from alephsmtp.replies import Reply

from .message import apply
from .protocol import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    InsertHeader,
    Modification,
    ReplaceBody,
)

__all__ = ["MilterEdit", "MilterReport", "MilterVerdict"]


@dataclass(frozen=True, slots=True)
class MilterVerdict:
    """One milter's answer that was not a plain "continue", or its end-of-message answer.

    ``stage`` is the event it answered (``connect``, ``helo``, ``mail``, ``rcpt``, ``data``,
    ``unknown``, ``header``, ``end-of-header``, ``body``, ``end-of-message``); ``action`` is
    ``continue``, ``accept``, ``reject``, ``tempfail``, ``discard``, ``quarantine``, ``skip``,
    ``shutdown`` or ``failed`` (the milter could not be used: its ``default_action`` applied);
    ``reply`` the SMTP reply it caused, if any; ``detail`` the quarantine reason or the failure.
    """

    milter: str
    stage: str
    action: str
    reply: Reply | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class MilterEdit:
    """A modification one milter asked for at the end of the message (``modification`` is one
    of [`alephsmtp.milter.protocol`][alephsmtp.milter.protocol]'s
    [`Modification`][alephsmtp.milter.protocol.Modification] classes). ``leading_space`` is the
    milter's ``SMFIP_HDR_LEADSPC``: its header values keep their own leading blank."""

    milter: str
    modification: Modification
    leading_space: bool = False


@dataclass(frozen=True, slots=True)
class MilterReport:
    """The milters' verdicts and edits for one message, on ``envelope.milter``.

    ``applied`` is true when the header and body edits are already in the message handed to
    ``message_received`` (``e.message``); for a streamed message it is false, and
    [`apply()`][alephsmtp.milter.message.apply] makes the edited message from the bytes you stored.
    Envelope edits (sender, recipients) are always applied to the envelope. ``discarded``: a milter
    said DISCARD; the client was told 250 and no handler after the milters saw the message.
    """

    queue_id: str
    verdicts: tuple[MilterVerdict, ...] = ()
    edits: tuple[MilterEdit, ...] = ()
    quarantine: str | None = None
    applied: bool = True
    discarded: bool = False

    @property
    def added_headers(self) -> tuple[tuple[str, str], ...]:
        """``(name, value)`` of every header field added or inserted, in order."""
        return tuple(
            (edit.modification.name, edit.modification.value)
            for edit in self.edits
            if isinstance(edit.modification, (AddHeader, InsertHeader))
        )

    @property
    def changed_headers(self) -> tuple[ChangeHeader, ...]:
        """Every header change (an empty value deletes the field), in order."""
        return tuple(
            edit.modification for edit in self.edits if isinstance(edit.modification, ChangeHeader)
        )

    @property
    def body_replaced(self) -> bool:
        """Whether a milter replaced the body."""
        return any(isinstance(edit.modification, ReplaceBody) for edit in self.edits)

    @property
    def sender(self) -> str | None:
        """The envelope sender a milter set (the last one), if any."""
        changes = [e.modification for e in self.edits if isinstance(e.modification, ChangeSender)]
        return changes[-1].address if changes else None

    @property
    def added_recipients(self) -> tuple[str, ...]:
        return tuple(
            edit.modification.address
            for edit in self.edits
            if isinstance(edit.modification, AddRecipient)
        )

    @property
    def removed_recipients(self) -> tuple[str, ...]:
        return tuple(
            edit.modification.address
            for edit in self.edits
            if isinstance(edit.modification, DeleteRecipient)
        )

    def verdict(self, milter: str) -> MilterVerdict | None:
        """The last verdict recorded for the milter named ``milter``."""
        for verdict in reversed(self.verdicts):
            if verdict.milter == milter:
                return verdict
        return None

    def apply(self, message: bytes) -> bytes:
        """``message`` with every header and body edit applied, milter by milter, in order.

        For streamed messages (``applied`` false): the stored message in, the edited one out.
        """
        index = 0
        edits = self.edits
        while index < len(edits):
            # One milter's edits at a time: each counts header indexes in the message as the
            # milters before it left it, as Postfix's cleanup does.
            milter, leading_space = edits[index].milter, edits[index].leading_space
            end = index
            while end < len(edits) and edits[end].milter == milter:
                end += 1
            batch = [edit.modification for edit in edits[index:end]]
            message = apply(message, batch, leading_space=leading_space)
            index = end
        return message
