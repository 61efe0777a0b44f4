"""SMTP replies: one type, one writer, and the standard replies by name.

A reply is a three-digit code, an optional RFC 3463 enhanced status code and one or more text
lines. :meth:`Reply.to_bytes` is the only place reply bytes are produced, so no text can ever
smuggle a second reply (RFC 5321 4.2: a reply line ends at CRLF; text lines with CR or LF are
split into a proper multi-line reply, never written raw).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Reply", "ReplyLike", "coerce_reply", "default_enhanced_code"]

_CODE_LINE = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?\Z", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: ``Reply(250, "2.1.0", "Sender OK")``.

    ``enhanced`` is ``None`` for "add the right one" (RFC 3463, by command and code, while
    ENHANCEDSTATUSCODES is on) and ``""`` for "none" (3xx replies never carry one, RFC 2034).
    ``text`` may hold several lines, as a sequence or separated by newlines; each becomes one
    line of a multi-line reply (RFC 5321 4.2.1).
    """

    code: int
    enhanced: str | None = None
    text: str | Sequence[str] = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code!r}")
        if self.enhanced:
            match = _ENHANCED.match(self.enhanced)
            if match is None or match.group(1) != str(self.code)[0]:
                raise ValueError(
                    f"enhanced status code {self.enhanced!r} does not fit reply code {self.code}"
                )

    @property
    def lines(self) -> tuple[str, ...]:
        """The text lines, split at any CR or LF (so none can start a reply of its own)."""
        parts = [self.text] if isinstance(self.text, str) else list(self.text)
        lines = [line for part in parts for line in re.split(r"\r\n|\r|\n", part)]
        return tuple(lines) or ("",)

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx: the command was accepted (or the server waits for more)."""
        return self.code < 400

    def with_enhanced(self, enhanced: str) -> Reply:
        """This reply with ``enhanced`` filled in where it was left to the server."""
        if self.enhanced is not None:
            return self
        return Reply(self.code, enhanced, self.text)

    def to_bytes(self, enhanced_status_codes: bool = True) -> bytes:
        """The reply as written on the wire, every line ending with CRLF."""
        code = str(self.code)
        prefix = ""
        if enhanced_status_codes and self.enhanced and self.code // 100 != 3:
            prefix = self.enhanced + " "
        lines = self.lines
        last = len(lines) - 1
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == last else "-"
            text = f"{code}{sep}{prefix}{line}"
            # RFC 5321 4.2: no SP without text; but RFC 4954 4: "334" SP [base64].
            out.append((text if self.code == 334 else text.rstrip(" ")) + "\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "surrogateescape").rstrip("\r\n")

    @classmethod
    def parse(cls, text: str) -> Reply:
        """A reply written as text, as the seed's callbacks return it: ``"250 ok\\r\\n"``.

        Accepts a trailing CRLF, multi-line replies (``"250-a\\r\\n250 b"``), and an enhanced
        code after the code (``"550 5.1.1 No such user"``). Every line must carry the same code,
        so a callback cannot inject a second reply; ``ValueError`` otherwise.
        """
        raw_lines = re.split(r"\r\n|\r|\n", text.rstrip("\r\n")) if text else []
        if not raw_lines:
            raise ValueError("empty reply")
        code: int | None = None
        texts: list[str] = []
        for index, raw in enumerate(raw_lines):
            match = _CODE_LINE.match(raw)
            if match is None:
                raise ValueError(f"reply line does not start with a reply code: {raw!r}")
            line_code = int(match.group(1))
            if code is not None and line_code != code:
                raise ValueError("reply lines carry different codes")
            code = line_code
            last = index == len(raw_lines) - 1
            if match.group(2) == "-" and last:
                raise ValueError("multi-line reply does not end with a final line")
            if match.group(2) == " " and not last:
                raise ValueError("reply has text after its final line")
            texts.append(match.group(3) or "")
        assert code is not None
        enhanced: str | None = None
        first_word, _, rest = texts[0].partition(" ")
        if _ENHANCED.match(first_word) and first_word[0] == str(code)[0]:
            enhanced = first_word
            # RFC 2034: every line of a multi-line reply repeats the enhanced code.
            texts = [rest] + [
                t[len(first_word) + 1 :] if t.startswith(first_word + " ") else t for t in texts[1:]
            ]
        return cls(code, enhanced, tuple(texts))


ReplyLike = Reply | str | None


# Handlers mostly answer with the same few strings ("250 ok", a session's greeting): each is
# parsed once. Replies are immutable, so one parsed reply serves every session. Bounded in
# entries and in length, so handlers that answer with ever new text cannot grow it.
_PARSED: dict[str, Reply] = {}
_PARSED_MAX_ENTRIES = 1024
_PARSED_MAX_LENGTH = 512


def coerce_reply(value: Reply | str) -> Reply:
    """A callback's answer as a :class:`Reply` (``ValueError``/``TypeError`` if it is not one)."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        reply = _PARSED.get(value)
        if reply is None:
            reply = Reply.parse(value)
            if len(value) <= _PARSED_MAX_LENGTH and len(_PARSED) < _PARSED_MAX_ENTRIES:
                _PARSED[value] = reply
        return reply
    raise TypeError(f"a reply must be a str or a Reply, not {type(value).__name__}")


# RFC 3463 / RFC 5248: the enhanced code a reply gets when its author gave none. The detail
# depends on what was being answered: addresses (X.1.x) for MAIL and RCPT, the message (X.6.0)
# after DATA, the system otherwise.
_BY_VERB: dict[tuple[str, int], str] = {
    ("MAIL", 2): "2.1.0",
    ("RCPT", 2): "2.1.5",
    ("MAIL", 5): "5.1.0",
    ("RCPT", 5): "5.1.1",
    ("MAIL", 4): "4.1.0",
    ("RCPT", 4): "4.1.1",
    ("DATA", 2): "2.0.0",
    ("DATA", 5): "5.6.0",
    ("DATA", 4): "4.3.0",
    ("VRFY", 2): "2.1.5",
    ("VRFY", 5): "5.1.1",
    ("AUTH", 2): "2.7.0",
    ("AUTH", 5): "5.7.8",
    ("AUTH", 4): "4.7.0",
}


def default_enhanced_code(verb: str, code: int) -> str:
    """The RFC 3463 enhanced code for a reply ``code`` to ``verb``, where the author gave none.

    ``verb`` is the command answered (``"DATA"`` also for the reply after the end of data,
    ``"BDAT"`` likewise); 3xx replies get none (RFC 2034 section 4).
    """
    klass = code // 100
    if klass == 3:
        return ""
    if verb == "BDAT":
        verb = "DATA"
    if code == 552:
        return "5.3.4" if verb == "DATA" else "5.2.2"
    if code == 452 and verb == "RCPT":
        return "4.5.3"
    if code == 421:
        return "4.3.0"
    if code == 503:
        return "5.5.1"
    if code == 500:
        return "5.5.2"
    if code == 501:
        return "5.5.4"
    if code == 502:
        return "5.5.1"
    if code == 504:
        return "5.5.4"
    if code == 530:
        return "5.7.0"
    if code == 535:
        return "5.7.8"
    return _BY_VERB.get((verb, klass), f"{klass}.0.0")
